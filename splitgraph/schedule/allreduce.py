"""The data-parallel gradient all-reduce in the step-time prediction.

With `dp` replicas, each stage's gradients are summed over its dp peers once per step. The
runtime (runtime/gradsync.py) starts a stage's all-reduce when the stage's last backward
(B, or W when the backward is split) of the step has run, on a channel of its own; the
rank's stages share it, so their all-reduces queue in the order they were started. The step
ends when every rank has finished both its schedule and its all-reduces:

    ready_s  = end of stage s's last B/W        (overlap=False: end of the rank's schedule)
    start_s  = max(ready_s, end of the previous all-reduce on the same rank)
    step     = max over ranks of max(last compute, last all-reduce end)

The cost of one all-reduce is the ring algorithm's under the alpha-beta model (Thakur,
Rabenseifner & Gropp 2005; NCCL's ring): 2(dp-1) steps, each moving nbytes/dp over one link,

    T(nbytes, dp) = 2(dp-1)/dp * nbytes / bandwidth + 2(dp-1) * latency

with `bandwidth` the bytes/s one rank's link sustains in one direction and `latency` the
cost of one ring step; a stage cut into k buckets pays the latency term k times. Ignored:
contention between the all-reduce and the pipeline's own transfers, and the replicas
drifting apart (they run the same schedule on equal shares, so they finish together).

`splitgraph-schedule --dp` and `python -m splitgraph.bench.scale project` call these; so can
the plan command (`allreduce_time`, `stage_allreduce_times`, `with_allreduce`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from splitgraph.schedule.ir import B, Schedule, W
from splitgraph.schedule.simulate import SimResult


@dataclass(frozen=True)
class Link:
    """A link as the all-reduce sees it: bytes/s per rank per direction, seconds per step."""

    name: str
    bandwidth: float
    latency: float


def allreduce_time(nbytes: float, dp: int, bandwidth: float, latency: float = 0.0) -> float:
    """Seconds for a ring all-reduce of `nbytes` over `dp` ranks (0 for dp = 1)."""
    if dp < 1 or bandwidth <= 0 or nbytes < 0 or latency < 0:
        raise ValueError(
            f"allreduce_time: need dp >= 1, bandwidth > 0, nbytes >= 0, latency >= 0; got "
            f"dp={dp}, bandwidth={bandwidth}, nbytes={nbytes}, latency={latency}"
        )
    if dp == 1:
        return 0.0
    return 2 * (dp - 1) / dp * nbytes / bandwidth + 2 * (dp - 1) * latency


def stage_allreduce_times(
    stage_bytes: Sequence[float],
    dp: int,
    link: Link,
    bucket_bytes: float = 25 * 2**20,
) -> list[float]:
    """Per stage: its gradient bytes, cut into buckets of at most `bucket_bytes`, all-reduced
    over `dp` replicas on `link` (each bucket pays the latency)."""
    out = []
    for nbytes in stage_bytes:
        k = max(1, math.ceil(nbytes / bucket_bytes))
        t = allreduce_time(nbytes, dp, link.bandwidth, 0.0)
        out.append(t + k * allreduce_time(0.0, dp, link.bandwidth, link.latency))
    return out


@dataclass(frozen=True)
class DataParallelStep:
    """A simulated pipeline step with the all-reduce added."""

    step_time: float  # schedule and all-reduces, all ranks done
    pipeline_time: float  # the schedule alone (SimResult.step_time)
    windows: dict[int, tuple[float, float]]  # stage -> (start, end) of its all-reduce
    overlap: bool

    @property
    def exposed(self) -> float:
        """What the all-reduce adds to the step: the part not hidden behind compute."""
        return self.step_time - self.pipeline_time

    def summary(self) -> dict[str, object]:
        return {
            "step_time": self.step_time,
            "pipeline_time": self.pipeline_time,
            "exposed_allreduce": self.exposed,
            "overlap": self.overlap,
            "allreduce_per_stage": {s: list(w) for s, w in sorted(self.windows.items())},
        }


def with_allreduce(
    sim: SimResult, sched: Schedule, stage_times: Sequence[float], overlap: bool = True
) -> DataParallelStep:
    """Add each stage's all-reduce (seconds, `stage_times[s]`) to a simulated step."""
    if len(stage_times) != sched.num_stages:
        raise ValueError(
            f"{len(stage_times)} all-reduce times for a schedule of {sched.num_stages} stages"
        )
    windows: dict[int, tuple[float, float]] = {}
    finish = 0.0
    for rank, events in enumerate(sim.events):
        end_of_schedule = max((e.end for e in events), default=0.0)
        ready: dict[int, float] = {}
        for e in events:  # in execution order: the last B/W of a stage wins
            a = e.action
            if a.op in (B, W):
                ready[a.stage] = e.end if overlap else end_of_schedule
        for s, r in enumerate(sched.stage_to_rank):
            if r == rank:
                ready.setdefault(s, end_of_schedule)
        channel = 0.0
        for s in sorted(ready, key=lambda s: (ready[s], s)):
            start = max(ready[s], channel)
            channel = start + float(stage_times[s])
            windows[s] = (start, channel)
        finish = max(finish, end_of_schedule, channel)
    return DataParallelStep(
        step_time=finish, pipeline_time=sim.step_time, windows=windows, overlap=overlap
    )
