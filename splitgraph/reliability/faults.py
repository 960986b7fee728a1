"""Fault injection for the reliability tests: `debug.fail_at_step=K debug.fail_rank=R
debug.fail_mode=MODE`, armed only on torchrun attempt `debug.fail_attempt` (default 0, the
first), so a job restarted by `torchrun --max-restarts` runs clean and must recover.

    raise         rank R raises inside the schedule of step K (peers see a reset connection)
    kill          rank R SIGKILLs itself inside the schedule of step K (no Python cleanup at all,
                  like the OOM killer or a lost node)
    stall         rank R stops inside the schedule of step K and never returns (the watchdog's
                  case)
    nan           the inputs of step K's last microbatch get a NaN (on the rank holding stage 0)
    kill_in_save  rank R SIGKILLs itself while writing the first checkpoint at or after step K,
                  after writing its own tensors and before the save commits
    sigterm       rank R sends itself SIGTERM (sigint: SIGINT) as step K starts, and no other
                  rank gets one: all must still stop after the same step
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # DCP is imported when a checkpoint is written (see checkpoint.py)
    from torch.distributed.checkpoint import FileSystemWriter

    from splitgraph.config import DebugConfig

#: where in the executor's program a schedule fault fires (after the first action ran)
PROGRAM_INDEX = 1


def restart_attempt() -> int:
    """torchrun's restart counter: 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Fault:
    step: int | None
    rank: int
    mode: str
    attempt: int

    @staticmethod
    def from_config(d: DebugConfig) -> Fault:
        """The fault `debug.*` asks for (none when debug.fail_at_step is null)."""
        return Fault(d.fail_at_step, d.fail_rank, d.fail_mode, d.fail_attempt)

    @property
    def armed(self) -> bool:
        return self.step is not None and restart_attempt() == self.attempt

    def program_index(self, step: int, rank: int) -> int | None:
        """`fail_at` for the executor: where this rank's schedule fault fires, if at all."""
        hit = self.armed and step == self.step and rank == self.rank
        return PROGRAM_INDEX if hit and self.mode in ("raise", "kill", "stall") else None

    def surface(self, error: BaseException) -> None:
        """The executor raised the injected fault: act it out as `mode` says."""
        if self.mode == "kill":
            die()
        if self.mode == "stall":
            while True:  # only the watchdog (or the process-group timeout) ends this
                time.sleep(3600)
        raise error

    def send_signal(self, step: int, rank: int) -> None:
        """mode=sigterm/sigint: rank R signals itself as step K starts."""
        hit = self.armed and step == self.step and rank == self.rank
        if hit and self.mode in ("sigterm", "sigint"):
            os.kill(os.getpid(), signal.SIGTERM if self.mode == "sigterm" else signal.SIGINT)

    def poison(self, step: int, x: Tensor | None) -> Tensor | None:
        """mode=nan: a NaN in the last sample, so in the step's last microbatch."""
        if x is None or not (self.armed and self.mode == "nan" and step == self.step):
            return x
        x = x.clone()
        x[-1, 0] = float("nan")
        return x

    def save_writer(self, step: int, rank: int) -> type[FileSystemWriter] | None:
        """mode=kill_in_save: a writer that dies after writing this rank's tensors; else None
        (checkpoint.save's own writer)."""
        hit = self.armed and self.mode == "kill_in_save" and step >= (self.step or 0)
        return _die_after_write() if hit and rank == self.rank else None


def _die_after_write() -> type[FileSystemWriter]:
    from torch.distributed.checkpoint import FileSystemWriter

    class DieAfterWrite(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            future = super().write_data(plan, planner)
            future.wait()
            die()
            return future  # pragma: no cover - never reached

    return DieAfterWrite
