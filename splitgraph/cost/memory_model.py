"""Predict, byte for byte, what `observe.memory.SavedTensorMeter` measures: the tensors autograd
saves for backward, per microbatch and stage, and their peak per rank under a schedule.

Two parts, so new ops and new schedule rules each have one place to go:

(a) `stage_saved(...)`: the tensors one forward of one stage saves for one microbatch, as
    `{(name, mb): bytes}`. Names are global, so a tensor two stages on the same rank both save
    (stage s-1's ReLU output is stage s's input, handed over without a copy) is counted once,
    as the meter's dedup by data pointer does. Per layer i (z = W a_i (+ b), then phi):

        linear       saves its input a_i ("a{i}")         (W is a parameter: never counted)
        relu/tanh/   save their output a_{i+1}            (= the next linear's input: once)
        sigmoid
        gelu         saves its input z_i ("z{i}")
        output layer classification: log-softmax output ("logp", shared with nll_loss),
                     the int64 labels ("target") and nll_loss's scalar total_weight;
                     regression: mse saves its input ("o") and the target ("target")

    The bias adds nothing saved, and the scalar divisions `/ batch` and `/ outputs` save
    nothing. A received stage input is a fresh buffer: on another rank it has no twin.

(b) `predict_saved_peak(schedule, walk)`: walks each rank's action list. `F` adds its
    microbatch's tensors (a reference count per name), `B` releases them, zero-bubble's `I`
    and `W` and recomputation have their own rules; the high-water mark per rank is the
    prediction. All op rules live in `_apply`.

Exact for float32 and float64. Under bf16 autocast the meter also sees autocast's casts
(each weight's bf16 copy, shared by the step's microbatches; the cast of a float32 input),
which this model does not price: `predictable(cfg.runtime)` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from splitgraph.config import Activation, ModelConfig, RuntimeConfig, Task
from splitgraph.schedule.ir import Action, B, F, I, Schedule, W

#: Key of one saved tensor on a rank: (global tensor name, microbatch).
Key = tuple[str, int]
Saved = dict[Key, int]

#: Activations that save their output (which the next linear saves too) rather than input.
_SAVES_OUTPUT = {Activation.relu, Activation.tanh, Activation.sigmoid}
_INT64 = 8


@dataclass(frozen=True)
class ModelShape:
    """What the saved bytes depend on: widths [in, *hidden, out], phi, task, element size."""

    dims: tuple[int, ...]
    activation: Activation
    task: Task
    element_size: int

    @property
    def num_layers(self) -> int:
        return len(self.dims) - 1

    @staticmethod
    def of(model: ModelConfig, element_size: int) -> ModelShape:
        """The shape of the model section's MLP at `element_size` bytes per element."""
        from splitgraph.model import layer_dims

        return ModelShape(
            tuple(layer_dims(model)), Activation(model.activation), Task(model.task), element_size
        )


def stage_saved(shape: ModelShape, start: int, stop: int, mb: int, n: int) -> Saved:
    """(a) Tensors saved by the forward of layers [start, stop) for microbatch `mb` of `n` rows."""
    es, d = shape.element_size, shape.dims
    last = shape.num_layers - 1
    out: Saved = {}
    for i in range(start, stop):
        out[(f"a{i}", mb)] = n * d[i] * es  # the linear's input
        if i == last:
            k = d[i + 1]
            if shape.task == Task.classification:
                out[("logp", mb)] = n * k * es
                out[("target", mb)] = n * _INT64
                out[("total_weight", mb)] = es
            else:
                out[("o", mb)] = n * k * es
                out[("target", mb)] = n * k * es
        elif shape.activation in _SAVES_OUTPUT:
            out[(f"a{i + 1}", mb)] = n * d[i + 1] * es
        else:  # gelu
            out[(f"z{i}", mb)] = n * d[i + 1] * es
    return out


def predictable(runtime: RuntimeConfig) -> bool:
    """Whether the model is exact for this run: not under bf16 autocast."""
    from splitgraph.config import DType

    return DType(runtime.dtype) != DType.bfloat16


def stage_saved_bytes(shape: ModelShape, start: int, stop: int, n: int) -> int:
    """Bytes one microbatch of `n` rows keeps alive in layers [start, stop) (no sharing)."""
    return sum(stage_saved(shape, start, stop, 0, n).values())


