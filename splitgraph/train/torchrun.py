"""torchrun, with a quiet and resumable stop: `python -m splitgraph.train.torchrun` takes torchrun's
arguments (launch/train.sh and launch/slurm.sbatch use it).

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
"""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> int:
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
