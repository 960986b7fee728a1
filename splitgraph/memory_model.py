"""Predict, byte for byte, what `runtime.memory.SavedTensorMeter` measures: the tensors autograd
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

(b) `predict_saved_peak(schedule, saved)`: walks each rank's action list. `F` adds its
    microbatch's tensors (a reference count per name), `B` releases them; the high-water mark
    per rank is the prediction. All op rules live in `_apply`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from splitgraph.config import Activation, Task
from splitgraph.schedule.ir import Action, B, F, Schedule

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
    def from_config(cfg: object, element_size: int) -> ModelShape:
        from splitgraph.model import layer_dims

        m = cfg.model  # type: ignore[attr-defined]
        return ModelShape(
            tuple(layer_dims(cfg)), Activation(m.activation), Task(m.task), element_size
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


def stage_saved_bytes(shape: ModelShape, start: int, stop: int, n: int) -> int:
    """Bytes one microbatch of `n` rows keeps alive in layers [start, stop) (no sharing)."""
    return sum(stage_saved(shape, start, stop, 0, n).values())


def saved_fn(
    shape: ModelShape, bounds: Sequence[int], sizes: Sequence[int]
) -> Callable[[int, int], Saved]:
    """`saved(stage, mb)` for a plan's `bounds` and the microbatch sizes."""

    def saved(stage: int, mb: int) -> Saved:
        return stage_saved(shape, bounds[stage], bounds[stage + 1], mb, sizes[mb])

    return saved


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


def _apply(rank: _Rank, a: Action, saved: Callable[[int, int], Saved]) -> None:
    """The op rules. F: the stage's forward saves its tensors. B: its backward frees them.

    Zero-bubble's I/W and recomputation get their rules here (I frees what only the input
    gradient needs and keeps each linear's input for W; a recomputed F saves only the stage
    input and B re-saves the rest transiently)."""
    if a.op == F:
        rank.hold(saved(a.stage, a.mb))
    elif a.op == B:
        rank.release(saved(a.stage, a.mb))
    elif a.op.is_compute:
        raise NotImplementedError(
            f"{a}: the memory model has no rule for op {a.op.value} yet "
            "(splitgraph/memory_model.py: _apply)"
        )


def predict_saved_peak(
    sched: Schedule, saved: Callable[[int, int], Saved], only: int | None = None
) -> list[int]:
    """(b) Per rank: the peak bytes saved for backward during one step of `sched`.

    `only=s` walks stage s's actions alone (what a planner pricing one stage needs)."""
    peaks = []
    for actions in sched.actions:
        rank = _Rank()
        for a in actions:
            if only is None or a.stage == only:
                _apply(rank, a, saved)
        if rank.live:
            raise AssertionError(f"{sorted(rank.live)[:4]} still saved after the step")
        peaks.append(rank.peak)
    return peaks


def predict_for_plan(
    shape: ModelShape, bounds: Sequence[int], sizes: Sequence[int], sched: Schedule
) -> list[int]:
    """Per-rank peaks for a plan (its `bounds`), microbatch sizes and schedule."""
    return predict_saved_peak(sched, saved_fn(shape, bounds, sizes))
