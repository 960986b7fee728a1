"""`splitgraph-train --nproc N` (train/fork.py), the launcher launch/train.sh uses: what it
must do as torchrun does. Its ranks train torchrun's weights (tests/test_e2e.py, beside the
torchrun launch); a bad config is refused before any rank exists (the launch/train.sh tests of
test_e2e.py and test_preflight.py); here: a failed rank is named and the others stopped, a
signal stops every rank at a step with one checkpoint and one line while the run dir stays
locked, and the launcher's own deadlines, on ranks that do not stop by themselves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from splitgraph.reliability import checkpoint, runlock
from splitgraph.reliability.signals import EXIT_STOPPED
from tests.fault_workers import TINY
from tests.test_e2e import REPO, SMALL, _env

FORK = [sys.executable, "-m", "splitgraph.train", "--nproc"]
LONG = [*TINY, "trace.enabled=false", "train.steps=1000000", "checkpoint.every=100000"]


def _running(marker: str) -> list[int]:
    """Processes whose command line names `marker` (forked ranks share the launcher's)."""
    found = []
    for d in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if d.isdigit() and marker.encode() in cmd:
            found.append(int(d))
    return found


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc").exists(), reason="looks for leftover ranks in /proc")
def test_a_failed_rank_is_named_in_one_line_and_no_rank_is_left(tmp_path: Path) -> None:
    run = tmp_path / "run"
    over = ["train.steps=20", "debug.fail_at_step=2", "debug.fail_rank=1", "runtime.timeout=60"]
    t0 = time.monotonic()
    res = subprocess.run(
        [*FORK, "2", *SMALL, *over, f"run_dir={run}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=100,
    )
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stderr[-3000:]
    assert "injected failure (debug.fail_at_step) on rank 1" in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("splitgraph-train: ")]
    assert len(lines) == 1 and lines[0].startswith(
        "splitgraph-train: rank 1 failed first: it exited with code 1"
    ), res.stderr[-3000:]
    assert not _running(str(run)), "a rank outlived the launcher"
    assert elapsed < 50, f"took {elapsed:.0f}s: the survivor waited for the timeout"
    assert not (run / runlock.LOCK_NAME).exists()


_FAKE = textwrap.dedent(
    """
    import os, signal, sys, time
    from splitgraph.train.fork import fork_ranks

    def say(text):  # one write: lines of two ranks never interleave in the pipe
        os.write(1, (text + "\\n").encode())

    def rank_main(rank):
        if sys.argv[1] == "fail":  # rank 1 fails at once; rank 0 would wait for it forever
            if rank == 1:
                return 7
        else:  # a rank that never finishes its step: it notes each signal and goes on
            signal.signal(signal.SIGTERM, lambda *a: say(f"rank {rank} got SIGTERM"))
        say(f"ready {rank}")
        time.sleep(600)
        return 0

    code = fork_ranks(2, rank_main, grace=1.0, kill_after=1.0)
    say(f"exit {code}")
    """
)


def _fake_launch(mode: str) -> subprocess.Popen[str]:
    """The launcher on ranks that only wait (`mode` "fail": rank 1 fails at once; else
    they ignore SIGTERM)."""
    return subprocess.Popen(
        [sys.executable, "-c", _FAKE, mode],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], wanted: set[str]) -> None:
    assert proc.stdout is not None
    while wanted:
        line = proc.stdout.readline()
        assert line, f"the launch ended before printing {wanted}"
        wanted.discard(line.strip())


@pytest.mark.timeout(60)
def test_ranks_that_do_not_stop_by_themselves_are_killed_on_a_deadline() -> None:
    """After a failure, a rank that would wait forever is killed once the grace has passed;
    every signal is forwarded to every rank, and ranks still running past the deadline after
    a second signal are killed: the launcher never hangs on its ranks."""
    with _fake_launch("fail") as proc:
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()  # its ranks die with it
    assert proc.returncode == 0 and "exit 7" in out, out + err
    assert err.strip().endswith(
        "rank 1 failed first: it exited with code 7; then rank 0 died of SIGKILL (killed by "
        "the launcher)"
    ), err

    with _fake_launch("signals") as proc:
        try:
            _read_until(proc, {"ready 0", "ready 1"})
            proc.send_signal(signal.SIGTERM)
            _read_until(proc, {"rank 0 got SIGTERM", "rank 1 got SIGTERM"})
            time.sleep(2.5)  # past DEDUPE_S: a second signal, not a copy of the first
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert time.monotonic() - t0 < 10
    assert out.count("got SIGTERM") == 2 and f"exit {128 + signal.SIGTERM}" in out, out + err
    assert "rank(s) 0, 1 had not stopped 1 s after the second signal: killed" in err, err


def _wait_for_steps(run: Path, proc: subprocess.Popen[str], n: int, timeout: float = 150) -> None:
    end = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()}")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout} s")


@pytest.mark.timeout(240)
def test_sigterm_stops_every_rank_at_a_step_with_one_checkpoint_and_one_line(
    tmp_path: Path,
) -> None:
    """SIGTERM to the launcher (as `kill` or SLURM sends it): both ranks finish the step and
    commit one checkpoint, one stop line, exit 75, the lock released. Meanwhile the run dir
    (SPLITGRAPH_RUN_DIR) is locked by the launcher, and a second launch into it is refused
    before it forks or writes anything."""
    run = tmp_path / "run"
    env = dict(_env(), SPLITGRAPH_RUN_DIR=str(run))
    proc = subprocess.Popen(
        [*FORK, "2", *LONG],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_steps(run, proc, 3)
        holder = json.loads((run / runlock.LOCK_NAME).read_text())
        assert holder["pid"] == proc.pid and holder["job"] is None
        hydra_record = (run / ".hydra" / "overrides.yaml").read_bytes()
        other = subprocess.run(
            [*FORK, "2", *TINY, "optim.lr=0.5"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 2, other.stderr[-2000:]
        assert f"run dir {run} is in use by another job: pid {proc.pid}" in other.stderr
        assert (run / ".hydra" / "overrides.yaml").read_bytes() == hydra_record
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    stops = [x for x in out.splitlines() if "stopped by SIGTERM at step" in x]
    assert len(stops) == 1, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stopped_by"] == "SIGTERM"
    ck = run / "checkpoints" / checkpoint.step_dir_name(summary["steps"])
    assert summary["checkpoint"] == str(ck) and str(ck) in stops[0]
    found = checkpoint._inspect(ck)
    assert isinstance(found, checkpoint.Checkpoint) and checkpoint.verify(found) is None
    assert [p.name for p in (run / "checkpoints").iterdir()] == [ck.name]
    assert not (run / runlock.LOCK_NAME).exists()


_LOCKED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from splitgraph.reliability import runlock
    from splitgraph.train.fork import fork_ranks

    run = Path(sys.argv[1])
    runlock.acquire(run)  # as the launcher takes it (RunDirCheck) before forking
    code = fork_ranks(1, lambda rank: (runlock.release_all(), 0)[1])  # a rank stopping at once
    print(code, (run / runlock.LOCK_NAME).exists())
    """
)


@pytest.mark.timeout(60)
def test_a_forked_rank_never_removes_the_launchers_lock(tmp_path: Path) -> None:
    """A rank that stops at once releases its locks (reliability/signals.py): the run dir's,
    which it inherited from the launcher, stays the launcher's until the launcher exits."""
    res = subprocess.run(
        [sys.executable, "-c", _LOCKED, str(tmp_path / "run")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert res.returncode == 0 and res.stdout.split() == ["0", "True"], res.stdout + res.stderr
