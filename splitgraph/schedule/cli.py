"""`splitgraph-schedule`: simulate a schedule and draw its timeline, before running anything.

    splitgraph-schedule schedule=1f1b pipeline.stages=4 pipeline.microbatches=8
    splitgraph-schedule schedule=zb1 pipeline.stages=4 pipeline.microbatches=8 --costs 1,2,1
    splitgraph-schedule schedule=interleaved pipeline.stages=4 pipeline.microbatches=8 --out i.png
    splitgraph-schedule schedule=zb1 pipeline.stages=2 --from-run outputs/demo   # measured costs

Hydra overrides choose the schedule exactly as for training (`pipeline.stages` is the number
of ranks; `schedule.virtual_stages` the chunks per rank). Costs are unit costs per stage,
`--costs F,B[,W]` (default 1,2,1: a backward is twice a forward, W half of it), plus `--comm`
per transfer; or the costs a run measured (`--from-run RUN_DIR`, its summary.json). Prints the
picture in text, step time, bubble and peak in-flight microbatches per stage, and writes a PNG.
Also runnable as `python -m splitgraph.schedule.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitgraph.schedule import SCHEDULES, Costs, Schedule, build_schedule, render_ascii, simulate
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


def describe(sched: Schedule, sim: SimResult, unit: str) -> str:
    lines = [
        f"{sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
        f"{sched.num_microbatches} microbatches",
        f"step time        {sim.step_time:.6g} {unit}",
        f"bubble           {sim.bubble_fraction:.1%} of all ranks' time",
        "bubble per rank  " + " ".join(f"{b:.1%}" for b in sim.bubble),
        "peak in flight   " + " ".join(map(str, sim.peak_inflight)) + " microbatches per stage",
    ]
    return "\n".join(lines)


def draw_schedule(sched: Schedule, sim: SimResult, path: Path, costs_text: str, unit: str) -> Path:
    from splitgraph.timeline import Box, Panel, draw

    boxes = [
        Box(e.rank, e.action, e.action.lstrip("0123456789")[0], e.start, e.end)
        for row in sim.events
        for e in row
    ]
    title = (
        f"{sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
        f"{sched.num_microbatches} microbatches ({costs_text}); step {sim.step_time:.4g}"
        f"{' ' + unit if unit else ''}, bubble {sim.bubble_fraction:.0%}, peak in flight "
        f"{max(sim.peak_inflight)}"
    )
    per_rank = sched.num_stages // sched.num_ranks
    return draw(
        [Panel(title, boxes, sched.num_ranks, per_rank, unit="s" if unit == "s" else "")], path
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitgraph-schedule", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. schedule=1f1b")
    parser.add_argument("--costs", default="1,2,1", help="F,B[,W] per stage (unit costs)")
    parser.add_argument("--comm", type=float, default=0.0, help="time per transfer")
    parser.add_argument("--from-run", type=Path, help="use the costs a run measured")
    parser.add_argument("--out", type=Path, help="PNG path (default: <schedule>.png)")
    parser.add_argument("--no-picture", action="store_true")
    args = parser.parse_args(argv)

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
    except (ValueError, HydraException) as e:
        print(f"splitgraph-schedule: {e}", file=sys.stderr)
        return 2
    print(describe(sched, sim, unit or "units"))
    if not args.from_run and all(float(x).is_integer() for x in args.costs.split(",")):
        print(render_ascii(sim))
    if not args.no_picture:
        out = args.out or Path(f"{name}.png")
        draw_schedule(sched, sim, out, costs_text, unit)
        print(f"picture: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
