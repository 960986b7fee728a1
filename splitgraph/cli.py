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
    args = list(sys.argv[1:] if argv is None else argv)
    nproc = 1
    if "--nproc" in args:
        i = args.index("--nproc")
        try:
            nproc = int(args[i + 1])
        except (IndexError, ValueError):
            print("splitgraph-check: --nproc needs a number of ranks", file=sys.stderr)
            return 2
        del args[i : i + 2]
    from hydra.errors import HydraException

    from splitgraph.config import load_config, validate
    from splitgraph.data import microbatch_sizes
    from splitgraph.partition import make_plan
    from splitgraph.schedule import build_schedule

    try:
        cfg = load_config(args)
        validate(cfg, nproc)
        plan = make_plan(cfg, nproc)
        sizes = microbatch_sizes(int(cfg.train.batch_size), int(cfg.pipeline.microbatches))
        sched = build_schedule(
            str(cfg.schedule.name), nproc, len(sizes), int(cfg.schedule.virtual_stages)
        )
    except (SplitgraphError, HydraException) as e:
        cause = f"\n  ({e.__cause__})" if e.__cause__ else ""
        print(f"splitgraph-check: {e}{cause}", file=sys.stderr)
        return 2
    print(plan.table(sizes[0]))
    print(f"schedule {sched.name}: {len(sizes)} microbatches {sizes}, valid")
    return 0


if __name__ == "__main__":
    sys.exit(check_main())