@dataclass(frozen=True)
class Walk:
    """What the op rules read: the model, each stage's layers, the microbatch sizes, and the
    stages that recompute their forward."""

    shape: ModelShape
    layers_of: Callable[[int], tuple[int, int]]
    sizes: Sequence[int]
    recompute: frozenset[int] = frozenset()

    def saved(self, stage: int, mb: int) -> Saved:
        start, stop = self.layers_of(stage)
        return stage_saved(self.shape, start, stop, mb, self.sizes[mb])

    def stage_input(self, stage: int, mb: int) -> Saved:
        """The stage's input (the first linear's): all a recomputing stage keeps after F."""
        start, _ = self.layers_of(stage)
        return {
            (f"a{start}", mb): self.sizes[mb] * self.shape.dims[start] * self.shape.element_size
        }

    def input_grad_events(self, stage: int, mb: int) -> list[tuple[bool, Key, int]]:
        """An I (backward with the weight gradients deferred), node by node as autograd runs
        it: each node releases what it saved, except each linear's input, which passes to the
        W store, which also holds each linear's output gradient dz. (hold?, key, bytes)."""
        start, stop = self.layers_of(stage)
        sh, n = self.shape, self.sizes[mb]
        last = sh.num_layers - 1
        events: list[tuple[bool, Key, int]] = []
        for i in reversed(range(start, stop)):
            if i == last:  # the loss's nodes run first
                names = ("logp", "target", "total_weight")
                if sh.task != Task.classification:
                    names = ("o", "target")
                events += [(False, (name, mb), 0) for name in names]
            elif sh.activation in _SAVES_OUTPUT:
                if i + 1 == stop:  # the stage's output: no linear of this stage kept it
                    events.append((False, (f"a{i + 1}", mb), 0))
            else:  # gelu saved its input z
                events.append((False, (f"z{i}", mb), 0))
            events.append((True, (f"dz{i}", mb), n * sh.dims[i + 1] * sh.element_size))
        return events

    def deferred(self, stage: int, mb: int) -> Saved:
        """What the W store holds until W: each linear's input and output gradient."""
        start, stop = self.layers_of(stage)
        sh, n = self.shape, self.sizes[mb]
        out: Saved = {}
        for i in range(start, stop):
            out[(f"a{i}", mb)] = n * sh.dims[i] * sh.element_size
            out[(f"dz{i}", mb)] = n * sh.dims[i + 1] * sh.element_size
        return out


def plan_walk(
    shape: ModelShape, bounds: Sequence[int], sizes: Sequence[int], recompute: Iterable[int] = ()
) -> Walk:
    """The walk for a whole plan (`bounds`: stage s holds layers bounds[s]..bounds[s+1]-1)."""
    return Walk(shape, lambda s: (bounds[s], bounds[s + 1]), tuple(sizes), frozenset(recompute))


class _Rank:
    """Live saved tensors on one rank: reference counts, like the meter's dedup."""

    def __init__(self) -> None:
        self.live: dict[Key, list[int]] = {}
        self.current = 0
        self.peak = 0

    def hold(self, tensors: Saved) -> None:
        for key, nbytes in tensors.items():
            entry = self.live.get(key)
            if entry is None:
                self.live[key] = [1, nbytes]
                self.current += nbytes
            else:
                entry[0] += 1
        self.peak = max(self.peak, self.current)

    def release(self, tensors: Saved) -> None:
        for key in tensors:
            entry = self.live[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self.live[key]
                self.current -= entry[1]


def _apply(rank: _Rank, a: Action, walk: Walk) -> None:
    """The op rules, all of them.

    F   saves the stage's tensors; with recomputation, keeps only the stage input.
    B   frees them; with recomputation it first saves them again (the forward re-run: the
        input is counted once) and lets go of the kept input.
    I   like B, node by node, but each linear's input and output gradient stay for W.
    W   frees what its I kept.
    """
    s, mb = a.stage, a.mb
    recomputed = s in walk.recompute
    if a.op == F:
        rank.hold(walk.stage_input(s, mb) if recomputed else walk.saved(s, mb))
    elif a.op in (B, I):
        if recomputed:
            rank.hold(walk.saved(s, mb))
            rank.release(walk.stage_input(s, mb))
        if a.op == B:
            rank.release(walk.saved(s, mb))
            return
        for hold, key, nbytes in walk.input_grad_events(s, mb):
            if hold:
                rank.hold({key: nbytes})
            else:
                rank.release({key: nbytes})
    elif a.op == W:
        rank.release(walk.deferred(s, mb))


def predict_saved_peak(sched: Schedule, walk: Walk, only: int | None = None) -> list[int]:
    """(b) Per rank: the peak bytes saved for backward during one step of `sched`.

    `only=s` walks stage s's actions alone (what a planner pricing one stage needs)."""
    peaks = []
    for actions in sched.actions:
        rank = _Rank()
        for a in actions:
            if only is None or a.stage == only:
                _apply(rank, a, walk)
        if rank.live:
            raise AssertionError(f"{sorted(rank.live)[:4]} still saved after the step")
        peaks.append(rank.peak)
    return peaks


def predict_for_plan(
    shape: ModelShape,
    bounds: Sequence[int],
    sizes: Sequence[int],
    sched: Schedule,
    recompute: Iterable[int] = (),
) -> list[int]:
    """Per-rank peaks for a plan (its `bounds`), microbatch sizes, schedule and the stages
    that recompute."""
    return predict_saved_peak(sched, plan_walk(shape, bounds, sizes, recompute))
