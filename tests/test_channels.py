"""Channels: a process group per (sending rank, receiving rank, kind), so that no message waits
behind another on NCCL, where a group runs its operations in order (issue 19, finding 2).

With one group per (kind, direction) spanning the pipeline, a middle rank of 3 carried the
activations from rank 0 and those to rank 2 on one group: its send to rank 2 queued behind the
receives from rank 0 it posts when the step starts, and 1F1B deadlocked. The 3-rank test runs
every schedule under that rule, emulated on gloo (tests/gpu_workers.OneQueuePerGroup)."""

from __future__ import annotations

import pytest

from splitgraph.runtime.comm import neighbour_channels, schedule_channels
from splitgraph.schedule import build_schedule
from splitgraph.spawn import run_ranks
from tests.gpu_workers import nccl_rule_worker


def test_a_schedule_names_its_channels() -> None:
    line = [(0, 1, "act"), (1, 0, "grad"), (1, 2, "act"), (2, 1, "grad")]
    assert schedule_channels(build_schedule("1f1b", 3, 4)) == line
    assert schedule_channels(build_schedule("zb1", 3, 4)) == line
    # interleaved: the last rank's chunk feeds the first rank's next one
    looped = schedule_channels(build_schedule("interleaved", 3, 6, 2))
    assert looped == sorted([*line, (2, 0, "act"), (0, 2, "grad")])
    assert set(looped) <= set(neighbour_channels(3))
    assert neighbour_channels(1) == []


@pytest.mark.timeout(240)
def test_three_ranks_under_one_queue_per_group_as_on_nccl() -> None:
    """Every schedule kind on 3 ranks with each group's operations run strictly in issue
    order: the step finishes, the gradients equal single-device PyTorch's (float64, to
    rounding; checked in the worker), and every group carried one peer in one direction."""
    f64 = ["runtime.dtype=float64"]
    cases = [
        [*f64, "schedule.name=1f1b", "pipeline.microbatches=4"],
        [*f64, "schedule.name=zb1", "pipeline.microbatches=4"],
        [*f64, "schedule.name=gpipe", "pipeline.microbatches=3"],
        [*f64, "schedule.name=interleaved", "schedule.virtual_stages=2", "pipeline.microbatches=6"],
    ]
    per_rank = run_ranks(nccl_rule_worker, 3, cases, timeout=200, pg_timeout=60)
    for rank, carried in enumerate(per_rank):
        assert set(carried) == {" ".join(c) for c in cases}
        for case, groups in carried.items():
            assert groups, (rank, case)
            assert all(len(g) == 1 for g in groups), (rank, case, groups)
