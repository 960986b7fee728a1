"""SIGINT and SIGTERM: every rank finishes the step, one checkpoint is committed, one line,
exit code 75; a second signal stops at once. In-process for the rules, the shared 2-rank
launch for the agreement between ranks (SIGTERM on one rank, SIGINT on the other), and one
real launch: SLURM's SIGTERM through launch/slurm.sbatch, srun and torchrun, with a second
job refused from the same run directory meanwhile, and the resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from splitgraph.reliability import checkpoint, runlock, signals
from splitgraph.reliability.signals import EXIT_STOPPED, StopSignals
from tests.conftest import assert_resumed, single_run
from tests.fault_workers import TINY
from tests.reference import weights_rel_err
from tests.test_e2e import REPO, _env

STOP_LINE = re.compile(
    r"stopped by (SIGINT|SIGTERM) at step (\d+); checkpoint (\S+); resume with the same "
    r"command and run_dir=(\S+)$"
)


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _watcher(monkeypatch: pytest.MonkeyPatch, phase: str) -> StopSignals:
    """A StopSignals not installed, whose exits raise instead (to test its rules)."""

    def fake_exit(code: int) -> None:
        raise _Exit(code)

    monkeypatch.setattr(signals.os, "_exit", fake_exit)
    s = StopSignals(rank=0, stream=sys.stderr)
    s.phase, s.step, s.last_saved = phase, 7, "ck/step_00000007"
    return s


def test_the_first_signal_while_training_is_a_flag_and_copies_count_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = _watcher(monkeypatch, "training")
    s.receive(signal.SIGTERM)
    assert s.requested == signal.SIGTERM
    s.receive(signal.SIGTERM)  # torchrun's forwarded copy, within DEDUPE_S
    s.receive(signal.SIGINT)
    assert s.requested == signal.SIGTERM
    s.first_at -= signals.DEDUPE_S  # a second signal, later
    with pytest.raises(_Exit) as info:
        s.receive(signal.SIGINT)
    assert info.value.code == 128 + signal.SIGINT


def test_before_the_first_step_a_signal_stops_at_once(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    s = _watcher(monkeypatch, "starting")
    with pytest.raises(_Exit) as info:
        s.receive(signal.SIGTERM)
    assert info.value.code == 128 + signal.SIGTERM
    err = capfd.readouterr().err
    assert "splitgraph: SIGTERM, before the first step: nothing to save" in err


def test_after_the_last_step_a_first_signal_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _watcher(monkeypatch, "finishing")
    s.receive(signal.SIGINT)  # no exit: the run is writing its results
    s.first_at -= signals.DEDUPE_S
    with pytest.raises(_Exit):
        s.receive(signal.SIGINT)


def test_the_handlers_are_installed_for_the_block_only() -> None:
    before = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
    with StopSignals() as s:
        assert s.active and signal.getsignal(signal.SIGTERM) == s._handler
        s.phase = "training"
        os.kill(os.getpid(), signal.SIGTERM)  # handled: recorded, nothing else
        time.sleep(0.2)
        assert s.requested == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in signals.SIGNALS} == before


_BLOCKED = textwrap.dedent(
    """
    import os, signal, socket, sys, threading, time
    from splitgraph.reliability.signals import StopSignals
    s = StopSignals(rank=0, on_abort=lambda: print("released", file=sys.stderr, flush=True))
    s.__enter__()
    s.phase, s.step, s.last_saved = "training", 12, "run/checkpoints/step_00000010"
    def send():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # a copy: counts once
        time.sleep(2.5)
        print("second", time.monotonic(), file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=send, daemon=True).start()
    a, b = socket.socketpair()
    while True:  # the main thread blocked as in a collective that never returns
        a.recv(1)
        print("main thread woke", s.requested, file=sys.stderr, flush=True)
    """
)


@pytest.mark.timeout(60)
def test_a_second_signal_stops_at_once_while_the_main_thread_is_blocked() -> None:
    res = subprocess.run(
        [sys.executable, "-c", _BLOCKED], capture_output=True, text=True, timeout=45, cwd=REPO
    )
    end = time.monotonic()
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    lines = res.stderr.splitlines()
    second = float(next(x for x in lines if x.startswith("second")).split()[1])
    assert end - second < 10  # at once: not after a timeout (the process start is included)
    assert (
        "splitgraph: SIGTERM at step 12, a second signal: stopped at once, without a "
        "checkpoint; the last committed checkpoint is run/checkpoints/step_00000010." in lines
    )
    assert "released" in lines  # the run-dir lock is released on the way out


def _outcome(run: Path, rank: int) -> str:
    return (run / f"outcome.rank{rank}").read_text()


@pytest.mark.timeout(420)
@pytest.mark.parametrize(("mode", "stop_step"), [("sigterm", 2), ("sigint", 4)])
def test_a_signal_on_one_rank_stops_both_after_the_same_step(
    fault_launches: dict[str, Any], mode: str, stop_step: int
) -> None:
    """The signal reaches one rank only (sigterm: rank 1 as step 1 starts; sigint: rank 0 as
    step 3 starts); the flag travels in the step sum, so both ranks finish that step, write
    one checkpoint together and stop with the same line."""
    run = fault_launches["tmp"] / mode
    texts = [_outcome(run, r) for r in (0, 1)]
    assert texts[0] == texts[1], texts
    name = mode.upper()
    ck = run / "checkpoints" / checkpoint.step_dir_name(stop_step)
    assert texts[0] == (
        f"Stopped: stopped by {name} at step {stop_step}; checkpoint {ck}; resume with the "
        f"same command and run_dir={run}"
    )
    found = checkpoint._inspect(ck)
    assert isinstance(found, checkpoint.Checkpoint) and checkpoint.verify(found) is None
    if mode == "sigint":  # the stopped run's own record
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "stopped" and summary["stopped_by"] == name
        assert summary["steps"] == stop_step and summary["checkpoint"] == str(ck)
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").open()]
        assert steps == list(range(stop_step))
        assert not (run / "model.pt").exists() and not (run / runlock.LOCK_NAME).exists()
    else:  # then resumed with the same command: it trains steps 2-5 only, to the same weights
        assert_resumed(run, stop_step, 6)
        single_run(["trace.enabled=false", "train.steps=6", f"run_dir={run.parent / 'sig-ref'}"])
        got = torch.load(run / "model.pt", weights_only=True)
        ref = torch.load(run.parent / "sig-ref" / "model.pt", weights_only=True)
        assert weights_rel_err(got, ref) < 1e-12  # 2 ranks vs 1: rounding only


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int, timeout: float = 150) -> None:
    end = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stdout.read()}")  # type: ignore[union-attr]
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout} s")


LONG = [*TINY, "trace.enabled=false", "train.steps=1000000", "checkpoint.every=100000"]


def _fake_slurm(tmp: Path) -> dict[str, str]:
    """`srun` and `scontrol` stand-ins: srun drops its own options and runs the command, so
    the batch script's trap signals the launcher directly, as srun's forwarding would."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift 2\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env()
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHON=sys.executable,
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_JOB_ID="4242",
        GPUS_PER_NODE="2",
        SPLITGRAPH_RDZV_PORT=str(port),
    )
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(var, None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc").exists(), reason="process groups as on Linux")
def test_slurm_sigterm_reaches_every_rank_through_the_batch_script_and_torchrun(
    tmp_path: Path,
) -> None:
    """`#SBATCH --signal=B:TERM@120` signals the batch shell only: its trap forwards SIGTERM
    to srun, srun to the launcher, torchrun to both ranks. Meanwhile a second job in the same
    run directory is refused and touches nothing."""
    run = tmp_path / "run"
    env = _fake_slurm(tmp_path)
    env["SPLITGRAPH_RUN_DIR"] = str(run)
    proc = subprocess.Popen(
        ["bash", "launch/slurm.sbatch", *LONG],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_steps(run, proc, 5)
        hydra_record = (run / ".hydra" / "overrides.yaml").read_bytes()
        other = subprocess.run(
            [sys.executable, "-m", "splitgraph.train", *TINY, "optim.lr=0.5", f"run_dir={run}"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.kill(proc.pid, signal.SIGTERM)  # the batch shell only, as B: does
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the second job: one line naming the first, exit 2, nothing of the first's overwritten
    assert other.returncode == 2, other.stderr[-2000:]
    refusal = other.stderr.strip().splitlines()
    assert len(refusal) == 1 and f"run dir {run} is in use by another job: pid " in refusal[0]
    assert "torchrun job 4242, attempt 0" in refusal[0]
    assert (run / ".hydra" / "overrides.yaml").read_bytes() == hydra_record
    # the first: every rank stopped after the same step, one line, exit 75, nothing else
    assert proc.returncode == EXIT_STOPPED, out[-4000:]
    assert "Traceback" not in out and "death signal" not in out
    after = out[out.index("100000 checkpoint") if "100000 checkpoint" in out else 0 :]
    stops = [x for x in after.splitlines() if "stopped by" in x]
    assert len(stops) == 1, out[-3000:]
    m = STOP_LINE.search(stops[0])
    assert m and m[1] == "SIGTERM" and m[4] == str(run), stops
    n = int(m[2])
    ck = checkpoint._inspect(Path(m[3]))
    assert isinstance(ck, checkpoint.Checkpoint) and ck.step == n and ck.meta["world_size"] == 2
    assert checkpoint.verify(ck) is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stopped_by"] == "SIGTERM"
    assert not (run / runlock.LOCK_NAME).exists()
    # the same command (here to a nearer end, on one process) resumes at step n
    single_run([*LONG[len(TINY) :], f"train.steps={n + 2}", f"run_dir={run}"])
    assert_resumed(run, n, n + 2)
