"""Joint search: schedule x microbatches x recomputation x strategy, ranked under the cap.

Every candidate is priced by the same cost model as a single plan (planner.predict): the
simulator's step time and the exact memory prediction; `price` (cost/calibrate.py's `pricer`)
ranks them by the step priced in the run's conditions instead. Candidates that fit the memory
cap come first, then the faster, then the smaller; splits that several strategies agree
on are listed once with all their names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from splitgraph.config import Workload
from splitgraph.cost.costs import model_costs
from splitgraph.cost.link import Link
from splitgraph.errors import PartitionError
from splitgraph.partition import STRATEGIES as REGISTRY
from splitgraph.partition import Plan, costed_bounds, layer_specs, make_plan
from splitgraph.planner.predict import Prediction, predict
from splitgraph.units import format_bytes

#: Schedules searched (one stage per rank: the cost model prices a stage alone).
SCHEDULES: tuple[str, ...] = ("naive", "gpipe", "1f1b", "zb1")
#: Recomputation options searched (its memory rule: memory_model._apply).
RECOMPUTE: tuple[bool, ...] = (False, True)
#: Strategies searched: every registered one but those that need the user's cut points.
STRATEGIES: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if not s.user_cuts)


@dataclass
class Candidate:
    schedule: str
    microbatches: int
    recompute: bool
    strategies: list[str]
    prediction: Prediction | None = None
    error: str | None = None  # e.g. optimal: nothing fits
    why: str = ""
    key: tuple[Any, ...] = field(default=(), repr=False)
    #: the step as `search(price=...)` priced it (cost/calibrate.py); None: the simulator's
    priced_s: float | None = None

    @property
    def fits(self) -> bool:
        return self.prediction is not None and self.prediction.fits

    @property
    def step_s(self) -> float:
        """The step it is ranked by: priced (`search(price=...)`), else simulated."""
        p = self.prediction
        if p is None:
            return float("nan")
        return p.step_time if self.priced_s is None else self.priced_s

    def sort_key(self) -> tuple[Any, ...]:
        p = self.prediction
        if p is None:
            return (2, 0.0, 0)
        return (0 if p.fits else 1, self.step_s, p.peak_memory)

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {
            "schedule": self.schedule,
            "microbatches": self.microbatches,
            "recompute": self.recompute,
            "strategies": self.strategies,
            "bounds": list(p.plan.bounds) if p else None,
            "step_time_s": p.step_time if p else None,
            "priced_step_s": self.priced_s,
            "bubble": p.bubble if p else None,
            "peak_memory_bytes": p.peak_memory if p else None,
            "fits": self.fits,
            "error": self.error,
            "why": self.why,
        }


def microbatch_options(batch: int, current: int) -> list[int]:
    """Powers of two up to 64 (and the batch), plus the configured count."""
    out = {m for m in (1, 2, 4, 8, 16, 32, 64) if m <= batch} | {current}
    return sorted(out)


def _variant(work: Workload, schedule: str, m: int, recompute: bool, strategy: str) -> Workload:
    """`work` with another schedule, microbatch count, recomputation and strategy (copies of
    the three sections it changes; the rest shared)."""
    sched, pipe, part = (copy.deepcopy(x) for x in (work.schedule, work.pipeline, work.partition))
    sched.name = schedule
    sched.virtual_stages = 1  # the searched schedules hold one stage per rank
    pipe.microbatches = m
    part.strategy = strategy
    if not REGISTRY[strategy].user_cuts:
        part.boundaries = None
    if recompute:
        sched.recompute = True
    return replace(work, schedule=sched, pipeline=pipe, partition=part)


def search(
    work: Workload,
    stages: int,
    link: Link,
    device: Any = "cpu",
    price: Callable[[Prediction], float] | None = None,
) -> list[Candidate]:
    """Every candidate, best first; `price`: the step each is ranked by (default the
    simulator's; `cost.calibrate.pricer` prices it in the run's conditions)."""
    strategies = list(STRATEGIES)
    own = REGISTRY.get(work.partition.strategy)
    if own is not None and own.user_cuts:  # the user's cut points: one more candidate
        strategies.append(own.name)
    batch = work.batch_size
    found: dict[tuple[Any, ...], Candidate] = {}
    for schedule in SCHEDULES:
        counts = [1] if schedule == "naive" else [m for m in microbatch_options(batch, 2) if m > 1]
        if schedule != "naive" and work.pipeline.microbatches > 1:
            counts = sorted(set(counts) | {work.pipeline.microbatches})
        for m in counts:
            for recompute in RECOMPUTE:
                base = _variant(work, schedule, m, recompute, "uniform")
                costs = model_costs(base, stages, link=link, device=device)
                for strategy in strategies:
                    c = _variant(work, schedule, m, recompute, strategy)
                    try:
                        if REGISTRY[strategy].costed:
                            bounds = costed_bounds(strategy, c, stages, costs, check=False)
                            plan = Plan(layer_specs(c.model), bounds, strategy, stages)
                        else:
                            plan = make_plan(c, stages)
                    except PartitionError as e:
                        key = (schedule, m, recompute, strategy)
                        found[key] = Candidate(schedule, m, recompute, [strategy], None, str(e))
                        continue
                    key = (schedule, m, recompute, plan.bounds)
                    if key in found:
                        found[key].strategies.append(strategy)
                    else:
                        pred = predict(plan, costs)
                        found[key] = Candidate(schedule, m, recompute, [strategy], pred, key=key)
                        if price is not None:
                            found[key].priced_s = price(pred)
    ranked = sorted(found.values(), key=Candidate.sort_key)
    _explain(ranked)
    return ranked


def _explain(ranked: list[Candidate]) -> None:
    best = next((c for c in ranked if c.prediction is not None), None)
    for c in ranked:
        p = c.prediction
        if p is None:
            c.why = (c.error or "").splitlines()[0]
            continue
        busiest = max(range(len(p.stages)), key=p.share)
        heaviest = max(p.stages, key=lambda s: s.memory_bytes)
        parts = [
            f"bubble {p.bubble:.0%}, busiest stage {busiest} at {p.share(busiest):.0%} of the step",
            f"peak {format_bytes(heaviest.memory_bytes)} on stage {heaviest.stage}",
        ]
        if not p.fits:
            over = [s for s in p.stages if s.cap_bytes is not None and s.memory_bytes > s.cap_bytes]
            parts.append(
                f"over the cap on stage {over[0].stage} by "
                f"{format_bytes(over[0].memory_bytes - (over[0].cap_bytes or 0))}"
            )
        if best is not None and best.prediction is not None and c is not best:
            b = best.prediction
            parts.append(
                f"{c.step_s / best.step_s - 1:+.0%} time and "
                f"{p.peak_memory / b.peak_memory - 1:+.0%} peak memory vs #1"
            )
        elif c is best:
            parts.append("fastest that fits" if c.fits else "fastest (nothing fits)")
        c.why = "; ".join(parts)


def table(ranked: list[Candidate], top: int) -> str:
    rows = [("#", "schedule", "m", "recompute", "strategies", "split", "step ms", "peak", "fits")]
    for i, c in enumerate(ranked[:top], 1):
        p = c.prediction
        rows.append(
            (
                str(i),
                c.schedule,
                str(c.microbatches),
                "yes" if c.recompute else "no",
                "=".join(c.strategies),
                str(list(p.plan.bounds)) if p else "-",
                f"{c.step_s * 1e3:.3f}" if p else "-",
                format_bytes(p.peak_memory) if p else "-",
                "yes" if c.fits else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("why:")
    lines += [f"  {i}. {c.why}" for i, c in enumerate(ranked[:top], 1)]
    return "\n".join(lines)
