"""The real launcher: `torchrun --max-restarts` recovers a killed rank from the last checkpoint,
and a one-node launch's ranks listen on loopback only. (The watchdog's exit and report are
tested on `run_ranks` in test_watchdog.py: torchrun treats exit code 3 as any failure.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from splitgraph.runtime.dist import restart_safe_store
from tests.conftest import assert_resumed, single_run
from tests.fault_workers import TINY
from tests.reference import weights_rel_err
from tests.test_e2e import REPO, _env


def _torchrun(nproc: int, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    env = _env()
    for var in (
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",  # the restart must work with torchrun's default
    ):
        env.pop(var, None)
    return subprocess.Popen(
        [*cmd, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_restarted_ranks_meet_in_a_store_namespace_of_their_own() -> None:
    """torchrun keeps its store across restarts; attempt 1 must not read attempt 0's keys
    (a dead rank's address)."""
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    env = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(server.port),
        "TORCHELASTIC_RESTART_COUNT": "0",
    }
    first = restart_safe_store(10, env)
    first.set("rank0/address", "the failed attempt's")
    again = restart_safe_store(10, {**env, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert not again.check(["rank0/address"])
    assert restart_safe_store(10, {**env, "LOCAL_WORLD_SIZE": "1"}) is None  # several nodes
    assert restart_safe_store(10, {}) is None  # not under torchrun's agent store


def _listening(root: int) -> dict[int, set[str]]:
    """pid -> the addresses (hex, as in /proc/net/tcp*) its listening TCP sockets are bound
    to, for `root` and its descendants."""
    pids, frontier = {root}, [root]
    while frontier:
        kids = Path(f"/proc/{frontier.pop()}/task")
        for task in kids.glob("*/children") if kids.exists() else []:
            try:  # a thread (or the process) may exit between the listing and the read
                children = task.read_text().split()
            except OSError:
                continue
            for pid in map(int, children):
                if pid not in pids:
                    pids.add(pid)
                    frontier.append(pid)
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in owner:  # 0A: LISTEN
                found.setdefault(owner[f[9]], set()).add(f[1].rsplit(":", 1)[0])
    return found


_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed inside step 3 of the first attempt; torchrun restarts both ranks,
    which resume from the step-2 checkpoint and end with the weights of a run never killed.
    While it runs, every socket the ranks listen on is bound to loopback (torchrun's own
    store is not ours to bind: see docs/reliability.md, "Network")."""
    over = [*TINY, "train.steps=6", "checkpoint.every=2"]
    t0 = time.monotonic()
    proc = _torchrun(
        2,
        "--max-restarts=1",
        "-m",
        "splitgraph.train",
        *over,
        "debug.fail_at_step=3",
        "debug.fail_rank=1",
        "debug.fail_mode=kill",
        f"run_dir={tmp_path / 'run'}",
    )
    ranks: dict[int, set[str]] = {}
    while proc.poll() is None and time.monotonic() - t0 < 200:
        for pid, addrs in _listening(proc.pid).items():
            if pid != proc.pid:  # the ranks, not the torchrun agent
                ranks.setdefault(pid, set()).update(addrs)
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-4000:]
    assert "failed (exitcode: -9) local_rank: 1" in out  # torchrun saw the SIGKILL, restarted
    assert re.search(r"resumed from \S+step_00000002 at step 2 \(saved on 2 stages", out), out
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == list(range(6))
    assert_resumed(tmp_path / "run", 2, 6)  # the restarted attempt trained steps 2-5 only
    single_run([*over[len(TINY) :], f"run_dir={tmp_path / 'ref'}"])
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    ref = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    assert weights_rel_err(got, ref) < 1e-12  # 2 ranks vs 1: rounding only (measured ~1e-16)
    assert ranks, "no rank was seen listening (gloo listens while the group lives)"
    for pid, addrs in ranks.items():
        assert addrs <= _LOOPBACK, f"rank process {pid} listens on {addrs}"
