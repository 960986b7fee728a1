"""Execute one rank's validated action list for one training step, and nothing else.

The executor owns no policy: the order of every forward, backward and transfer comes from
the schedule. Per step it keeps, per (stage, microbatch), the stage input (a leaf whose
`.grad` is what travels back), the stage output (or the microbatch loss on the last stage),
the gradient to send back, and the posted receives:

    RECV_F  post irecv into a fresh [mb, in_features] buffer     (waited by F)
    F       x -> stage(x); last stage: loss += loss_sum(o, y) / batch
    SEND_F  isend the output's data                              (waited at step end)
    RECV_B  post irecv into a fresh [mb, out_features] buffer    (waited by B)
    B       autograd.backward(output, grad) or loss.backward(); keep x.grad
    SEND_B  isend x.grad                                         (waited at step end)

Transfers between two compute actions go out together (`P2P.post`). Stages that share a
rank hand tensors over without the network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from splitgraph.config import Task
from splitgraph.model import StageModule, loss_sum
from splitgraph.runtime.comm import P2P, Transfer
from splitgraph.runtime.memory import SavedTensorMeter
from splitgraph.schedule.ir import RECV_B, RECV_F, SEND_B, SEND_F, Action, B, F, Schedule


class InjectedFault(RuntimeError):
    """Raised by `debug.fail_at_step`: a deliberate failure to test how the others react."""


def _compile(actions: Sequence[Action]) -> list[Action | tuple[Action, ...]]:
    """Compute actions stay single; runs of consecutive transfers become one tuple."""
    program: list[Action | tuple[Action, ...]] = []
    group: list[Action] = []
    for a in actions:
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
    ) -> None:
        self.schedule, self.rank, self.stages, self.p2p = schedule, rank, stages, p2p
        self.task, self.device, self.dtype, self.meter = Task(task), device, dtype, meter
        self.program = _compile(schedule.actions[rank])
        self.last = schedule.num_stages - 1
        self._rank_of = schedule.stage_to_rank
        #: when a list, each step appends (action, start, end) in perf_counter seconds
        self.trace: list[tuple[str, float, float]] | None = None
        # -- issue 8 hooks (runtime/watchdog.py, runtime/guard.py) --
        #: (index into `program` in progress, time.monotonic() when it started); None between steps
        self.position: tuple[int, float] | None = None
        #: the numerical guard: `guard.after(action, outputs, grads)` after each compute action
        self.guard: Any = None

    def run(
        self,
        x: Tensor | None,
        y: Tensor | None,
        sizes: Sequence[int],
        fail_at: int | None = None,
    ) -> Tensor | None:
        """One forward+backward over all microbatches; returns the summed loss on the rank
        that holds the last stage (float64), else None. Gradients accumulate in `.grad`."""
        batch = sum(sizes)
        xs = x.split(list(sizes)) if x is not None else None
        ys = y.split(list(sizes)) if y is not None else None
        inputs: dict[tuple[int, int], Tensor] = {}
        outputs: dict[tuple[int, int], Tensor] = {}
        grads: dict[tuple[int, int], Tensor] = {}
        received: dict[Action, tuple[Tensor, Any]] = {}
        sends: list[tuple[Any, Tensor]] = []
        loss_total = (
            torch.zeros((), dtype=torch.float64, device=self.device)
            if self.last in self.stages
            else None
        )
        trace, clock = self.trace, time.perf_counter
        current: object = None
        meter = self.meter if self.meter is not None else _NullContext()
        try:
            with meter:
                for index, item in enumerate(self.program):
                    current = item
                    self.position = (index, time.monotonic())  # issue 8: watchdog
                    if fail_at is not None and index == fail_at:
                        raise InjectedFault(
                            f"injected failure (debug.fail_at_step) on rank {self.rank}"
                        )
                    t0 = clock() if trace is not None else 0.0
                    if isinstance(item, tuple):
                        self._post(item, sizes, outputs, grads, received, sends)
                        label = " ".join(map(str, item))
                    else:
                        a = item
                        if a.op == F:
                            self._forward(a, xs, ys, batch, inputs, outputs, received, loss_total)
                        elif a.op == B:
                            self._backward(a, inputs, outputs, grads, received)
                        else:
                            raise NotImplementedError(f"{a}: op {a.op.value} is not executable")
                        if self.guard is not None:  # issue 8: numerical guard
                            self.guard.after(a, outputs, grads)
                        label = str(a)
                    if trace is not None:
                        trace.append((label, t0, clock()))
            current = "the step's pending sends"
            self.position = (len(self.program), time.monotonic())  # issue 8: watchdog
            for work, _ in sends:
                work.wait()
            self.position = None  # issue 8: watchdog
        except InjectedFault:
            raise
        except Exception as e:
            raise RuntimeError(f"rank {self.rank} failed at {self._describe(current)}: {e}") from e
        return loss_total

    # -- transfers --------------------------------------------------------------------

    def _post(
        self,
        group: tuple[Action, ...],
        sizes: Sequence[int],
        outputs: dict[tuple[int, int], Tensor],
        grads: dict[tuple[int, int], Tensor],
        received: dict[Action, tuple[Tensor, Any]],
        sends: list[tuple[Any, Tensor]],
    ) -> None:
        transfers = []
        for a in group:
            s, mb = a.stage, a.mb
            if a.op == RECV_F:
                t = torch.empty(
                    sizes[mb], self.stages[s].in_features, dtype=self.dtype, device=self.device
                )
                peer = self._rank_of[s - 1]
            elif a.op == RECV_B:
                t = torch.empty(
                    sizes[mb], self.stages[s].out_features, dtype=self.dtype, device=self.device
                )
                peer = self._rank_of[s + 1]
            elif a.op == SEND_F:
                t = outputs[(s, mb)].detach()
                peer = self._rank_of[s + 1]
            else:  # SEND_B
                t = grads.pop((s, mb))
                peer = self._rank_of[s - 1]
            transfers.append(Transfer(a.op in (SEND_F, SEND_B), t, peer, str(a)))
        works = self.p2p.post(transfers)
        for a, tr, work in zip(group, transfers, works):
            if tr.is_send:
                sends.append((work, tr.tensor))
            else:
                received[a] = (tr.tensor, work)

    def _take(self, received: dict[Action, tuple[Tensor, Any]], key: Action) -> Tensor:
        buf, work = received.pop(key)
        try:
            work.wait()
        except Exception as e:
            peer = self._rank_of[key.stage - 1 if key.op == RECV_F else key.stage + 1]
            raise RuntimeError(f"waiting for {key} from rank {peer}: {e}") from e
        return buf

    # -- compute ----------------------------------------------------------------------

    def _forward(
        self,
        a: Action,
        xs: Sequence[Tensor] | None,
        ys: Sequence[Tensor] | None,
        batch: int,
        inputs: dict[tuple[int, int], Tensor],
        outputs: dict[tuple[int, int], Tensor],
        received: dict[Action, tuple[Tensor, Any]],
        loss_total: Tensor | None,
    ) -> None:
        s, mb = a.stage, a.mb
        if s == 0:
            assert xs is not None, "the first stage needs the inputs"
            x = xs[mb]
        else:
            if self._rank_of[s - 1] == self.rank:
                x = outputs[(s - 1, mb)].detach()
            else:
                x = self._take(received, Action(s, RECV_F, mb))
            x.requires_grad_(True)
            inputs[(s, mb)] = x
        out = self.stages[s](x)
        if s == self.last:
            assert ys is not None and loss_total is not None, "the last stage needs the labels"
            loss = loss_sum(out, ys[mb], self.task) / batch
            loss_total += loss.detach().to(torch.float64)
            outputs[(s, mb)] = loss
        else:
            outputs[(s, mb)] = out

    def _backward(
        self,
        a: Action,
        inputs: dict[tuple[int, int], Tensor],
        outputs: dict[tuple[int, int], Tensor],
        grads: dict[tuple[int, int], Tensor],
        received: dict[Action, tuple[Tensor, Any]],
    ) -> None:
        s, mb = a.stage, a.mb
        out = outputs.pop((s, mb))
        if s == self.last:
            out.backward()
        else:
            if self._rank_of[s + 1] == self.rank:
                g = grads.pop((s + 1, mb))
            else:
                g = self._take(received, Action(s, RECV_B, mb))
            torch.autograd.backward(out, g)
        if s > 0:
            x = inputs.pop((s, mb))
            assert x.grad is not None
            grads[(s, mb)] = x.grad

    def _describe(self, item: object) -> str:
        if isinstance(item, tuple):
            parts = []
            for a in item:
                peer = self._rank_of[a.stage + 1 if a.op in (SEND_F, RECV_B) else a.stage - 1]
                parts.append(f"{a} ({'to' if a.op in (SEND_F, SEND_B) else 'from'} rank {peer})")
            return "transfer " + ", ".join(parts)
        if isinstance(item, Action) and item.op in (F, B):
            return f"action {item}"
        return str(item)


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
