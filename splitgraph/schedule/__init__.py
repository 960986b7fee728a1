"""Schedules as data: generators -> lowered action lists -> validated before anything runs."""

from __future__ import annotations

from collections.abc import Callable

from splitgraph.schedule.gpipe import gpipe, naive
from splitgraph.schedule.ir import Action, Op, Schedule, lower, make_schedule
from splitgraph.schedule.onefoneb import one_f_one_b
from splitgraph.schedule.simulate import Costs, Deadlock, SimResult, render_ascii, simulate
from splitgraph.schedule.validate import validate

__all__ = [
    "GENERATORS",
    "Action",
    "Costs",
    "Deadlock",
    "Op",
    "Schedule",
    "SimResult",
    "build_schedule",
    "lower",
    "make_schedule",
    "render_ascii",
    "simulate",
    "validate",
]

#: schedule name -> generator of compute actions per rank, for one stage per rank.
GENERATORS: dict[str, Callable[[int, int], list[list[Action]]]] = {
    "naive": naive,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def build_schedule(name: str, num_stages: int, num_microbatches: int) -> Schedule:
    """Generate, lower and validate the named schedule (one stage per rank)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(GENERATORS)}")
    compute = GENERATORS[name](num_stages, num_microbatches)
    sched = make_schedule(name, compute, list(range(num_stages)), num_microbatches)
    validate(sched)
    return sched
