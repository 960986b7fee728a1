"""`splitgraph-schedule`: simulate a schedule and draw its timeline, before running anything.

    splitgraph-schedule schedule=1f1b pipeline.stages=4 pipeline.microbatches=8
    splitgraph-schedule schedule=zb1 pipeline.stages=4 pipeline.microbatches=8 --costs 1,2,1
    splitgraph-schedule schedule=interleaved pipeline.stages=4 pipeline.microbatches=8 --out i.png
    splitgraph-schedule schedule=zb1 pipeline.stages=2 --from-run outputs/demo   # measured costs
    splitgraph-schedule schedule=interleaved pipeline.stages=2 --dp 4 --allreduce 3
    splitgraph-schedule schedule=1f1b pipeline.stages=2 --from-run RUN --dp 4 --dp-bandwidth 40

    splitgraph-schedule zbv pipeline.stages=4 pipeline.microbatches=8 --to-csv zbv.csv
    splitgraph-schedule auto pipeline.stages=4 schedule.virtual_stages=2 --cap 0.75
    splitgraph-schedule schedule=csv schedule.path=zbv.csv            # a torch.pp CSV file

Hydra overrides choose the schedule exactly as for training (`pipeline.stages` is the number
of ranks; `schedule.virtual_stages` the chunks per rank); a bare first word names the
schedule (`zbv` is `schedule=zbv`). Costs are unit costs per stage,
`--costs F,B[,W]` (default 1,2,1: a backward is twice a forward, W half of it), plus `--comm`
per transfer; or the costs a run measured (`--from-run RUN_DIR`, its summary.json). Prints the
picture in text, step time, bubble and peak in-flight microbatches per stage, and writes a PNG.

`--dp D` adds the data-parallel gradient all-reduce of D replicas (schedule/allreduce.py):
either `--allreduce T`, each stage's all-reduce in the costs' own unit, or, with costs in
seconds (`--from-run`), `--dp-bandwidth GB/s [--dp-latency-us]`, from which each stage's
all-reduce is the ring time of its gradient bytes (the plan's parameters x runtime.dtype).
`schedule=auto` builds the fastest schedule that fits `--cap` (activations per rank, in
whole-model microbatches: 1F1B's first rank holds 1) for these costs and prints it beside
every fixed schedule. `schedule=csv` reads a torch.distributed.pipelining compute-only CSV
(its ranks, microbatches and chunks are the file's); `--to-csv FILE` writes one.
Also runnable as `python -m splitgraph.schedule.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from splitgraph.schedule import SCHEDULES, Costs, Schedule, build_schedule, render_ascii, simulate
from splitgraph.schedule.allreduce import (
    DataParallelStep,
    Link,
    stage_allreduce_times,
    with_allreduce,
)
from splitgraph.schedule.simulate import SimResult

if TYPE_CHECKING:
    from splitgraph.config import ScheduleConfig, Workload


def _costs_from_run(run_dir: Path, num_stages: int) -> tuple[Costs, str]:
    summary = json.loads((run_dir / "summary.json").read_text())
    timeline = summary.get("timeline") or {}
    c = timeline.get("costs_per_stage_s")
    if not c:
        raise ValueError(f"{run_dir}/summary.json has no measured costs (run with trace.enabled)")
    if len(c["forward"]) != num_stages:
        raise ValueError(
            f"{run_dir} measured {len(c['forward'])} stages; this schedule has {num_stages}: "
            "predict with the same pipeline.stages and schedule.virtual_stages"
        )
    costs = Costs(
        c["forward"],
        c["backward"],
        c["backward_input"],
        c["weight"],
        c["comm_per_boundary"],
        post=c["post_per_transfer_group"],
    )
    return costs, f"measured in {run_dir}"


def describe(sched: Schedule, sim: SimResult, unit: str, dp: DataParallelStep | None = None) -> str:
    lines = [
        f"{sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
        f"{sched.num_microbatches} microbatches",
        f"step time        {sim.step_time:.6g} {unit}",
        f"bubble           {sim.bubble_fraction:.1%} of all ranks' time",
        "bubble per rank  " + " ".join(f"{b:.1%}" for b in sim.bubble),
        "idle in span     " + " ".join(f"{x:.4g}" for x in sim.span_idle) + f" {unit} per rank "
        "(between its first and last action)",
        "peak in flight   " + " ".join(map(str, sim.peak_inflight)) + " microbatches per stage",
        "peak activations "
        + " ".join(f"{x:.3g}" for x in sim.peak_activation)
        + " per rank, in whole-model microbatches (1F1B's first rank: 1)",
    ]
    if dp is not None:
        windows = " ".join(f"{a:.4g}-{b:.4g}" for _, (a, b) in sorted(dp.windows.items()))
        lines += [
            f"with all-reduce  {dp.step_time:.6g} {unit} ({dp.exposed:.6g} exposed, "
            f"{'overlapped' if dp.overlap else 'after the schedule'})",
            f"all-reduce       per stage {windows}",
        ]
    return "\n".join(lines)


def draw_schedule(
    sched: Schedule,
    sim: SimResult,
    path: Path,
    costs_text: str,
    unit: str,
    dp: DataParallelStep | None = None,
) -> Path:
    from splitgraph.observe.timeline import Box, Panel, draw

    boxes = [
        Box(e.rank, str(e.action), e.action.op.value, e.start, e.end)
        for row in sim.events
        for e in row
    ]
    step = sim.step_time
    if dp is not None:
        boxes += [Box(sched.rank_of(s), f"{s}DP", "DP", a, b) for s, (a, b) in dp.windows.items()]
        step = dp.step_time
    title = (
        f"{sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
        f"{sched.num_microbatches} microbatches ({costs_text}); step {step:.4g}"
        f"{' ' + unit if unit else ''}, bubble {sim.bubble_fraction:.0%}, peak in flight "
        f"{max(sim.peak_inflight)}"
    )
    per_rank = sched.num_stages // sched.num_ranks
    return draw(
        [Panel(title, boxes, sched.num_ranks, per_rank, unit="s" if unit == "s" else "")], path
    )


def _parser() -> argparse.ArgumentParser:
    """splitgraph-schedule's flags (the overrides choose the schedule, as for training)."""
    from splitgraph.train.usage import parser as make_parser

    parser = make_parser(
        "splitgraph-schedule",
        "Simulate a schedule and draw its timeline before running anything: the text picture,\n"
        "step time, bubble and peak microbatches in flight per stage, and a PNG. Choose it with\n"
        "the training overrides (pipeline.stages = ranks, schedule.virtual_stages = chunks per\n"
        "rank); costs are unit costs per stage (--costs) or a run's measured ones (--from-run).",
        "splitgraph-schedule schedule=zb1 pipeline.stages=4 pipeline.microbatches=8 --costs 1,2,1",
    )
    parser.add_argument(
        "--costs", default="1,2,1", metavar="F,B[,W]", help="unit costs per stage (1,2,1)"
    )
    parser.add_argument("--comm", type=float, default=0.0, metavar="T", help="time per transfer")
    parser.add_argument(
        "--from-run", type=Path, metavar="RUN_DIR", help="use the costs a run measured"
    )
    parser.add_argument("--out", type=Path, metavar="PNG", help="(default: <schedule>.png)")
    parser.add_argument("--no-picture", action="store_true", help="print only, write no PNG")
    parser.add_argument("--dp", type=int, default=1, metavar="D", help="data-parallel replicas")
    parser.add_argument(
        "--allreduce", type=float, metavar="T", help="each stage's all-reduce (cost units)"
    )
    parser.add_argument(
        "--dp-bandwidth", type=float, metavar="GBPS", help="GB/s per rank (with --from-run)"
    )
    parser.add_argument(
        "--dp-latency-us", type=float, default=0.0, metavar="US", help="per ring step"
    )
    parser.add_argument("--no-overlap", action="store_true", help="all-reduce after the step")
    parser.add_argument(
        "--cap",
        help="schedule=auto: activations each rank may hold, in whole-model microbatches "
        "(1F1B's first rank holds 1); one number, or one per rank: 0.5,0.5,1,1",
    )
    parser.add_argument("--to-csv", type=Path, help="write the schedule as a torch.pp CSV file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)

    from hydra.errors import HydraException

    from splitgraph.config import Workload, load_config

    auto_table = None
    try:
        cfg = load_config(_schedule_shorthand(args.overrides))
        name, v, m = cfg.schedule.name, cfg.schedule.virtual_stages, 0
        if name not in SCHEDULES:
            raise ValueError(f"schedule {name!r} is not one of {', '.join(SCHEDULES)}")
        if args.cap is not None and name != "auto":
            raise ValueError(f"--cap is auto's memory cap; schedule={name} has its own memory")
        if name == "csv":
            sched = _load_csv(cfg.schedule, cfg.pipeline.stages)
        ranks = cfg.pipeline.stages if name != "csv" else sched.num_ranks
        if ranks is None:
            raise ValueError("pass pipeline.stages=P: the number of ranks to simulate")
        m = cfg.pipeline.microbatches if name != "csv" else sched.num_microbatches
        stages = int(ranks) * v if name != "csv" else sched.num_stages
        costs, costs_text, unit = _costs(args, stages)
        if name == "auto":
            from splitgraph.schedule.auto import AutoInput, plan_auto

            caps = [float(x) for x in args.cap.split(",")] if args.cap else None
            cap = caps[0] if caps is not None and len(caps) == 1 else caps
            result = plan_auto(AutoInput(int(ranks), m, costs, v, cap=cap))
            sched, auto_table = result.schedule, result.table()
        elif name != "csv":
            sched = build_schedule(name, int(ranks), m, v)
        sim = simulate(sched, costs)
        dp = _data_parallel(args, Workload.of(cfg), sched, sim) if args.dp != 1 else None
        if dp is not None:
            costs_text += f", dp={args.dp}"
        if args.to_csv is not None:
            from splitgraph.schedule.interop import write_csv

            write_csv(sched, args.to_csv)
    except (ValueError, HydraException) as e:
        print(f"splitgraph-schedule: {e}", file=sys.stderr)
        return 2
    if auto_table is not None:
        print(auto_table + "\n")
    print(describe(sched, sim, unit or "units", dp))
    if args.to_csv is not None:
        print(f"torch.distributed.pipelining CSV: {args.to_csv}")
    if not args.from_run and all(float(x).is_integer() for x in args.costs.split(",")):
        print(render_ascii(sim))
    if not args.no_picture:
        out = args.out or Path(f"{sched.name.split()[0]}.png")
        draw_schedule(sched, sim, out, costs_text, unit, dp)
        print(f"picture: {out}")
    return 0


def _schedule_shorthand(overrides: list[str]) -> list[str]:
    """`zbv pipeline.stages=4` -> `schedule=zbv pipeline.stages=4`: a bare first word names
    the schedule."""
    if overrides and "=" not in overrides[0] and not overrides[0].startswith(("+", "~")):
        return [f"schedule={overrides[0]}", *overrides[1:]]
    return list(overrides)


def _load_csv(schedule: ScheduleConfig, stages: int | None) -> Schedule:
    from splitgraph.schedule.interop import load_csv

    path = schedule.path
    if path is None:
        raise ValueError("schedule=csv reads a file: add schedule.path=FILE.csv")
    return load_csv(str(path), num_ranks=None if stages is None else int(stages))


def _costs(args: argparse.Namespace, stages: int) -> tuple[Costs, str, str]:
    """The costs to simulate with, how to name them, and their unit ("" for unit costs)."""
    if args.from_run is not None:
        costs, text = _costs_from_run(args.from_run, stages)
        return costs, text, "s"
    parts = [float(x) for x in args.costs.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"--costs {args.costs!r}: give F,B or F,B,W")
    f, b = parts[0], parts[1]
    w = parts[2] if len(parts) == 3 else b / 2
    costs = Costs.uniform(stages, f, b, w=w, comm=args.comm)
    text = f"F={f:g} B={b:g} (I={b - w:g} W={w:g})" + (f" comm={args.comm:g}" if args.comm else "")
    return costs, text, ""


def _data_parallel(
    args: argparse.Namespace, work: Workload, sched: Schedule, sim: SimResult
) -> DataParallelStep:
    """The step with `--dp` replicas' gradient all-reduce added."""
    if args.dp < 1:
        raise ValueError(f"--dp {args.dp}: the number of replicas must be >= 1")
    if args.allreduce is not None:
        if args.dp_bandwidth is not None:
            raise ValueError("give --allreduce (cost units) or --dp-bandwidth (GB/s), not both")
        times = [args.allreduce] * sched.num_stages
    elif args.dp_bandwidth is not None:
        if args.from_run is None:
            raise ValueError(
                "--dp-bandwidth gives seconds, but --costs are unit costs: add --from-run RUN_DIR "
                "(measured seconds), or give each stage's all-reduce as --allreduce T in units"
            )
        from splitgraph.model import torch_dtype
        from splitgraph.partition import make_plan

        plan = make_plan(work, sched.num_ranks)
        size = torch_dtype(work.runtime.dtype).itemsize
        link = Link("given", args.dp_bandwidth * 1e9, args.dp_latency_us * 1e-6)
        nbytes = [plan.stage_params(s) * size for s in range(sched.num_stages)]
        times = stage_allreduce_times(nbytes, args.dp, link, work.parallel.bucket_mb * 2**20)
    else:
        raise ValueError("--dp needs --allreduce T (cost units) or --dp-bandwidth GB/s")
    return with_allreduce(sim, sched, times, overlap=not args.no_overlap)


if __name__ == "__main__":
    sys.exit(main())
