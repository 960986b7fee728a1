"""Nothing hangs: a rank that raises or stalls ends the run with an error naming it."""

from __future__ import annotations

import time

import pytest

from splitgraph.errors import RankFailure
from splitgraph.spawn import run_ranks
from tests.workers import environ_worker, failing_worker, stalled_worker


@pytest.mark.timeout(120)
def test_a_rank_raising_mid_step_makes_the_others_fail_fast_and_be_named() -> None:
    """Rank 1 of 3 raises inside step 1. Nobody kills the others: they must notice the dead
    peer themselves (long before the 60 s group timeout) and say whom they were waiting for."""
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(failing_worker, 3, 1, 3, timeout=90, pg_timeout=60, stop_on_failure=False)
    elapsed = time.monotonic() - t0
    text = str(info.value)
    assert text.startswith("rank 1 failed (of 3)")
    assert "injected failure (debug.fail_at_step) on rank 1" in text
    assert "--- rank 0 ---" in text and "--- rank 2 ---" in text  # both exited by themselves
    assert "from rank 1" in text  # a survivor names the rank it was waiting on
    assert elapsed < 45, f"survivors took {elapsed:.0f}s to notice"


@pytest.mark.timeout(120)
def test_a_stalled_rank_is_bounded_by_the_group_timeout() -> None:
    """Rank 1 never runs its step; rank 0 waits at most the group timeout (3 s) and names
    the transfer and the rank it was waiting for."""
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(stalled_worker, 2, 1, timeout=60, pg_timeout=3)
    elapsed = time.monotonic() - t0
    text = str(info.value)
    assert "rank 0 failed" in text
    assert "1RECV_B0" in text or "RECV" in text
    assert "from rank 1" in text
    assert elapsed < 40


@pytest.mark.timeout(60)
def test_the_deadline_stops_ranks_that_never_finish() -> None:
    with pytest.raises(RankFailure, match="still running"):
        run_ranks(stalled_worker, 1, 0, timeout=8, pg_timeout=30)


@pytest.mark.timeout(120)
def test_ranks_get_the_callers_environment_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks fork from a server started by an earlier launch, holding that moment's
    environment: a variable set since then, or removed, reaches the ranks as it is now."""
    monkeypatch.setenv("SPLITGRAPH_TEST_GONE", "still here")
    assert run_ranks(environ_worker, 2, "SPLITGRAPH_TEST_GONE", timeout=60) == ["still here"] * 2
    monkeypatch.delenv("SPLITGRAPH_TEST_GONE")
    monkeypatch.setenv("SPLITGRAPH_TEST_NEW", "set after the first launch")
    assert (
        run_ranks(environ_worker, 2, "SPLITGRAPH_TEST_NEW", timeout=60)
        == ["set after the first launch"] * 2
    )
    assert run_ranks(environ_worker, 2, "SPLITGRAPH_TEST_GONE", timeout=60) == [None, None]
