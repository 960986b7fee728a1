"""The real command lines: torchrun + Hydra overrides, the run directory, the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitgraph.bench.launch import train_command
from splitgraph.config import load_config
from splitgraph.model import build_mlp

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.hidden=[32,48,16]",
    "data.samples=512",
    "train.batch_size=64",
    "train.steps=5",
    "train.progress=false",
    "runtime.dtype=float64",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SPLITGRAPH_RUN_DIR", None)
    return env


def torchrun(nproc: int, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = train_command(nproc, overrides, launcher="torchrun")  # as users type it
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_pipeline_matches_single_process_training(
    tmp_path: Path, one_process_small: Path
) -> None:
    """torchrun's 2-rank run equals one process's training; the fork launcher's equals it."""
    over = [*SMALL, "schedule=gpipe", "pipeline.microbatches=4", "partition=params"]
    pp = torchrun(2, *over, f"run_dir={tmp_path / 'pp'}")
    assert pp.returncode == 0, pp.stderr[-3000:]

    run = tmp_path / "pp"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(5))
    assert {"L", "J", "s", "step_time", "samples_per_s"} <= set(lines[0])
    assert all(r["J"] > r["L"] for r in lines)  # weight decay on by default
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["plan"]["strategy"] == "params" and len(summary["plan"]["stages"]) == 2
    assert [m["rank"] for m in summary["memory_per_rank"]] == [0, 1]
    assert all(m["saved_activation_peak_bytes"] > 0 for m in summary["memory_per_rank"])
    assert summary["step_time_median_s"] > 0
    timeline = summary["timeline"]  # measured per-action timeline, set against the simulator
    assert (run / "trace.json").exists() and (run / "timeline.png").exists()
    trace = json.loads((run / "trace.json").read_text())
    forwards = [e for e in trace["traceEvents"] if e.get("cat") == "F"]
    assert {e["pid"] for e in forwards} == {0, 1}
    assert len(forwards) == 2 * 4 * (timeline["steps_traced"][1] - timeline["steps_traced"][0] + 1)
    assert all(0.0 <= b <= 1.0 for b in timeline["measured"]["bubble_per_rank"])
    assert timeline["reconstructed"]["step_time_s"] > 0
    assert timeline["measured_over_reconstructed_step_time"] > 0
    test = summary["final"]["test"]
    assert test["samples"] == 51 and 0.0 <= test["accuracy"] <= 1.0 and test["loss"] > 0
    assert "plan: params" in pp.stdout + pp.stderr  # the plan table, printed by rank 0

    # The consolidated checkpoint loads into the single-device model and equals the weights
    # of one process trained on the full minibatch for the same 5 steps (conftest).
    cfg = load_config(over)
    model = build_mlp(cfg, dtype=torch.float64)
    state = torch.load(run / "model.pt", weights_only=True)
    model.load_state_dict(state)
    ref = torch.load(one_process_small / "model.pt", weights_only=True)
    assert state.keys() == ref.keys()
    for k in ref:
        err = (state[k] - ref[k]).abs().max() / ref[k].abs().max()
        assert err < 1e-10, (k, float(err))

    # The fork launcher (splitgraph-train --nproc 2, launch/train.sh's) trains the same run
    # to the same weights and losses as torchrun: the same ranks, on the same config.
    fork = subprocess.run(
        [sys.executable, "-m", "splitgraph.train", "--nproc", "2", *over, f"run_dir={tmp_path}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fork.returncode == 0, fork.stderr[-3000:]
    forked = torch.load(tmp_path / "model.pt", weights_only=True)
    assert forked.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(forked[k], state[k], rtol=0, atol=0)
    again = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["L"], r["J"]) for r in again] == [(r["L"], r["J"]) for r in lines]
    assert json.loads((tmp_path / "summary.json").read_text())["final"] == summary["final"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_init_from_checkpoint_continues_from_those_weights(
    tmp_path: Path, one_process_small: Path
) -> None:
    """A 2-rank run starts from the trained weights of one process (conftest), not its own
    initial ones: one step at a negligible learning rate leaves them in place."""
    over = [*SMALL, "schedule=1f1b", "pipeline.microbatches=2", "checkpoint.save=true"]
    again = torchrun(
        2,
        *over,
        "train.steps=1",
        "optim.lr=1e-12",
        "trace.picture=false",  # the first test reads the picture
        f"checkpoint.init_from={one_process_small / 'model.pt'}",
        f"run_dir={tmp_path / 'b'}",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(one_process_small / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-9), k


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rank_failing_mid_run_fails_the_job_and_names_the_rank(tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = torchrun(
        3,
        *SMALL,
        "train.steps=20",
        "debug.fail_at_step=2",
        "debug.fail_rank=1",
        "runtime.timeout=60",
        f"run_dir={tmp_path}",
    )
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "injected failure (debug.fail_at_step) on rank 1" in out
    assert elapsed < 50, f"took {elapsed:.0f}s: the survivors waited for the timeout"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_config_exits_nonzero_with_the_message_before_training(tmp_path: Path) -> None:
    res = torchrun(2, "pipeline.microbatches=300", f"run_dir={tmp_path}", timeout=60)
    assert res.returncode != 0
    assert "pipeline.microbatches=300 exceeds train.batch_size=256" in res.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.timeout(60)
def launch_script(run_dir: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `launch/<script> args...` with the run directory pinned to `run_dir`."""
    env = dict(_env(), PYTHON=sys.executable, SPLITGRAPH_RUN_DIR=str(run_dir))
    return subprocess.run(
        [str(REPO / "launch" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_launch_script_refuses_before_spawning(tmp_path: Path) -> None:
    res = launch_script(tmp_path / "run", "train.sh", "4", "pipeline.microbatches=0")
    assert res.returncode == 2
    assert "pipeline.microbatches=0 must be >= 1" in res.stderr
    assert "torch.distributed" not in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_check_command() -> None:
    from splitgraph.train.cli import check_main

    assert check_main(["--nproc", "2", "schedule=gpipe"]) == 0
    assert check_main(["--nproc", "2", "schedule=interleaved", "model.hidden=[8,8,8]"]) == 0
    # interleaved runs any m (torch's rounds); the V schedules place stage s and 2p-1-s on s
    assert check_main(["--nproc", "2", "schedule=interleaved", "pipeline.microbatches=3"]) == 0
    assert check_main(["--nproc", "2", "schedule=zbv", "model.hidden=[8,8,8]"]) == 0
    assert check_main(["--nproc", "2", "schedule=zbv", "schedule.virtual_stages=1"]) == 2
    assert check_main(["--nproc", "9"]) == 2
    assert check_main(["--nproc", "2", "pipeline.microbatch=2"]) == 2
