"""The link between adjacent stages: the time of one message, configured or measured.

A leaf of the cost model: `costs.py` prices every message with it and `profiler.py` measures one,
so neither needs the other to name it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """Time of one message between adjacent stages: latency + bytes / bandwidth."""

    bandwidth: float  # bytes per second
    latency: float = 0.0  # seconds
    source: str = "configured"

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth
