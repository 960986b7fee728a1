"""The numerical guard: a NaN or infinity stops the run before it reaches the weights, naming
the step, stage and microbatch where it first appeared.

The executor calls `after(action, outputs, grads)` after every compute action. The guard only
*records* `isfinite(...).all()` as a device tensor, so a check costs a reduction and no device
synchronisation; `finish()` reads all of the step's flags at once (one sync, at the step's end,
where the loss is read anyway). train.py then sums the counts over the ranks with the loss, and
if any rank saw a non-finite value every rank raises the same `NonFiniteError` *before* the
optimizer step: the weights keep their last finite values and no checkpoint is written.

What is checked (`runtime.nan_check`):

    microbatch  F: each stage's output (the loss on the last stage), per microbatch
                B: the gradient sent back to the previous stage, and the stage's parameter
                   gradients after this microbatch's backward (they accumulate, so the first
                   microbatch whose backward turned them non-finite is the culprit)
    step        the per-microbatch losses, and each stage's parameter gradients once

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
    def __init__(self, stages: dict[int, StageModule], rank: int, per_microbatch: bool) -> None:
        self.stages, self.rank, self.per_microbatch = stages, rank, per_microbatch
        self._flags: list[tuple[int, str, int | None, str, Tensor]] = []
        self.events: list[Event] = []

    def _is_last(self, stage: int) -> bool:
        return self.stages[stage].is_last

    def begin(self) -> None:
        self._flags.clear()
        self.events = []

    def _flag(self, stage: int, op: str, mb: int | None, what: str, ts: list[Tensor]) -> None:
        flag = torch.stack([torch.isfinite(t.detach()).all() for t in ts]).all()
        self._flags.append((stage, op, mb, what, flag))

    def after(
        self,
        a: Action,
        outputs: dict[tuple[int, int], Tensor],
        grads: dict[tuple[int, int], Tensor],
    ) -> None:
        """Record the finiteness of what compute action `a` produced (no device sync)."""
        s, mb = a.stage, a.mb
        if a.op == F:
            out = outputs.get((s, mb))
            if out is not None and (self.per_microbatch or self._is_last(s)):
                self._flag(s, "F", mb, "loss" if self._is_last(s) else "output", [out])
            return
        if not self.per_microbatch:
            return
        if a.op in (B, I) and s > 0 and (s, mb) in grads:
            self._flag(s, a.op.value, mb, "input gradient", [grads[(s, mb)]])
        if a.op in (B, W):
            gs = [p.grad for p in self.stages[s].parameters() if p.grad is not None]
            if gs:
                self._flag(s, a.op.value, mb, "parameter gradients", gs)

    def finish(self) -> int:
        """Read the step's flags (one sync); return how many non-finite values this rank saw."""
        if not self.per_microbatch:  # parameter gradients once, at the end of the step
            for s, st in self.stages.items():
                gs = [p.grad for p in st.parameters() if p.grad is not None]
                if gs:
                    self._flag(s, "B", None, "parameter gradients", gs)
        if not self._flags:
            return 0
        ok = torch.stack([f[-1] for f in self._flags]).cpu().tolist()
        merged: dict[tuple[int, str, int | None], Event] = {}
        for (s, op, mb, what, _), fine in zip(self._flags, ok):
            if fine:
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


def describe(step: int, events: list[Event], last_checkpoint: str | None) -> str:
    """One message, the same on every rank, for the events of all ranks."""
    first = first_event(events)
    unknown = " (the microbatch is not known with runtime.nan_check=step)"
    lines = [
        f"non-finite values at step {step}: first in {_where(first)}: its "
        + " and ".join(first["what"])
        + (unknown if first["mb"] is None else "")
        + "."
    ]
    if first["bad_weights"]:
        lines.append(f"  the stage's weights are themselves non-finite: {first['bad_weights']}")
    elif first["bad_grads"]:
        lines.append(f"  non-finite parameter gradients: {first['bad_grads']}")
    rest = [ev for ev in events if ev is not first]
    if rest:
        shown = "; ".join(f"{_where(ev)}: {' and '.join(ev['what'])}" for ev in rest[:4])
        more = f" and {len(rest) - 4} more" if len(rest) > 4 else ""
        lines.append(f"  then (spread from it or independent): {shown}{more}")
    kept = (
        f"the last checkpoint, {last_checkpoint}, is untouched"
        if last_checkpoint
        else ("no checkpoint was written")
    )
    lines.append(
        f"  The weights were not updated at step {step} and {kept}. Lower optim.lr, check "
        "the data, or try runtime.dtype=float64."
    )
    return "\n".join(lines)


def raise_if_any(step: int, events: list[Event], last_checkpoint: str | None) -> None:
    if events:
        raise NonFiniteError(describe(step, events, last_checkpoint))
