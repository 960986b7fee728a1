"""`splitgraph-schedule`: simulate a schedule and draw its timeline, before running anything.

    splitgraph-schedule schedule=1f1b pipeline.stages=4 pipeline.microbatches=8
    splitgraph-schedule schedule=zb1 pipeline.stages=4 pipeline.microbatches=8 --costs 1,2,1
    splitgraph-schedule schedule=interleaved pipeline.stages=4 pipeline.microbatches=8 --out i.png
    splitgraph-schedule schedule=zb1 pipeline.stages=2 --from-run outputs/demo   # measured costs
    splitgraph-schedule schedule=interleaved pipeline.stages=2 --dp 4 --allreduce 3
    splitgraph-schedule schedule=1f1b pipeline.stages=2 --from-run RUN --dp 4 --dp-bandwidth 40

Hydra overrides choose the schedule exactly as for training (`pipeline.stages` is the number
of ranks; `schedule.virtual_stages` the chunks per rank). Costs are unit costs per stage,
`--costs F,B[,W]` (default 1,2,1: a backward is twice a forward, W half of it), plus `--comm`
per transfer; or the costs a run measured (`--from-run RUN_DIR`, its summary.json). Prints the
picture in text, step time, bubble and peak in-flight microbatches per stage, and writes a PNG.

`--dp D` adds the data-parallel gradient all-reduce of D replicas (schedule/allreduce.py):
either `--allreduce T`, each stage's all-reduce in the costs' own unit, or, with costs in
seconds (`--from-run`), `--dp-bandwidth GB/s [--dp-latency-us]`, from which each stage's
all-reduce is the ring time of its gradient bytes (the plan's parameters x runtime.dtype).
Also runnable as `python -m splitgraph.schedule.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from splitgraph.schedule import SCHEDULES, Costs, Schedule, build_schedule, render_ascii, simulate
from splitgraph.schedule.allreduce import (
    DataParallelStep,
    Link,
    stage_allreduce_times,
    with_allreduce,
)
from splitgraph.schedule.simulate import SimResult


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
        "peak in flight   " + " ".join(map(str, sim.peak_inflight)) + " microbatches per stage",
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
    from splitgraph.timeline import Box, Panel, draw

    boxes = [
        Box(e.rank, e.action, e.action.lstrip("0123456789")[0], e.start, e.end)
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


def main(argv: list[str] | None = None) -> int:
    from splitgraph.usage import parser as make_parser

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
    args = parser.parse_intermixed_args(argv)

    from hydra.errors import HydraException

    from splitgraph.config import load_config

    try:
        cfg = load_config(args.overrides)
        ranks = cfg.pipeline.stages
        if ranks is None:
            raise ValueError("pass pipeline.stages=P: the number of ranks to simulate")
        name, v, m = str(cfg.schedule.name), int(cfg.schedule.virtual_stages), 0
        if name not in SCHEDULES:
            raise ValueError(f"schedule {name!r} is not one of {', '.join(SCHEDULES)}")
        m = int(cfg.pipeline.microbatches)
        sched = build_schedule(name, int(ranks), m, v)
        if args.from_run is not None:
            costs, costs_text = _costs_from_run(args.from_run, sched.num_stages)
            unit = "s"
        else:
            parts = [float(x) for x in args.costs.split(",")]
            if len(parts) not in (2, 3):
                raise ValueError(f"--costs {args.costs!r}: give F,B or F,B,W")
            f, b = parts[0], parts[1]
            w = parts[2] if len(parts) == 3 else b / 2
            costs = Costs.uniform(sched.num_stages, f, b, w=w, comm=args.comm)
            costs_text = f"F={f:g} B={b:g} (I={b - w:g} W={w:g})" + (
                f" comm={args.comm:g}" if args.comm else ""
            )
            unit = ""
        sim = simulate(sched, costs)
        dp = _data_parallel(args, cfg, sched, sim) if args.dp != 1 else None
        if dp is not None:
            costs_text += f", dp={args.dp}"
    except (ValueError, HydraException) as e:
        print(f"splitgraph-schedule: {e}", file=sys.stderr)
        return 2
    print(describe(sched, sim, unit or "units", dp))
    if not args.from_run and all(float(x).is_integer() for x in args.costs.split(",")):
        print(render_ascii(sim))
    if not args.no_picture:
        out = args.out or Path(f"{name}.png")
        draw_schedule(sched, sim, out, costs_text, unit, dp)
        print(f"picture: {out}")
    return 0


def _data_parallel(
    args: argparse.Namespace, cfg: Any, sched: Schedule, sim: SimResult
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
        from splitgraph.partition import make_plan
        from splitgraph.runtime.dist import torch_dtype

        plan = make_plan(cfg, sched.num_ranks)
        size = torch_dtype(cfg.runtime.dtype).itemsize
        link = Link("given", args.dp_bandwidth * 1e9, args.dp_latency_us * 1e-6)
        nbytes = [plan.stage_params(s) * size for s in range(sched.num_stages)]
        times = stage_allreduce_times(nbytes, args.dp, link, float(cfg.parallel.bucket_mb) * 2**20)
    else:
        raise ValueError("--dp needs --allreduce T (cost units) or --dp-bandwidth GB/s")
    return with_allreduce(sim, sched, times, overlap=not args.no_overlap)


if __name__ == "__main__":
    sys.exit(main())
