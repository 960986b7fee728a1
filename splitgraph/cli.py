"""Console commands that need no process group."""

from __future__ import annotations

import sys

from splitgraph.errors import SplitgraphError


def check_main(argv: list[str] | None = None) -> int:
    """`splitgraph-check --nproc N [overrides...]`: validate a launch before spawning anything.

    Composes the config exactly as `splitgraph.train` would, runs `validate` for N ranks,
    builds the plan and the schedule (which validates it), and prints both. Exit 0 if the
    launch would start, 2 with the reasons if not. launch/*.sh run it before torchrun.
    """
    from splitgraph.usage import parser

    p = parser(
        "splitgraph-check",
        "Validate a launch before spawning anything: compose the config exactly as\n"
        "splitgraph.train would, check it for N ranks, build the plan and the schedule, print\n"
        "both. Exit 0 if the launch would start, 2 with the reasons if not (launch/train.sh\n"
        "runs it before torchrun).",
        "splitgraph-check --nproc 4 schedule=interleaved pipeline.microbatches=8",
    )
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="ranks the launch would start (1)"
    )
    ns = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    nproc, args = ns.nproc, list(ns.overrides)
    from hydra.errors import HydraException

    from splitgraph.config import load_config, validate
    from splitgraph.data import microbatch_sizes
    from splitgraph.partition import make_plan
    from splitgraph.runtime.mesh import layout_of
    from splitgraph.schedule import build_schedule

    try:
        cfg = load_config(args)
        validate(cfg, nproc)
        layout = layout_of(cfg, nproc)
        plan = make_plan(cfg, layout.pp)
        rows = int(cfg.train.batch_size) // layout.dp
        sizes = microbatch_sizes(rows, int(cfg.pipeline.microbatches))
        sched = build_schedule(
            str(cfg.schedule.name), layout.pp, len(sizes), int(cfg.schedule.virtual_stages)
        )
    except (SplitgraphError, HydraException) as e:
        cause = f"\n  ({e.__cause__})" if e.__cause__ else ""
        print(f"splitgraph-check: {e}{cause}", file=sys.stderr)
        return 2
    print(plan.table(sizes[0]))
    if layout.dp > 1:
        print(layout.describe() + f"\n  each replica runs {rows} rows of every minibatch")
    print(f"schedule {sched.name}: {len(sizes)} microbatches {sizes}, valid")
    return 0


if __name__ == "__main__":
    sys.exit(check_main())
