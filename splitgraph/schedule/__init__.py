"""Schedules as data: generators -> lowered action lists -> validated before anything runs.

Every schedule is a generator `(ranks, stages, microbatches) -> compute actions per rank`,
registered in `SCHEDULES` with what it needs, so `validate(cfg)` can refuse an undefined
combination with a clear message before any process starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from splitgraph.schedule.gpipe import gpipe, looped_bfs, naive
from splitgraph.schedule.ir import Action, Op, Schedule, lower, make_schedule
from splitgraph.schedule.onefoneb import interleaved, one_f_one_b
from splitgraph.schedule.simulate import Costs, Deadlock, SimResult, render_ascii, simulate
from splitgraph.schedule.validate import validate
from splitgraph.schedule.zerobubble import zb1

__all__ = [
    "SCHEDULES",
    "Action",
    "Costs",
    "Deadlock",
    "Op",
    "Schedule",
    "ScheduleSpec",
    "SimResult",
    "build_schedule",
    "lower",
    "make_schedule",
    "render_ascii",
    "simulate",
    "validate",
]


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    generate: Callable[[int, int, int], list[list[Action]]]
    virtual: bool  # may hold several model chunks per rank (schedule.virtual_stages)
    split_backward: bool  # uses I and W instead of B
    summary: str

    def problems(self, ranks: int, virtual: int, microbatches: int) -> list[str]:
        """Why this schedule is undefined for (ranks, virtual stages, microbatches), if it is."""
        out = []
        if virtual < 1:
            out.append(f"schedule.virtual_stages={virtual} must be >= 1.")
        elif virtual > 1 and not self.virtual:
            chunked = ", ".join(s.name for s in SCHEDULES.values() if s.virtual)
            out.append(
                f"schedule={self.name} runs one stage per rank; schedule.virtual_stages="
                f"{virtual} needs one of: {chunked}."
            )
        if self.name == "naive" and microbatches != 1:
            out.append(
                f"schedule=naive runs the whole batch as one microbatch; got "
                f"pipeline.microbatches={microbatches}. Set pipeline.microbatches=1 or use "
                "schedule=gpipe / schedule=1f1b."
            )
        if self.name == "interleaved" and ranks > 1 and microbatches % ranks:
            lo = microbatches // ranks * ranks
            hint = f"{lo} or {lo + ranks}" if lo else f"{ranks}"
            out.append(
                f"schedule=interleaved sends microbatches round the {ranks} ranks in groups "
                f"of {ranks}: pipeline.microbatches={microbatches} must be a multiple of "
                f"{ranks} (e.g. {hint})."
            )
        return out


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("naive", naive, False, False, "the whole batch, one stage at a time"),
        ScheduleSpec("gpipe", gpipe, False, False, "all forwards, then all backwards"),
        ScheduleSpec("1f1b", one_f_one_b, False, False, "one forward, one backward"),
        ScheduleSpec("interleaved", interleaved, True, False, "1F1B over v chunks per rank"),
        ScheduleSpec("loopedbfs", looped_bfs, True, False, "GPipe over v chunks per rank"),
        ScheduleSpec("zb1", zb1, False, True, "zero-bubble ZB-H1: deferred weight gradients"),
    )
}


def build_schedule(
    name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1
) -> Schedule:
    """Generate, lower and validate the named schedule; stage s runs on rank s % ranks."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    spec = SCHEDULES[name]
    problems = spec.problems(num_ranks, virtual_stages, num_microbatches)
    if problems:
        raise ValueError(" ".join(problems))
    stages = num_ranks * virtual_stages
    compute = spec.generate(num_ranks, stages, num_microbatches)
    sched = make_schedule(name, compute, [s % num_ranks for s in range(stages)], num_microbatches)
    validate(sched)
    return sched
