"""Console commands that need no process group."""

from __future__ import annotations

import sys


def train_main(argv: list[str] | None = None) -> None:
    """`splitgraph-train` and `python -m splitgraph.train`: `--nproc N` forks N ranks from
    this process (train/fork.py), with OMP_NUM_THREADS=1 unless set, as torchrun does for
    several ranks (it must be set before torch is imported); without it, one process, or one
    rank of torchrun. The flag is taken out before Hydra reads the command line."""
    import os

    from splitgraph.train.fork import nproc_flag

    nproc, rest = nproc_flag(list(sys.argv[1:] if argv is None else argv))
    if nproc is not None:
        sys.argv[1:] = rest
        if nproc > 1:
            os.environ.setdefault("OMP_NUM_THREADS", "1")
    from splitgraph.train.run import cli

    cli(nproc)


def check_main(argv: list[str] | None = None) -> int:
    """`splitgraph-check --nproc N [--nproc-per-node L] [overrides...]`: validate a launch
    before spawning anything.

    Composes the config exactly as `splitgraph.train` would (reading data.features and
    data.outputs from a data file that leaves them null), runs `validate` for N ranks, builds
    the plan and the schedule (which validates it), prices every rank's memory and the data
    against the cap and this machine (splitgraph/reliability/preflight.py; L ranks on this machine,
    default N), reads the data file and checks every value, and prints what it found. Exit 0
    if the launch would start, 2 with the reasons if not, 3 if it cannot fit in memory.
    launch/*.sh run it before torchrun (train/check.py holds the checks).
    """
    parsed = _check_args(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        return 2
    nproc, per_node, args = parsed
    from hydra.errors import HydraException

    from splitgraph.config import load_config
    from splitgraph.train.check import check_launch, refuse

    try:
        cfg = load_config(args, fill_data=False)
    except HydraException as e:
        return refuse(e)
    return check_launch(cfg, nproc, per_node)


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
