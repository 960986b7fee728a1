"""One job per run directory: the lock file, how a leftover one is recognised, and the
one-line refusals (a busy run dir, a run_dir that is a file)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from splitgraph.errors import RunDirError
from splitgraph.reliability import runlock
from tests.conftest import single_run


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """Another live process on this host: the holder of someone else's lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _lock_of(path: Path, pid: int, **changes: object) -> runlock.Holder:
    """Write a lock file for `pid` as its own process would have, with `changes`."""
    holder = replace(
        runlock.Holder.current(),
        pid=pid,
        start_ticks=runlock._start_ticks(pid),
        command="python -m splitgraph.train run_dir=D",
        token="theirs",
    )
    holder = replace(holder, **changes)  # type: ignore[arg-type]
    path.mkdir(parents=True, exist_ok=True)
    (path / runlock.LOCK_NAME).write_text(json.dumps(asdict(holder)))
    return holder


def test_the_lock_is_held_for_the_block_and_released(tmp_path: Path) -> None:
    with runlock.hold(tmp_path / "run", 0) as lock:
        assert lock is not None
        found = json.loads((tmp_path / "run" / runlock.LOCK_NAME).read_text())
        assert found["pid"] == os.getpid() and found["host"] == socket.gethostname()
        assert runlock.acquire(tmp_path / "run") is lock  # re-entrant: the same hold
        lock.release()
        assert (tmp_path / "run" / runlock.LOCK_NAME).exists()
    assert not (tmp_path / "run" / runlock.LOCK_NAME).exists()


def test_a_live_holder_refuses_with_one_line_naming_it(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    _lock_of(tmp_path, sleeper.pid)
    with pytest.raises(RunDirError) as info:
        runlock.acquire(tmp_path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"run dir {tmp_path} is in use by another job: pid {sleeper.pid} on ")
    assert "python -m splitgraph.train run_dir=D" in text
    assert f"if that job is gone, delete {tmp_path / runlock.LOCK_NAME}" in text
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["token"] == "theirs"


def test_a_dead_or_recycled_holder_is_taken_over_with_a_warning(
    tmp_path: Path, sleeper: subprocess.Popen, caplog: pytest.LogCaptureFixture
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(done.stdout)
    cases = [
        (dict(pid=dead, start_ticks=None), f"pid {dead} has exited"),
        (dict(pid=sleeper.pid, start_ticks=1), "now belongs to another process"),  # recycled
        (dict(pid=sleeper.pid, boot_id="another boot"), "its host rebooted since"),
    ]
    for changes, reason in cases:
        _lock_of(tmp_path, **changes)  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="splitgraph"):
            lock = runlock.acquire(tmp_path)
            assert lock.took_over is not None
            caplog.clear()
            with runlock.hold(tmp_path, 0):  # logs it, once, when logging is set up
                pass
        assert f"taking over the lock of pid {changes['pid']} " in caplog.text
        assert f"{reason})" in caplog.text
        assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
        caplog.clear()


def test_another_host_is_assumed_alive_unless_it_is_this_torchrun_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _lock_of(tmp_path, 1, host="node-b", job="other-job")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "my-job")
    with pytest.raises(RunDirError, match="in use by another job: pid 1 on host node-b"):
        runlock.acquire(tmp_path)
    # a restart of the same job whose rank 0 moved to another node: the old attempt is over
    _lock_of(tmp_path, 1, host="node-b", job="my-job", attempt=0)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING, logger="splitgraph"), runlock.hold(tmp_path, 0):
        pass
    assert "(an earlier attempt (0) of this torchrun job)" in caplog.text


def test_the_same_job_id_alive_on_this_host_is_still_refused(
    tmp_path: Path, sleeper: subprocess.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two launches reusing one --rdzv-id at once are two jobs: liveness decides."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "shared-id")
    _lock_of(tmp_path, sleeper.pid, job="shared-id")
    with pytest.raises(RunDirError, match="in use by another job"):
        runlock.acquire(tmp_path)


def test_an_unreadable_lock_is_waited_for_then_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / runlock.LOCK_NAME
    path.write_text("")  # a crash between creating the file and writing it
    os.utime(path, (1, 1))  # long ago
    with caplog.at_level(logging.WARNING, logger="splitgraph"), runlock.hold(tmp_path, 0):
        pass
    assert "(an unreadable lock file left by a crash)" in caplog.text


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    lock = runlock.acquire(tmp_path)
    _lock_of(tmp_path, os.getpid(), token="someone else's")
    lock.release()
    assert (tmp_path / runlock.LOCK_NAME).exists()


def test_other_ranks_refuse_only_a_provably_different_live_job(
    tmp_path: Path, sleeper: subprocess.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lock_of(tmp_path, sleeper.pid, job="job-a")
    runlock.check_not_taken(tmp_path)  # no torchrun job id here: rank 0 decides
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    runlock.check_not_taken(tmp_path)  # our own rank 0's lock
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(RunDirError, match=f"pid {sleeper.pid}"):
        runlock.check_not_taken(tmp_path)
    _lock_of(tmp_path, sleeper.pid, job="job-a", host="node-b")
    runlock.check_not_taken(tmp_path)  # another host: not provable from here


def test_training_refuses_a_busy_run_dir_before_reading_anything(
    tmp_path: Path, sleeper: subprocess.Popen
) -> None:
    run = tmp_path / "run"
    _lock_of(run, sleeper.pid)
    with pytest.raises(RunDirError, match="in use by another job"):
        single_run(["trace.enabled=false", "train.steps=2", f"run_dir={run}"])
    assert sorted(p.name for p in run.iterdir()) == [runlock.LOCK_NAME]


def test_a_run_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    file = tmp_path / "afile"
    file.write_text("mine")
    with pytest.raises(RunDirError, match=r"is a file, not a directory: choose another run_dir"):
        runlock.check_run_dir(file)
    with pytest.raises(RunDirError, match=r"is under .*afile, which is a file"):
        runlock.check_run_dir(file / "sub")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SPLITGRAPH_RUN_DIR", None)
    res = subprocess.run(
        [sys.executable, "-m", "splitgraph.train", f"run_dir={file}", "train.steps=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == (
        f"splitgraph (rank 0): run_dir='{file}' is a file, not a directory: choose another "
        "run_dir (or SPLITGRAPH_RUN_DIR), or move the file away."
    )
    assert file.read_text() == "mine"
