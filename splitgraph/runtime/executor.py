"""Execute one rank's validated action list for one training step, and nothing else.

The executor owns no policy: the order of every forward, backward and transfer comes from
the schedule. Per step it keeps, per (stage, microbatch), the stage input (a leaf whose
gradient is what travels back: its `.grad` after B, what autograd.grad returns in I), the
stage output (or the microbatch loss on the last stage),
the gradient to send back, the posted receives and the deferred weight gradients:

    RECV_F  post irecv into a fresh [mb, in_features] buffer      (waited by F)
    F       x -> stage(x); last stage: loss += loss_sum(o, y) / batch
    SEND_F  isend the output's data                               (waited at step end)
    RECV_B  post irecv into a fresh [mb, out_features] buffer     (waited by B or I)
    B       autograd.backward(output, grad) or loss.backward(); keep x.grad
    I       the input gradient only: no dJ/dW formed; each layer's dz kept. Its F ran the
            layers by hand, keeping what autograd would (model.WeightGradStore: I walks
            them back with autograd's own kernels; autograd itself under bf16 autocast)
    W       dJ/dW = dz^T x (and dJ/db) from what I kept
    SEND_B  isend x.grad                                          (waited at step end)

With recomputation on a stage, F runs without a graph and keeps only the stage input; its
B (or I) runs the forward again, with the graph, right before the backward.

Transfers between two compute actions go out together (`P2P.post`). Stages that share a
rank (interleaved schedules) hand tensors over without the network.

Every receive of the step is posted when the step starts, in the schedule's order, and waited
where the schedule puts it (`prepost_receives`, on by default: `program` starts with them). A
send that finds its receive already posted goes out at once; one that does not costs a round
trip between the two ranks' transport threads first (gloo's unbound buffers: "send ready",
"receive ready", then the data), right on the critical path. Posting early never reorders a
channel (each channel's receives keep their order) and never blocks on gloo; on NCCL each
channel has its own communicator (comm.py), so early receives hold up nothing but later
receives of the same channel. The cost is memory: the step's receive buffers exist from its
start (one boundary-sized tensor per microbatch and direction, as torch.distributed.pipelining
keeps).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from splitgraph.config import Task
from splitgraph.model import StageModule, WeightGradStore, loss_sum
from splitgraph.observe.memory import SavedTensorMeter
from splitgraph.observe.trace import NULL_TRACER, Tracer
from splitgraph.runtime.comm import P2P, Transfer
from splitgraph.schedule.ir import RECV_B, RECV_F, SEND_B, SEND_F, Action, B, F, I, Schedule, W


class InjectedFault(RuntimeError):
    """Raised by `debug.fail_at_step`: a deliberate failure to test how the others react."""


def _compile(
    actions: Sequence[Action], prepost_receives: bool = False
) -> list[Action | tuple[Action, ...]]:
    """Compute actions stay single; runs of consecutive transfers become one tuple. With
    `prepost_receives`, every receive moves into one group at the start, in order."""
    receive = (RECV_F, RECV_B)
    receives = tuple(a for a in actions if a.op in receive) if prepost_receives else ()
    program: list[Action | tuple[Action, ...]] = [receives] if receives else []
    group: list[Action] = []
    for a in actions:
        if receives and a.op in receive:
            continue
        if a.op.is_comm:
            group.append(a)
            continue
        if group:
            program.append(tuple(group))
            group = []
        program.append(a)
    if group:
        program.append(tuple(group))
    return program


class _Step:
    """Everything one step keeps per (stage, microbatch); dropped when the step ends."""

    def __init__(self, xs: Sequence[Tensor] | None, ys: Sequence[Tensor] | None, batch: int):
        self.xs, self.ys, self.batch = xs, ys, batch
        self.inputs: dict[tuple[int, int], Tensor] = {}
        self.outputs: dict[tuple[int, int], Tensor] = {}
        self.grads: dict[tuple[int, int], Tensor] = {}
        self.received: dict[Action, tuple[Tensor, Any]] = {}
        self.deferred: dict[tuple[int, int], WeightGradStore] = {}
        self.sends: list[tuple[Any, Tensor]] = []


class Executor:
    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        stages: dict[int, StageModule],
        p2p: P2P,
        task: Task,
        device: torch.device,
        dtype: torch.dtype,
        meter: SavedTensorMeter | None = None,
        recompute: Collection[int] = (),
        autocast: bool = False,
        prepost_receives: bool = True,
        *,
        tracer: Tracer | None = None,
        guard: Any = None,
        on_grads_final: Callable[[int], None] | None = None,
    ) -> None:
        self.schedule, self.rank, self.stages, self.p2p = schedule, rank, stages, p2p
        self.task, self.device, self.dtype, self.meter = Task(task), device, dtype, meter
        self.recompute = frozenset(recompute)
        #: bf16 autocast around every forward (dtype is then bf16: what travels between stages)
        self.autocast = autocast
        actions = schedule.actions[rank]
        self.program = _compile(actions, prepost_receives)
        #: program index -> index in the schedule's action list of the item's first action
        self.action_index = [actions.index(_first(item)) for item in self.program]
        self._grads_final = _last_weight_grad(self.program)
        self.last = schedule.num_stages - 1
        self._rank_of = schedule.stage_to_rank
        #: (stage, mb) whose backward is an I: their forward records for I and W
        self._split = {(a.stage, a.mb) for a in actions if a.op == I}
        #: records each action's start and end while `tracer.active` (observe/trace.py)
        self.tracer: Tracer = tracer if tracer is not None else NULL_TRACER
        #: called with a stage once its weight gradients of the step are final (data parallel)
        self.on_grads_final = on_grads_final
        #: the watchdog's view (reliability/watchdog.py): (index into `program` in progress,
        #: time.monotonic() when it started); None between steps
        self.position: tuple[int, float] | None = None
        #: the numerical guard (runtime/guard.py): `guard.after(action, outputs, grads)`
        #: after each compute action
        self.guard: Any = guard

    def run(
        self,
        x: Tensor | None,
        y: Tensor | None,
        sizes: Sequence[int],
        fail_at: int | None = None,
        batch: int | None = None,
    ) -> Tensor | None:
        """One forward+backward over all microbatches; returns the summed loss on the rank
        that holds the last stage (float64), else None. Gradients accumulate in `.grad`.

        Each microbatch's loss is weighted by 1/`batch` (default: the rows given here); a
        data-parallel replica passes the global batch, so replicas' gradients sum to L's."""
        st = _Step(
            x.split(list(sizes)) if x is not None else None,
            y.split(list(sizes)) if y is not None else None,
            sum(sizes) if batch is None else batch,
        )
        loss_total = (
            torch.zeros((), dtype=torch.float64, device=self.device)
            if self.last in self.stages
            else None
        )
        tr = self.tracer
        current: object = None
        meter = self.meter if self.meter is not None else _NullContext()
        try:
            # One autocast region for the whole step (bf16): autocast caches each weight's
            # bf16 copy for the region, so the microbatches share one copy instead of each
            # keeping its own for backward. Backwards run with autocast off (see _backward).
            with meter, self._precision():
                for index, item in enumerate(self.program):
                    current = item
                    self.position = (index, time.monotonic())
                    if fail_at is not None and index == fail_at:
                        raise InjectedFault(
                            f"injected failure (debug.fail_at_step) on rank {self.rank}"
                        )
                    with tr.span(item, "comm" if isinstance(item, tuple) else item.op.value):
                        if isinstance(item, tuple):
                            self._post(item, sizes, st)
                        elif item.op == F:
                            self._forward(item, st, loss_total)
                        elif item.op in (B, I):
                            self._backward(item, st)
                        elif item.op == W:
                            with self._no_autocast():
                                st.deferred.pop((item.stage, item.mb)).run()
                        else:
                            raise AssertionError(f"{item} is not executable")
                        if self.guard is not None and not isinstance(item, tuple):
                            self.guard.after(item, st.outputs, st.grads)
                    if self.on_grads_final is not None and index in self._grads_final:
                        self.on_grads_final(self._grads_final[index])
            current = "the step's pending sends"
            self.position = (len(self.program), time.monotonic())
            for work, _ in st.sends:
                work.wait()
            self.position = None
        except InjectedFault:
            raise
        except torch.OutOfMemoryError as e:  # keeps its type: train.py stops the run as "oom"
            if hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(f"rank {self.rank} failed at {self._describe(current)}")
            raise
        except Exception as e:
            raise RuntimeError(f"rank {self.rank} failed at {self._describe(current)}: {e}") from e
        return loss_total

    # -- transfers --------------------------------------------------------------------

    def _post(self, group: tuple[Action, ...], sizes: Sequence[int], st: _Step) -> None:
        transfers = []
        for a in group:
            s, mb = a.stage, a.mb
            if a.op == RECV_F:
                t = self._empty(sizes[mb], self.stages[s].in_features)
                transfers.append(Transfer(False, t, self._rank_of[s - 1], "act", str(a)))
            elif a.op == RECV_B:
                t = self._empty(sizes[mb], self.stages[s].out_features)
                transfers.append(Transfer(False, t, self._rank_of[s + 1], "grad", str(a)))
            elif a.op == SEND_F:
                t = self._take_output(st, s, mb).detach()
                transfers.append(Transfer(True, t, self._rank_of[s + 1], "act", str(a)))
            else:  # SEND_B
                t = st.grads.pop((s, mb))
                transfers.append(Transfer(True, t, self._rank_of[s - 1], "grad", str(a)))
        works = self.p2p.post(transfers)
        for a, tr, work in zip(group, transfers, works):
            if tr.is_send:
                st.sends.append((work, tr.tensor))
            else:
                st.received[a] = (tr.tensor, work)

    def _precision(self) -> Any:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _no_autocast(self) -> Any:
        """Backward passes run outside autocast (PyTorch's advice); the step's region stays
        open around them, so its cache of bf16 weight copies survives until the step ends."""
        if self.autocast:
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    def _empty(self, rows: int, cols: int) -> Tensor:
        return torch.empty(rows, cols, dtype=self.dtype, device=self.device)

    def _take(self, st: _Step, key: Action) -> Tensor:
        buf, work = st.received.pop(key)
        with self.tracer.span(key, "wait"):
            try:
                work.wait()
            except Exception as e:
                peer = self._rank_of[key.stage - 1 if key.op == RECV_F else key.stage + 1]
                raise RuntimeError(f"waiting for {key} from rank {peer}: {e}") from e
        return buf

    def _take_output(self, st: _Step, s: int, mb: int) -> Tensor:
        """A stage output for the next stage. Without recomputation the output stays for its
        own backward; with it, the output carries no graph and is not needed again."""
        if s in self.recompute:
            return st.outputs.pop((s, mb))
        return st.outputs[(s, mb)]

    # -- compute ----------------------------------------------------------------------

    def _stage_input(self, st: _Step, s: int, mb: int) -> Tensor:
        if s == 0:
            assert st.xs is not None, "the first stage needs the inputs"
            return st.xs[mb]
        if self._rank_of[s - 1] == self.rank:
            x = self._take_output(st, s - 1, mb).detach()
        else:
            x = self._take(st, Action(s, RECV_F, mb))
        return x.requires_grad_(True)

    def _loss(self, st: _Step, out: Tensor, mb: int) -> Tensor:
        assert st.ys is not None, "the last stage needs the labels"
        return loss_sum(out, st.ys[mb], self.task) / st.batch

    def _forward(self, a: Action, st: _Step, loss_total: Tensor | None) -> None:
        s, mb = a.stage, a.mb
        x = self._stage_input(st, s, mb)
        stage = self.stages[s]
        if s in self.recompute:  # keep only the input; the graph is rebuilt in backward
            with torch.no_grad():
                out = stage(x)
                loss = self._loss(st, out, mb) if s == self.last else None
            if self.meter is not None:
                self.meter.hold(x)
            st.inputs[(s, mb)] = x
        else:
            out = self._stage_forward(st, s, mb, x)
            loss = self._loss(st, out, mb) if s == self.last else None
            if s > 0:
                st.inputs[(s, mb)] = x
        if loss is not None:
            assert loss_total is not None
            loss_total += loss.detach().to(torch.float64)
            st.outputs[(s, mb)] = loss  # recomputed: a value for the guard, no graph
        else:
            st.outputs[(s, mb)] = out

    def _backward(self, a: Action, st: _Step) -> None:
        s, mb = a.stage, a.mb
        grad = None
        if s < self.last:
            if self._rank_of[s + 1] == self.rank:
                grad = st.grads.pop((s + 1, mb))
            else:
                grad = self._take(st, Action(s, RECV_B, mb))
        if s in self.recompute:  # a forward: under the step's autocast, if any
            x = st.inputs[(s, mb)]
            out = self._stage_forward(st, s, mb, x)
            target = self._loss(st, out, mb) if s == self.last else out
            if s == self.last:
                st.outputs.pop((s, mb))  # the forward's value; the graph is `target`'s
            if self.meter is not None:
                self.meter.drop(x)  # autograd holds it now (saved by the first layer)
        else:
            target = st.outputs.pop((s, mb))
        x = st.inputs.pop((s, mb), None)
        with self._no_autocast():
            if a.op == I:
                dx = st.deferred[(s, mb)].input_grad(target, grad, x if s > 0 else None)
            else:
                torch.autograd.backward(target, grad)
                dx = x.grad if x is not None else None
        if s > 0:
            assert dx is not None
            st.grads[(s, mb)] = dx

    def _stage_forward(self, st: _Step, s: int, mb: int, x: Tensor) -> Tensor:
        """The stage's forward with the graph; one whose backward is an I records for it."""
        if (s, mb) not in self._split:
            return self.stages[s](x)
        store = st.deferred[(s, mb)] = WeightGradStore(self.meter)
        return store.forward(self.stages[s], x)

    def _describe(self, item: object) -> str:
        if isinstance(item, tuple):
            parts = []
            for a in item:
                peer = self._rank_of[a.stage + 1 if a.op in (SEND_F, RECV_B) else a.stage - 1]
                parts.append(f"{a} ({'to' if a.op in (SEND_F, SEND_B) else 'from'} rank {peer})")
            return "transfer " + ", ".join(parts)
        if isinstance(item, Action):
            return f"action {item}"
        return str(item)


def _first(item: Action | tuple[Action, ...]) -> Action:
    return item[0] if isinstance(item, tuple) else item


def _last_weight_grad(program: Sequence[Action | tuple[Action, ...]]) -> dict[int, int]:
    """Program index -> the stage whose weight gradients are final after that action: the
    stage's last B, or last W where the backward is split (zero-bubble)."""
    last: dict[int, int] = {}
    for index, item in enumerate(program):
        if isinstance(item, Action) and item.op in (B, W):
            last[item.stage] = index
    return {index: stage for stage, index in last.items()}


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
