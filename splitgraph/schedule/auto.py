"""`schedule=auto`: the schedule that simulates fastest for this run's costs, within its memory.

A small search, every candidate simulated with the run's costs:

* every fixed schedule defined for the run's ranks, chunks and microbatches (`SCHEDULES`:
  gpipe, 1f1b, zb1, zb2; with two chunks per rank also interleaved, loopedbfs, zbv, vhalf,
  vmin), built as the trainer would build it;
* list schedules (listsched.py) with the run's own costs, for each placement the chunks
  allow (one stage per rank; round-robin; the V with two chunks; a rank's chunks back to
  back, which runs one-stage-per-rank orders in their bytes), with a full, a split or
  a memory-tight backward (B where a deferred W would block the next admission), under a
  ladder of activation caps (1, 2, p/2, p, 2p-1, 2p and m microbatches admitted per rank,
  and the run's own cap where it is in activation units), both reservations (a
  microbatch's later chunks, or room for one) and both tie-breaks. Given the exact bytes
  (`AutoInput.weights`, `static`: ModelCosts.auto_input), the ladder is in bytes and the
  run's cap less each rank's static bytes is a rung (and 1.25x it: the scheduler's count
  errs high, and the exact memory model decides what fits).

A candidate fits if `memory(schedule)` is within `cap` on every rank; the winner is the
fitting candidate with the shortest simulated step (then the smaller peak, then the
simpler: fixed before list-built). The fixed schedules are validated as they are built;
a list schedule is valid by construction (tests validate every one over a grid of
placements, caps and policies), and the winner is validated again before it is returned.
The fixed schedules are candidates, so auto is never
slower in the simulator than the best fixed schedule that fits: `AutoResult.table()` shows
each one's step and peak beside the winner's, which is what `splitgraph-schedule
schedule=auto` prints.

Memory is whatever `AutoInput.memory` returns per rank: by default `peak_activation`
(activations held, in whole-model microbatches: 1F1B's first rank holds 1), or the exact
saved bytes of a real model (memory_model.predict_saved_peak; see costs.ModelCosts.
auto_input) with `cap` in bytes.

3 ranks, 5 microbatches, F = I = W = 1 and a transfer costs 1, room for 1.5x 1F1B's
activations: zb2 (1.67) does not fit; the best fixed schedule that does, zb1, takes 25;
auto's list schedule takes 23, holding 1.33 (`splitgraph-schedule auto pipeline.stages=3
pipeline.microbatches=5 --costs 1,2,1 --comm 1 --cap 1.5`)::

    zb1      rank 0 | F0 F1 F2 .  .  .  .  .  .  I0 W0 F3 I1 W1 F4 .  I2 W2 .  .  I3 W3 .  I4 W4
             rank 1 | .  .  F0 F1 .  .  .  I0 F2 I1 W0 .  .  F3 I2 W1 F4 .  I3 W2 .  I4 W3 W4 .
             rank 2 | .  .  .  .  F0 I0 F1 I1 .  .  F2 I2 W0 .  .  F3 I3 W1 F4 I4 W2 W3 W4 .  .

    auto     rank 0 | F0 F1 F2 F3 .  .  .  .  .  I0 W0 I1 F4 I2 W1 I3 W2 W3 .  .  .  I4 W4
             rank 1 | .  .  F0 F1 F2 F3 .  I0 W0 I1 W1 I2 W2 I3 F4 W3 .  .  .  I4 W4 .  .
             rank 2 | .  .  .  .  F0 I0 F1 I1 F2 I2 F3 I3 W0 W1 W2 W3 F4 I4 W4 .  .  .  .

          AutoInput(ranks, m, v, costs, cap, memory)
                      |
      fixed schedules + list schedules  ->  validate, simulate, memory
                      |
          fastest that fits  ->  AutoResult(schedule, candidates)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitgraph.schedule.ir import Schedule, make_schedule, round_robin, v_shape
from splitgraph.schedule.listsched import Policy, list_schedule
from splitgraph.schedule.simulate import Costs, peak_activation, simulate
from splitgraph.schedule.validate import validate

Memory = Callable[[Schedule], Sequence[float]]


@dataclass(frozen=True)
class AutoInput:
    """What auto builds from: the run's shape, per-stage costs and each rank's memory cap.

    `costs` has one entry per stage (ranks x virtual); give `backward_input` and `weight`
    when known (I + W is often slower than B: auto weighs a split backward against a full
    one). `cap`: per rank (or one number for all) in `memory`'s unit; None: no cap.
    `memory`: per-rank peak of a schedule; default `peak_activation` (whole-model
    microbatches). `unit` names that unit in the tables. `weights` and `static` (per stage,
    in `memory`'s unit; with a `memory` of exact bytes): what one microbatch of a stage
    holds at most between its F and its W, and what the stage holds whatever the schedule
    (parameters, gradients, optimizer state); the list scheduler then admits microbatches
    against each rank's cap less its static bytes, in bytes.
    """

    ranks: int
    microbatches: int
    costs: Costs
    virtual: int = 1
    cap: float | Sequence[float] | None = None
    memory: Memory | None = None
    unit: str = "model-microbatches"
    weights: Sequence[float] | None = None
    static: Sequence[float] | None = None

    @property
    def num_stages(self) -> int:
        return self.ranks * self.virtual

    def caps(self) -> tuple[float, ...] | None:
        if self.cap is None:
            return None
        if isinstance(self.cap, (int, float)):
            return (float(self.cap),) * self.ranks
        caps = tuple(float(c) for c in self.cap)
        if len(caps) != self.ranks:
            raise ValueError(f"AutoInput.cap has {len(caps)} entries for {self.ranks} ranks")
        return caps

    def peaks(self, sched: Schedule) -> tuple[float, ...]:
        return tuple(float(x) for x in (self.memory or peak_activation)(sched))

    def check(self) -> None:
        if self.ranks < 1 or self.microbatches < 1 or self.virtual < 1:
            raise ValueError(
                f"AutoInput: ranks={self.ranks}, microbatches={self.microbatches} and "
                f"virtual={self.virtual} must all be >= 1"
            )
        n = len(self.costs.forward)
        if n != self.num_stages or len(self.costs.backward) != n:
            raise ValueError(
                f"AutoInput.costs has {n} forward and {len(self.costs.backward)} backward "
                f"costs; the run has {self.ranks} ranks x {self.virtual} chunks = "
                f"{self.num_stages} stages"
            )


@dataclass(frozen=True)
class Candidate:
    """One schedule auto considered: its simulated step and per-rank memory peak."""

    name: str  # a fixed schedule's name, or "list <placement> <B|I+W> cap <k> <tie-break>"
    fixed: bool
    schedule: Schedule
    step_time: float
    bubble: float
    peak: tuple[float, ...]
    fits: bool

    def key(self) -> tuple[float, float, int]:
        return (round(self.step_time, 12), round(max(self.peak), 12), 0 if self.fixed else 1)


@dataclass(frozen=True)
class AutoResult:
    schedule: Schedule  # the winner, named "auto (<its candidate name>)"
    chosen: Candidate
    candidates: list[Candidate] = field(repr=False)
    unit: str = "model-microbatches"
    caps: tuple[float, ...] | None = None

    def best_fixed(self) -> Candidate | None:
        """The fastest fixed schedule that fits the caps (None if none does)."""
        fits = [c for c in self.candidates if c.fixed and c.fits]
        return min(fits, key=Candidate.key) if fits else None

    def table(self) -> str:
        """Auto's winner against every fixed schedule: step, bubble, peak, fits."""
        rows = [("schedule", "step", "vs auto", "bubble", f"peak ({self.unit})", "fits")]
        chosen = self.chosen
        others = (c for c in self.candidates if c.fixed and c is not chosen)
        fixed = sorted(others, key=Candidate.key)
        for c in [chosen, *fixed]:
            label = f"auto = {c.name}" if c is chosen else c.name
            ratio = c.step_time / chosen.step_time if chosen.step_time > 0 else 1.0
            rows.append(
                (
                    label,
                    f"{c.step_time:.6g}",
                    f"{ratio:.3f}x",
                    f"{c.bubble:.1%}",
                    f"{max(c.peak):.4g}",
                    "yes" if c.fits else "no",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        cap = "no cap" if self.caps is None else "cap " + " ".join(f"{c:.4g}" for c in self.caps)
        listed = sum(1 for c in self.candidates if not c.fixed)
        best = self.best_fixed()
        why = (
            f"auto is {best.step_time / chosen.step_time:.3f}x faster than the best fixed "
            f"schedule that fits ({best.name})"
            if best is not None and chosen.step_time < best.step_time
            else "no list schedule beats the best fixed one; auto runs it"
            if best is not None
            else "no fixed schedule fits the cap; a list schedule does"
        )
        head = f"schedule=auto ({cap}; {listed} list schedules tried): {why}"
        return head + "\n" + "\n".join(lines)


def plan_auto(inp: AutoInput) -> AutoResult:
    """The fastest validated schedule that fits the caps (see the module docstring)."""
    from splitgraph.schedule import SCHEDULES, build_schedule

    inp.check()
    caps = inp.caps()
    p, m, v = inp.ranks, inp.microbatches, inp.virtual
    out: list[Candidate] = []

    def consider(name: str, sched: Schedule, fixed: bool) -> None:
        sim = simulate(sched, inp.costs)
        peak = inp.peaks(sched)
        fits = caps is None or all(x <= c * (1 + 1e-9) for x, c in zip(peak, caps))
        out.append(Candidate(name, fixed, sched, sim.step_time, sim.bubble_fraction, peak, fits))

    for name, spec in SCHEDULES.items():
        if spec.generate is not None and not spec.problems(p, v, m):
            consider(name, build_schedule(name, p, m, v), True)
    for name, sched in _list_candidates(inp, caps):
        consider(name, sched, False)
    fitting = [c for c in out if c.fits]
    if not fitting:
        least = min(out, key=lambda c: max(c.peak))
        shown = sorted({f"{c:.4g}" for c in caps or ()})
        raise ValueError(
            f"schedule=auto: no schedule fits the cap ({', '.join(shown)} {inp.unit} per rank)"
            f" with {m} microbatches on {p} ranks x {v} chunks; the "
            f"least memory is {least.name}'s {max(least.peak):.4g}. Raise the cap, use more "
            "stages or smaller microbatches, or recompute (schedule.recompute=true)."
        )
    best = min(fitting, key=Candidate.key)
    validate(best.schedule)  # the fixed ones were; a list schedule is valid by construction,
    named = Schedule(  # and this proves it for the one that runs
        f"auto ({best.name})",
        best.schedule.num_stages,
        best.schedule.num_microbatches,
        best.schedule.stage_to_rank,
        best.schedule.actions,
    )
    return AutoResult(named, best, out, inp.unit, caps)


def _ladder(
    inp: AutoInput, place: Sequence[int], caps: tuple[float, ...] | None
) -> list[tuple[str, tuple[float, ...], tuple[float, ...] | None]]:
    """(label, cap per rank, weight per stage) for the list scheduler on one placement: k
    microbatches admitted per rank (k = 1, 2, p/2, p, 2p-1, 2p, m), and the run's own cap
    where it converts (activation units; or bytes less each rank's static bytes, given
    `weights`)."""
    p, m, v = inp.ranks, inp.microbatches, inp.virtual
    admitted = sorted({1, 2, max(1, p // 2), p, 2 * p - 1, 2 * p, m} & set(range(1, m + 1)))
    if inp.weights is None:
        ladder = [(f"{k}mb", (float(k * v),) * p, None) for k in admitted]
        if caps is not None and inp.memory is None:  # the run's cap is in activation units
            ladder.append(("cap", tuple(float(int(c * inp.num_stages + 1e-9)) for c in caps), None))
        return ladder
    weight = tuple(float(x) for x in inp.weights)
    need = _per_rank(weight, place, p)
    out: list[tuple[str, tuple[float, ...], tuple[float, ...] | None]] = [
        (f"{k}mb", tuple(k * n for n in need), weight) for k in admitted
    ]
    if caps is not None:
        static = _per_rank(inp.static or (0.0,) * inp.num_stages, place, p)
        room = [c - held for c, held in zip(caps, static)]
        if all(x > 0 for x in room):  # and a little over: the scheduler's count errs high
            for over in (1.0, 1.25):
                out.append((f"cap x{over:g}", tuple(x * over for x in room), weight))
    return out


def _never_binds(
    place: Sequence[int], m: int, cap: tuple[float, ...], weight: tuple[float, ...] | None
) -> bool:
    """Whether every rank can hold all m microbatches under `cap` (no admission refused)."""
    need = _per_rank(weight or (1.0,) * len(place), place, len(cap))
    return all(m * n <= c for n, c in zip(need, cap))


def _per_rank(per_stage: Sequence[float], place: Sequence[int], ranks: int) -> list[float]:
    """The sum over the stages `place` puts on each rank."""
    return [sum(x for x, q in zip(per_stage, place) if q == r) for r in range(ranks)]


def _list_candidates(inp: AutoInput, caps: tuple[float, ...] | None) -> list[tuple[str, Schedule]]:
    """List schedules for each placement, backward kind, cap, reservation and tie-break
    (deduplicated)."""
    p, m, v, S = inp.ranks, inp.microbatches, inp.virtual, inp.num_stages
    placements = [("round-robin" if v > 1 else "1/rank", round_robin(p, S))]
    if v == 2 and p > 1:
        placements.append(("V", v_shape(p, S)))
    if v > 1 and p > 1:  # a rank's chunks back to back: one stage per rank, in effect
        placements.append(("contiguous", tuple(s // v for s in range(S))))
    seen: set[tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]] = set()
    out = []
    for where, place in placements:
        for (split, tight), (label, cap, weight), reserve, late_b, late_f in itertools.product(
            ((True, False), (True, True), (False, False)),
            _ladder(inp, place, caps),
            (True, False),
            (True, False),
            (True, False),
        ):
            if v == 1 and not (late_f and reserve):
                continue  # one stage per rank: nothing later to reserve, no forward tie to break
            if (tight or not reserve) and _never_binds(place, m, cap, weight):
                continue  # the same schedule as the plain policy's
            if where == "contiguous" and not (reserve and late_f):
                continue  # a rank's chunks run back to back: nothing to reserve or break
            policy = Policy(cap, split, weight, late_b, late_f, reserve, tight)
            rows = list_schedule(place, m, inp.costs, policy)
            if rows is None:
                continue
            key = (place, tuple(tuple(map(str, r)) for r in rows))
            if key in seen:
                continue
            seen.add(key)
            kind = "I+W/B" if tight else "I+W" if split else "B"
            ties = ("late" if late_b else "early") + (
                "" if v == 1 else "/late" if late_f else "/early"
            )
            held = "" if reserve else " one-later"
            sched = make_schedule(f"list {where} {kind} {label}", rows, place, m)
            out.append((f"list {where} {kind} {label}{held} {ties}", sched))
    return out
