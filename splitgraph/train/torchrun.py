"""torchrun, with a quiet and resumable stop: `python -m splitgraph.train.torchrun` takes torchrun's
arguments (launch/multinode.sh, launch/slurm.sbatch, and launch/train.sh with
SPLITGRAPH_LAUNCHER=torchrun use it; one machine's default is `splitgraph-train --nproc N`,
train/fork.py).

    python -m splitgraph.train.torchrun --standalone --nproc-per-node 4 -m splitgraph.train ...

On SIGINT or SIGTERM, torchrun forwards the signal to every worker, waits for them
(`--shutdown-timeout`, default 30 s) and then dies of its own `SignalException`: three
warnings and a 24-line traceback after the workers' own stop line, exit status 1, whatever
the workers did. The workers here finish their step, commit a checkpoint and exit with
EXIT_STOPPED (reliability/signals.py), and each writes its stop line into a file this launcher
names (SPLITGRAPH_STOP_FILE, per node). This launcher then drops torchrun's shutdown
warnings and traceback and exits with EXIT_STOPPED when the workers stopped cleanly, else
with 128 + the signal number (they stopped at once, or never started). The same applies when
only the workers got the signal (all of them exiting with EXIT_STOPPED). Any other failure is
torchrun's, reported as torchrun reports it.

`--check` first (`python -m splitgraph.train.torchrun --check --standalone --nproc-per-node 4
-m splitgraph.train ...`) runs `splitgraph-check` for the launch in this process before
torchrun starts: the same checks, messages and exit codes (2, 3) as the separate command, with
its report dropped as launch/*.sh drop it, and then the line `run dir: ...` when
SPLITGRAPH_RUN_DIR pins one. This process imports torch for torchrun anyway, so the check
costs only its own work, not a second interpreter and torch import (about 2 s of a launch).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

from splitgraph.reliability.signals import EXIT_STOPPED, STOP_FILE_ENV

#: torchrun's log lines about a shutdown that the workers' own stop line already explains
_QUIET = ("Received %s death signal, shutting down workers", "Sending process %s closing signal")


class _DropShutdownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET)


def check(argv: list[str]) -> int:
    """`splitgraph-check` for the launch torchrun's arguments `argv` describe (world size =
    nodes x ranks per node): its exit code; its report dropped, its errors on stderr."""
    from torch.distributed.run import (
        determine_local_world_size,
        parse_args,
        parse_min_max_nnodes,
    )

    from splitgraph.train.cli import check_main

    args = parse_args(argv)
    if not (args.module and args.training_script == "splitgraph.train"):
        print(
            "splitgraph.train.torchrun --check: checks launches of `-m splitgraph.train` "
            f"only, not {args.training_script!r}; drop --check",
            file=sys.stderr,
        )
        return 2
    _, nodes = parse_min_max_nnodes(args.nnodes)
    per_node = determine_local_world_size(args.nproc_per_node)
    flags = ["--nproc", str(nodes * per_node), "--nproc-per-node", str(per_node)]
    with contextlib.redirect_stdout(io.StringIO()):
        code = check_main([*flags, *args.training_script_args])
    if code == 0 and os.environ.get("SPLITGRAPH_RUN_DIR"):
        print(f"run dir: {os.environ['SPLITGRAPH_RUN_DIR']}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--check"]:
        argv = argv[1:]
        code = check(argv)
        if code != 0:
            return code
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    fd, name = tempfile.mkstemp(prefix="splitgraph-stop-", suffix=".txt")
    os.close(fd)
    stop_file = Path(name)
    os.environ[STOP_FILE_ENV] = str(stop_file)
    quiet = _DropShutdownNoise()
    for logger in (
        "torch.distributed.elastic.agent.server.api",
        "torch.distributed.elastic.multiprocessing.api",
    ):
        logging.getLogger(logger).addFilter(quiet)
    try:
        torchrun(argv)
        return 0
    except SignalException as e:
        if stop_file.read_text().strip():  # the workers stopped at a step, with a checkpoint
            return EXIT_STOPPED
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if e.failures and all(f.exitcode == EXIT_STOPPED for f in e.failures.values()):
            return EXIT_STOPPED  # only the workers were signalled; they stopped cleanly
        raise
    finally:
        stop_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
