"""Errors that say the numbers and the fix (torchgpipe's BalanceError is the model)."""

from __future__ import annotations

from collections.abc import Sequence


class SplitgraphError(Exception):
    """Base class: every error splitgraph raises on purpose."""


class ConfigError(SplitgraphError, ValueError):
    """One or more configuration values break a rule; each line names the value and the fix."""

    def __init__(self, problems: Sequence[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration:\n{lines}")


class PartitionError(SplitgraphError, ValueError):
    """No split of the layers satisfies the request."""


class ScheduleError(SplitgraphError, ValueError):
    """A schedule breaks a rule; the message carries the step-by-rank grid."""


class DataError(SplitgraphError, ValueError):
    """A dataset or data file that cannot be trained on as configured."""


class CheckpointError(SplitgraphError, ValueError):
    """A checkpoint that does not fit the model."""


class RunDirError(SplitgraphError, RuntimeError):
    """The run directory cannot be used: it is a file, or another job holds it."""


class RankFailure(SplitgraphError, RuntimeError):
    """A rank raised or died; the message names the rank."""


class OutOfMemory(SplitgraphError, MemoryError):
    """A rank needs more than `pipeline.memory_cap`: the bytes needed, the cap, and where."""

    def __init__(
        self,
        message: str,
        needed: int,
        cap: int | None,
        rank: int,
        phase: str,
        records: list[dict] | None = None,
    ) -> None:
        super().__init__(message)
        self.needed, self.cap, self.rank, self.phase = needed, cap, rank, phase
        self.records = list(records or [])

    def to_dict(self) -> dict:
        return {
            "status": "oom",
            "message": str(self),
            "needed_bytes": self.needed,
            "cap_bytes": self.cap,
            "rank": self.rank,
            "phase": self.phase,
            "accounted_per_rank": self.records,
        }


class NonFiniteError(SplitgraphError, FloatingPointError):
    """A NaN or infinity in a loss, an activation or a gradient; the message names the step,
    stage and microbatch where it first appeared (runtime/guard.py)."""
