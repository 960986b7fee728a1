"""Schedules as data: generators -> lowered action lists -> validated before anything runs.

Every schedule is a generator `(ranks, stages, microbatches) -> compute actions per rank`,
registered in `SCHEDULES` with its stage placement and the rules that say when it is
defined, so `validate(cfg)` can refuse an undefined combination with a clear message before
any process starts. Two entries have no generator: `auto` is built from the run's costs and
memory caps (auto.py), `csv` is read from a torch.distributed.pipelining schedule file
(interop.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitgraph.schedule.gpipe import gpipe, looped_bfs, naive
from splitgraph.schedule.ir import Action, Op, Schedule, lower, make_schedule, round_robin, v_shape
from splitgraph.schedule.onefoneb import interleaved, one_f_one_b
from splitgraph.schedule.simulate import Costs, Deadlock, SimResult, render_ascii, simulate
from splitgraph.schedule.validate import validate
from splitgraph.schedule.vshape import vhalf, vmin, zbv
from splitgraph.schedule.zerobubble import zb1, zb2

if TYPE_CHECKING:
    from splitgraph.schedule.auto import AutoInput

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
    "placement_of",
    "render_ascii",
    "simulate",
    "validate",
]

#: (ranks, stages, microbatches) -> compute actions per rank
Generator = Callable[[int, int, int], list[list[Action]]]
#: (ranks, stages) -> stage_to_rank
Placement = Callable[[int, int], tuple[int, ...]]
#: (ranks, virtual stages, microbatches) -> why the schedule is undefined there, or None
Rule = Callable[[int, int, int], "str | None"]
#: (ranks, microbatches, virtual stages, path, auto input) -> a validated schedule
Loader = Callable[[int, int, int, "str | None", "AutoInput | None"], Schedule]


def _one_microbatch(ranks: int, virtual: int, microbatches: int) -> str | None:
    if microbatches == 1:
        return None
    return (
        f"schedule=naive runs the whole batch as one microbatch; got "
        f"pipeline.microbatches={microbatches}. Set pipeline.microbatches=1 or use "
        "schedule=gpipe / schedule=1f1b."
    )


def _two_chunks(name: str) -> Rule:
    def rule(ranks: int, virtual: int, microbatches: int) -> str | None:
        if virtual == 2:
            return None
        return (
            f"schedule={name} holds two chunks per rank in a V (stage s and stage 2p-1-s on "
            f"rank s); got schedule.virtual_stages={virtual}. Set schedule.virtual_stages=2."
        )

    return rule


def _build_csv(
    ranks: int, microbatches: int, virtual: int, path: str | None, auto: AutoInput | None
) -> Schedule:
    from splitgraph.schedule.interop import load_csv

    if path is None:
        raise ValueError("schedule=csv reads its actions from a file: set schedule.path=FILE.csv")
    return load_csv(path, num_ranks=ranks, num_microbatches=microbatches, virtual=virtual)


def _build_auto(
    ranks: int, microbatches: int, virtual: int, path: str | None, auto: AutoInput | None
) -> Schedule:
    from splitgraph.schedule.auto import plan_auto

    if auto is None:
        raise ValueError(
            "schedule=auto builds a schedule from the run's costs and memory caps: pass an "
            "auto.AutoInput (splitgraph-schedule takes them from --costs/--from-run and --cap)"
        )
    want = (ranks, microbatches, virtual)
    have = (auto.ranks, auto.microbatches, auto.virtual)
    if want != have:
        raise ValueError(f"schedule=auto: the AutoInput is for (ranks, m, v) = {have}, not {want}")
    return plan_auto(auto).schedule


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    generate: Generator | None  # None: built from an input (auto: costs and caps; csv: a file)
    virtual: bool  # may hold several model chunks per rank (schedule.virtual_stages)
    split_backward: bool  # uses I and W instead of B (auto and csv: see Schedule.split_backward)
    summary: str
    placement: Placement = round_robin  # auto and csv: whatever the built schedule says
    rules: tuple[Rule, ...] = ()
    load: Loader | None = None  # how a schedule without a generator is built

    def problems(self, ranks: int, virtual: int, microbatches: int) -> list[str]:
        """Why this schedule is undefined for (ranks, virtual stages, microbatches), if it is."""
        out = []
        if virtual < 1:
            out.append(f"schedule.virtual_stages={virtual} must be >= 1.")
        elif virtual > 1 and not self.virtual:
            chunked = ", ".join(s.name for s in SCHEDULES.values() if s.virtual and s.generate)
            out.append(
                f"schedule={self.name} runs one stage per rank; schedule.virtual_stages="
                f"{virtual} needs one of: {chunked}."
            )
        out += [msg for rule in self.rules if (msg := rule(ranks, virtual, microbatches))]
        return out


def _gen(
    name: str,
    generate: Generator,
    virtual: bool,
    split: bool,
    summary: str,
    placement: Placement = round_robin,
    rules: tuple[Rule, ...] = (),
) -> ScheduleSpec:
    return ScheduleSpec(name, generate, virtual, split, summary, placement, rules)


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        _gen(
            "naive",
            naive,
            False,
            False,
            "the whole batch, one stage at a time",
            rules=(_one_microbatch,),
        ),
        _gen("gpipe", gpipe, False, False, "all forwards, then all backwards"),
        _gen("1f1b", one_f_one_b, False, False, "one forward, one backward"),
        _gen("interleaved", interleaved, True, False, "1F1B over v chunks per rank"),
        _gen("loopedbfs", looped_bfs, True, False, "GPipe over v chunks per rank"),
        _gen("zb1", zb1, False, True, "zero-bubble ZB-H1: deferred weight gradients"),
        _gen("zb2", zb2, False, True, "zero-bubble ZB-H2: no idle in the span, ~2x memory"),
        _gen(
            "zbv",
            zbv,
            True,
            True,
            "zero-bubble ZB-V: two chunks in a V, 1F1B's memory",
            v_shape,
            (_two_chunks("zbv"),),
        ),
        _gen(
            "vhalf",
            vhalf,
            True,
            True,
            "V-Half: V chunks, about half 1F1B's activations",
            v_shape,
            (_two_chunks("vhalf"),),
        ),
        _gen(
            "vmin",
            vmin,
            True,
            True,
            "V-Min block: V chunks, half 1F1B's activations",
            v_shape,
            (_two_chunks("vmin"),),
        ),
        ScheduleSpec(
            "auto",
            None,
            True,
            False,
            "built for the run's costs and memory caps",
            load=_build_auto,
        ),
        ScheduleSpec(
            "csv",
            None,
            True,
            False,
            "a torch.distributed.pipelining schedule file",
            load=_build_csv,
        ),
    )
}


def placement_of(
    name: str, num_ranks: int, virtual_stages: int = 1, *, path: str | None = None
) -> tuple[int, ...] | None:
    """The stage-to-rank map the named schedule runs with, known before it is built.

    Generated schedules carry it in their spec (round robin, or `ir.v_shape` for the V
    schedules); schedule=csv reads it from the file (the rank whose row holds a stage);
    schedule=auto chooses it with the order, from the run's costs, so None here (the
    engine takes it from the built schedule). An unknown name or an unreadable file: None
    (config.validate names those)."""
    spec = SCHEDULES.get(name)
    if spec is None:
        return None
    stages = num_ranks * max(virtual_stages, 1)
    if spec.generate is not None:
        return spec.placement(num_ranks, stages)
    if name == "csv" and path is not None:
        from splitgraph.schedule.interop import csv_placement

        return csv_placement(path)
    return None


def build_schedule(
    name: str,
    num_ranks: int,
    num_microbatches: int,
    virtual_stages: int = 1,
    *,
    path: str | None = None,
    auto: AutoInput | None = None,
) -> Schedule:
    """Generate, lower and validate the named schedule, with its spec's stage placement.

    `path`: the CSV file of schedule=csv; `auto`: the costs and caps schedule=auto builds
    from (auto.AutoInput). The other schedules need neither.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    spec = SCHEDULES[name]
    problems = spec.problems(num_ranks, virtual_stages, num_microbatches)
    if problems:
        raise ValueError(" ".join(problems))
    if spec.generate is None:
        assert spec.load is not None, f"{name} has neither a generator nor a loader"
        return spec.load(num_ranks, num_microbatches, virtual_stages, path, auto)
    stages = num_ranks * virtual_stages
    compute = spec.generate(num_ranks, stages, num_microbatches)
    sched = make_schedule(name, compute, spec.placement(num_ranks, stages), num_microbatches)
    validate(sched)
    return sched
