"""The numerical guard: a NaN or infinity stops the run before it reaches the weights, naming
the step, stage and microbatch where it first appeared.

The executor calls `after(action, outputs, grads)` after every compute action. The guard only
*records* each tensor's minimum and maximum (`torch.aminmax`: one reduction, no allocation,
NaN propagates), so a check costs no device synchronisation; `finish()` tests all of the
step's extremes at once (one sync, at the step's end, where the loss is read anyway). A tensor
is finite exactly when its minimum and maximum are (`isfinite(t).all()` allocates a mask and
measured 5 to 20 times slower here).

Two levels (`runtime.nan_check`):

    step        every step: each microbatch's loss, and each stage's parameter gradients once.
                If anything is non-finite, train.py replays the step (the weights are still
                those of the last good step, the minibatch is a function of the step) with
                every check on, to name where it started. Free until something goes wrong.
    microbatch  every step, every check: each stage's output per microbatch (the loss on the
                last), the gradient it sends back, and its parameter gradients after each
                microbatch's backward (they accumulate, so the first microbatch that turned
                them non-finite is the culprit). For runs whose kernels are not deterministic
                enough for a replay to reproduce the failure. Costs up to a third of a step at
                small microbatches on CPU (results/reliability.md).

train.py sums the counts over the ranks with the loss; if any rank saw a non-finite value,
every rank raises the same `NonFiniteError` *before* the optimizer step: the weights keep
their last finite values and no checkpoint is written.

A NaN spreads: from stage 1's forward to every later stage and back through every backward.
`first_event` picks the origin by causality, not by clock: within a microbatch, forwards come
before backwards, a forward depends on the stage before it, a backward on the stage after it;
microbatches are independent within a step (the weights do not change until its end).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from splitgraph.errors import NonFiniteError
from splitgraph.model import StageModule
from splitgraph.schedule.ir import Action, B, F, I, W

Event = dict[str, Any]


class FiniteGuard:
    def __init__(self, stages: dict[int, StageModule], rank: int, full: bool) -> None:
        #: every check on every microbatch (runtime.nan_check=microbatch, or a replay)
        self.stages, self.rank, self.full = stages, rank, full
        self._params = {s: list(st.parameters()) for s, st in stages.items()}
        #: (stage, op, microbatch, what, first and past-the-end index into _values)
        self._flags: list[tuple[int, str, int | None, str, int, int]] = []
        self._values: list[Tensor] = []  # 0-d extremes, on the device
        self.events: list[Event] = []

    def _is_last(self, stage: int) -> bool:
        return self.stages[stage].is_last

    def begin(self) -> None:
        self._flags.clear()
        self._values.clear()
        self.events = []

    def _flag(self, stage: int, op: str, mb: int | None, what: str, ts: list[Tensor]) -> None:
        start = len(self._values)
        for t in ts:
            t = t.detach()
            self._values.extend((t,) if t.dim() == 0 else torch.aminmax(t))
        self._flags.append((stage, op, mb, what, start, len(self._values)))

    def after(
        self,
        a: Action,
        outputs: dict[tuple[int, int], Tensor],
        grads: dict[tuple[int, int], Tensor],
    ) -> None:
        """Record the extremes of what compute action `a` produced (no device sync)."""
        s, mb = a.stage, a.mb
        if a.op == F:
            out = outputs.get((s, mb))
            if out is not None and (self.full or self._is_last(s)):
                self._flag(s, "F", mb, "loss" if self._is_last(s) else "output", [out])
            return
        if not self.full:
            return
        if a.op in (B, I) and s > 0 and (s, mb) in grads:
            self._flag(s, a.op.value, mb, "input gradient", [grads[(s, mb)]])
        if a.op in (B, W):
            gs = [p.grad for p in self._params[s] if p.grad is not None]
            if gs:
                self._flag(s, a.op.value, mb, "parameter gradients", gs)

    def _finite_values(self) -> list[bool]:
        """isfinite of every recorded extreme: one stack and one sync per dtype."""
        ok = [True] * len(self._values)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, v in enumerate(self._values):
            by_dtype.setdefault(v.dtype, []).append(i)
        for idx in by_dtype.values():
            flags = torch.isfinite(torch.stack([self._values[i] for i in idx])).cpu().tolist()
            for i, f in zip(idx, flags):
                ok[i] = f
        return ok

    def finish(self) -> int:
        """Test the step's records (one sync); return how many non-finite values this rank saw."""
        if not self.full:  # parameter gradients once, at the end of the step
            for s, params in self._params.items():
                gs = [p.grad for p in params if p.grad is not None]
                if gs:
                    self._flag(s, "B", None, "parameter gradients", gs)
        if not self._flags:
            return 0
        ok = self._finite_values()
        merged: dict[tuple[int, str, int | None], Event] = {}
        for s, op, mb, what, start, stop in self._flags:
            if all(ok[start:stop]):
                continue
            ev = merged.setdefault(
                (s, op, mb), {"rank": self.rank, "stage": s, "op": op, "mb": mb, "what": []}
            )
            if what not in ev["what"]:
                ev["what"].append(what)
        for ev in merged.values():  # only on the rare path: name the parameters involved
            st = self.stages[ev["stage"]]
            ev["bad_weights"] = [n for n, p in st.named_parameters() if not _finite(p)]
            ev["bad_grads"] = [
                n for n, p in st.named_parameters() if p.grad is not None and not _finite(p.grad)
            ]
        self.events = list(merged.values())
        return len(self.events)


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def first_event(events: list[Event]) -> Event:
    """The causal origin: lowest microbatch; forwards before backwards; a forward's earliest
    stage; a backward's latest stage. Step-level events (no microbatch) come last."""

    def key(ev: Event) -> tuple[float, int, int]:
        mb = float("inf") if ev["mb"] is None else ev["mb"]
        return (mb, 0, ev["stage"]) if ev["op"] == "F" else (mb, 1, -ev["stage"])

    return min(events, key=key)


def _where(ev: Event) -> str:
    phase = "forward" if ev["op"] == "F" else "backward"
    mb = "" if ev["mb"] is None else f" of microbatch {ev['mb']}"
    return f"stage {ev['stage']}'s {phase}{mb} (rank {ev['rank']})"


def describe(
    step: int, events: list[Event], checkpoint_note: str | None, replay: str | None = None
) -> str:
    """One message, the same on every rank, for the events of all ranks. `checkpoint_note`:
    what is known of the last checkpoint (`checkpoint.integrity_note`: verified or not), None
    when there is none."""
    first = first_event(events)
    unknown = " (the microbatch is not known)"
    lines = [
        f"non-finite values at step {step}: first in {_where(first)}: its "
        + " and ".join(first["what"])
        + (unknown if first["mb"] is None else "")
        + "."
    ]
    if replay:
        lines.append(f"  ({replay})")
    if first["bad_weights"]:
        lines.append(f"  the stage's weights are themselves non-finite: {first['bad_weights']}")
    elif first["bad_grads"] and first["op"] != "F":
        lines.append(f"  non-finite parameter gradients: {first['bad_grads']}")
    rest = [ev for ev in events if ev is not first]
    if rest:
        shown = "; ".join(f"{_where(ev)}: {' and '.join(ev['what'])}" for ev in rest[:4])
        more = f" and {len(rest) - 4} more" if len(rest) > 4 else ""
        lines.append(f"  then (spread from it or independent): {shown}{more}")
    kept = checkpoint_note or "no checkpoint was written"
    lines.append(
        f"  The weights were not updated at step {step} and {kept}. Lower optim.lr, check "
        "the data, standardize it (data.standardize=all: inputs and regression targets, with "
        "the training split's mean and std), or try runtime.dtype=float64."
    )
    return "\n".join(lines)


def raise_if_any(
    step: int, events: list[Event], checkpoint_note: str | None, replay: str | None = None
) -> None:
    if events:
        raise NonFiniteError(describe(step, events, checkpoint_note, replay))
