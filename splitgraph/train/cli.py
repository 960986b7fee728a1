"""Console commands that need no process group."""

from __future__ import annotations

import sys

from splitgraph.errors import SplitgraphError


def check_main(argv: list[str] | None = None) -> int:
    """`splitgraph-check --nproc N [--nproc-per-node L] [overrides...]`: validate a launch
    before spawning anything.

    Composes the config exactly as `splitgraph.train` would (reading data.features and
    data.outputs from a data file that leaves them null), runs `validate` for N ranks, builds
    the plan and the schedule (which validates it), prices every rank's memory and the data
    against the cap and this machine (splitgraph/reliability/preflight.py; L ranks on this machine,
    default N), reads the data file and checks every value, and prints what it found. Exit 0
    if the launch would start, 2 with the reasons if not, 3 if it cannot fit in memory.
    launch/*.sh run it before torchrun.
    """
    parsed = _check_args(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        return 2
    nproc, per_node, args = parsed
    from hydra.errors import HydraException

    from splitgraph.config import Workload, load_config, validate
    from splitgraph.data import load_dataset, microbatch_sizes
    from splitgraph.errors import OutOfMemory
    from splitgraph.partition import make_plan
    from splitgraph.reliability import preflight
    from splitgraph.runtime.engine import schedule_for_run
    from splitgraph.runtime.mesh import layout_of

    try:
        cfg = load_config(args, fill_data=False)
        work = Workload.of(cfg)  # what the planner, pre-flight and the engine read
        found = preflight.resolve_data(cfg.data, work, nproc, range(per_node))
        validate(cfg, nproc)
        layout = layout_of(cfg.pipeline, cfg.parallel, nproc)
        plan = make_plan(work, layout.pp)
        rows = cfg.train.batch_size // layout.dp
        sizes = microbatch_sizes(rows, cfg.pipeline.microbatches)
        sched, plan = schedule_for_run(work, layout.pp, plan)  # auto: from the costs
        try:
            devices = preflight.node_devices(cfg.runtime, per_node)
        except RuntimeError as e:  # no CUDA for runtime.device=cuda, too few GPUs
            raise SplitgraphError(str(e)) from None
        checked = preflight.check_launch(
            cfg.data, work, layout, plan, range(per_node), devices, schedule=sched
        )
        dataset = load_dataset(cfg.data, work)  # every value, as the ranks will read it
    except OutOfMemory as e:
        print(f"splitgraph-check: {e}", file=sys.stderr)
        return 3
    except (SplitgraphError, HydraException) as e:
        cause = f"\n  ({e.__cause__})" if e.__cause__ else ""
        print(f"splitgraph-check: {e}{cause}", file=sys.stderr)
        return 2
    if found:
        print(found)
    print(dataset.describe())
    print(plan.table(sizes[0]))
    if layout.dp > 1:
        print(layout.describe() + f"\n  each replica runs {rows} rows of every minibatch")
    print("\n".join(checked.lines()))
    print(f"schedule {sched.name}: {len(sizes)} microbatches {sizes}, valid")
    return 0


def _check_args(argv: list[str]) -> tuple[int, int, list[str]] | None:
    """splitgraph-check's flags: (ranks, ranks on this machine, overrides); None (after
    saying why) for a launch of fewer than one rank."""
    from splitgraph.train.usage import parser

    p = parser(
        "splitgraph-check",
        "Validate a launch before spawning anything: compose the config exactly as\n"
        "splitgraph.train would (data.features/outputs read from a data file that leaves them\n"
        "null), check it for N ranks, build the plan and the schedule, price every rank's\n"
        "memory and the data against the cap and this machine, read the data file and check\n"
        "every value. Exit 0 if the launch would start, 2 with the reasons if not, 3 if it\n"
        "cannot fit in memory (launch/*.sh run it before torchrun).",
        "splitgraph-check --nproc 4 schedule=interleaved pipeline.microbatches=8",
    )
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="ranks the launch would start (1)"
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="L",
        help="of them, ranks on this machine, whose memory they share (default: N)",
    )
    ns = p.parse_intermixed_args(argv)
    for flag, n in (("--nproc", ns.nproc), ("--nproc-per-node", ns.nproc_per_node)):
        if n is not None and n < 1:
            print(
                f"splitgraph-check: {flag} {n}: a launch needs at least 1 rank (one per "
                "pipeline stage)",
                file=sys.stderr,
            )
            return None
    nproc = int(ns.nproc)
    per_node = nproc if ns.nproc_per_node is None else min(int(ns.nproc_per_node), nproc)
    return nproc, per_node, list(ns.overrides)


if __name__ == "__main__":
    sys.exit(check_main())
