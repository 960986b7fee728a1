"""The hang watchdog: a stalled rank stops the job with the schedule grid of where every rank
waits, exit code 3, long before the process group's own timeout."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from splitgraph.errors import RankFailure
from splitgraph.reliability.watchdog import Watchdog
from splitgraph.runtime.executor import _compile
from splitgraph.schedule import build_schedule
from splitgraph.spawn import run_ranks
from tests.fault_workers import STALL, train_runs


def _watchdog(rank: int, position: tuple[int, float] | None) -> Watchdog:
    sched = build_schedule("1f1b", 2, 4)
    executor = SimpleNamespace(program=_compile(sched.actions[rank]), position=position)
    return Watchdog(sched, rank, 2, 5.0, executor)


def test_the_report_marks_each_ranks_action_in_the_grid() -> None:
    """Rank 0 sits in 0B0 (program item 4, action 5), which waits for rank 1's gradient;
    rank 1 is outside the schedule, in the loss all-reduce."""
    now = time.monotonic()
    w0 = _watchdog(0, (4, now - 7.0))
    w0.beat(3, "the schedule")
    w0._beat = (3, "the schedule", now - 8.0)  # the step began before the action did
    st0 = w0.status()
    assert st0["index"] == 5 and st0["where"] == "action 0B0 (input: 0RECV_B0 from rank 1)"
    assert 7.0 <= st0["waited"] < 8.0
    w1 = _watchdog(1, None)
    w1.beat(3, "the all-reduce of the step's loss")
    st1 = w1.status()
    assert st1["index"] is None
    text = w0.report({0: {**st0, "detected": True}, 1: st1})
    assert text.startswith("hang watchdog: no action finished on rank 0 for 5 s")
    assert "rank 0: step 3, waiting 7." in text and "(its action 5)" in text
    assert "rank 1: step 3, waiting 0.0 s on the all-reduce of the step's loss" in text
    row = next(line for line in text.splitlines() if line.lstrip().startswith("5 "))
    assert "*0B0" in row and "<-- ERROR HERE: rank 0: 7." in row
    assert "(rank 1, after its last action: 0.0 s in the all-reduce" in text
    # a transfer group in progress is named with its peers
    w = _watchdog(1, None)
    w.executor.position = (3, time.monotonic())
    assert w.status()["where"] == "transfer 1SEND_B0 (to rank 0), 1RECV_F1 (from rank 0)"
    # a rank that did not answer is said so
    assert "rank 1: no answer within" in w0.report({0: st0})


def test_the_v_placement_names_the_rank_each_input_comes_from() -> None:
    """zbv on 2 ranks: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2. Stage 3's input
    comes from rank 1 (round robin would put stage 2 on rank 0, a local hand-over), stage
    2's from rank 1 itself (the turn: no wait), stage 0's gradient from rank 1."""
    sched = build_schedule("zbv", 2, 4, 2)
    labels = {}
    for rank in (0, 1):
        program = _compile(sched.actions[rank])
        w = Watchdog(sched, rank, 2, 5.0, SimpleNamespace(program=program, position=None))
        for i, item in enumerate(program):
            w.executor.position = (i, time.monotonic())
            labels[str(item)] = w.status()["where"]
    assert labels["3F0"] == "action 3F0 (input: 3RECV_F0 from rank 1)"
    assert labels["2F0"] == "action 2F0"
    assert labels["0I0"] == "action 0I0 (input: 0RECV_B0 from rank 1)"
    assert labels["1I0"] == "action 1I0"  # stage 2's gradient, on rank 1 itself


def test_pausing_hides_a_long_checkpoint_save() -> None:
    w = _watchdog(0, None)
    w.beat(2, "the schedule")
    with w.paused("saving a checkpoint"):
        assert w._paused == 1
    assert w._paused == 0 and w.status()["where"] == "after saving a checkpoint"


@pytest.mark.timeout(120)
def test_a_stalled_rank_stops_every_rank_with_the_grid(tmp_path: Path) -> None:
    """Rank 1 of 2 stalls inside its schedule at step 1; with runtime.hang_timeout=2 both
    ranks exit with code 3 (not the 60 s group timeout), and rank 0 writes the grid."""
    run = [*STALL, f"run_dir={tmp_path}"]
    with pytest.raises(RankFailure) as info:
        run_ranks(train_runs, 2, [run], timeout=100, pg_timeout=60, stop_on_failure=False)
    text = str(info.value)
    assert "--- rank 0 ---\nexited with code 3" in text
    assert "--- rank 1 ---\nexited with code 3" in text
    report = (tmp_path / "hang_report.txt").read_text()
    assert re.search(r"no action finished on rank [01](, [01])? for 2 s", report), report
    # rank 1 stalled in its action 1 (1F0); rank 0 waits in 0B0 for rank 1's gradient
    assert re.search(r"rank 1: step 1, waiting \d+\.\d s on action 1F0 .*\(its action 1\)", report)
    assert re.search(r"rank 0: step 1, waiting \d+\.\d s on action 0B0 \(input: 0RECV_B0", report)
    waited = [float(w) for w in re.findall(r"waiting (\d+\.\d) s", report)]
    assert max(waited) < 10, report  # reported within a few polls of the 2 s timeout
    assert "*1F0" in report and "*0B0" in report


class _BrokenStore:
    def check(self, keys: list[str]) -> bool:
        raise RuntimeError("Connection reset by peer")


def test_a_failing_store_or_position_keeps_hang_detection_on_and_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: any exception in the watching thread turned hang detection off for the rest
    of the run, silently."""
    w = _watchdog(0, None)
    w.store = _BrokenStore()
    w.beat(4, "the schedule")
    assert w._other_fired() is False and w._other_fired() is False
    err = capsys.readouterr().err
    assert err.count("hang watchdog, rank 0: the process group's store cannot be read") == 1
    assert "this rank still stops the job if it waits 5 s" in err and w.store is None
    # the executor's position unreadable: the loop's own clock still times the step
    w.executor = SimpleNamespace(program=w.executor.program, position=("bad",))
    w._beat = (4, "the schedule", time.monotonic() - 6.0)
    assert w._stalled() is True
    assert "cannot read where this rank is in its schedule" in capsys.readouterr().err
    # and it still fires: the report says what it knows, then the rank exits with code 3
    fired: list[int] = []
    monkeypatch.setattr("splitgraph.reliability.watchdog.os._exit", fired.append)
    w.start()
    w._thread.join(timeout=10)
    assert fired == [3]
    assert "no action finished on rank 0 for 5 s" in capsys.readouterr().err
