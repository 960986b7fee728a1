"""Checkpoints survive restarts and re-partitioning, and a save cut short loses nothing.

The multi-rank runs are cases of the session's shared launches (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitgraph.config import load_config
from splitgraph.reliability import checkpoint
from tests.conftest import OPTIMS, assert_resumed, single_run, step3
from tests.fault_workers import TINY
from tests.reference import weights_rel_err


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("opt", list(OPTIMS))
def test_resume_on_the_same_layout_is_bitwise_exact(
    fault_launches: dict[str, Any], opt: str
) -> None:
    d = fault_launches["tmp"] / opt
    full, part = _weights(d / "full"), _weights(d / "part")
    for k in full:
        assert torch.equal(full[k], part[k]), k
    steps = [line.split(",")[0] for line in (d / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [f'{{"step": {i}' for i in range(6)]  # each step once, across the resume
    assert [c.step for c in checkpoint.list_checkpoints(d / "part" / "checkpoints")] == [3, 6]
    assert_resumed(d / "part", 3, 6)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("opt", list(OPTIMS))
def test_resume_on_4_stages_continues_the_same_weights_and_optimizer_state(
    fault_launches: dict[str, Any], opt: str
) -> None:
    """Saved on 2 stages, loaded on 4: every weight and every optimizer tensor, by name, is
    bitwise what was saved; training on continues to the uninterrupted weights."""
    ck = checkpoint._committed(step3(fault_launches["tmp"], opt))
    assert ck is not None and ck.meta["world_size"] == 2
    meta = checkpoint.read_metadata(ck.path)
    saved = checkpoint.read_rank_state(ck, meta, list(checkpoint.param_shapes(_cfg().model)), 0)
    per_rank = fault_launches["four"][opt]
    model = {n: t for r in per_rank for n, t in r["model"].items()}
    optim = {n: st for r in per_rank for n, st in r["optim"].items()}
    assert model.keys() == saved.model.keys() and len(per_rank) == 4
    for n in model:
        assert torch.equal(model[n], saved.model[n]), n
    assert optim.keys() == saved.optim.keys() == model.keys()  # every parameter has state
    for n in optim:
        assert optim[n].keys() == saved.optim[n].keys()
        for k in optim[n]:
            assert torch.equal(optim[n][k], saved.optim[n][k]), (n, k)
    # float64: equal to the uninterrupted one-device run up to rounding (measured ~1e-16)
    d = fault_launches["tmp"] / opt
    assert_resumed(d / "four", 3, 6)
    assert weights_rel_err(_weights(d / "four"), _weights(d / "ref")) < 1e-12


@pytest.mark.timeout(420)
@pytest.mark.parametrize("opt", list(OPTIMS))
def test_resume_on_another_partition_and_on_one_device(
    fault_launches: dict[str, Any], opt: str
) -> None:
    d = fault_launches["tmp"] / opt
    ref = _weights(d / "ref")
    assert_resumed(d / "params", 3, 6)
    assert_resumed(d / "one", 3, 6)
    assert weights_rel_err(_weights(d / "params"), ref) < 1e-12
    assert weights_rel_err(_weights(d / "one"), ref) < 1e-12
    assert weights_rel_err(_weights(d / "full"), ref) < 1e-12  # 2 ranks vs 1: rounding only


@pytest.mark.timeout(420)
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint(
    fault_launches: dict[str, Any],
) -> None:
    tmp = fault_launches["tmp"]
    text = fault_launches["killed"]
    assert "--- rank 1 ---\nexited with code -9" in text  # SIGKILL, mid-save
    assert "--- rank 0 ---" in text  # rank 0 noticed the dead peer by itself, did not hang
    ckdir = tmp / "kill" / "checkpoints"
    assert [c.step for c in checkpoint.list_checkpoints(ckdir)] == [2]
    cut = ckdir / ".step_00000004.tmp"
    assert (cut / "__1_0.distcp").exists() and not (cut / checkpoint.MARKER).exists()
    assert not (tmp / "kill" / "model.pt").exists()
    # the restart: auto-resume takes step 2, and the run ends where an unkilled one does
    single_run(["train.steps=6", "checkpoint.every=2", f"run_dir={tmp / 'kill'}"])
    assert_resumed(tmp / "kill", 2, 6)
    single_run(["train.steps=6", f"run_dir={tmp / 'kill-ref'}"])
    assert weights_rel_err(_weights(tmp / "kill"), _weights(tmp / "kill-ref")) < 1e-12
    assert [c.step for c in checkpoint.list_checkpoints(ckdir)] == [2, 4, 6]
    assert not cut.exists()  # the cut-short save was cleaned up by the next one


def _cfg() -> Any:
    return load_config(TINY)


@pytest.mark.timeout(420)
def test_a_data_parallel_checkpoint_resumes_on_any_layout(fault_launches: dict[str, Any]) -> None:
    """Saved at dp=2 x pp=2 after 3 steps, resumed at dp=1 x pp=4 and on one device: the
    weights after 6 steps are the uninterrupted run's (float64; replicas sum gradients in
    another order, so to rounding)."""
    d = fault_launches["tmp"] / "sgd"
    ck = checkpoint._committed(d / "dp2" / "checkpoints" / checkpoint.step_dir_name(3))
    assert ck is not None and ck.meta["world_size"] == 4
    full = _weights(d / "full")
    assert_resumed(d / "dp2-pp4", 3, 6)
    assert_resumed(d / "dp2-one", 3, 6)
    assert weights_rel_err(_weights(d / "dp2-pp4"), full) < 1e-12
    assert weights_rel_err(_weights(d / "dp2-one"), full) < 1e-12


@pytest.mark.timeout(420)
def test_the_v_placement_saves_resumes_and_converts(fault_launches: dict[str, Any]) -> None:
    """A V run (rank 0 holds stages 0 and 3) saves the layers each rank holds by name: the
    marker records the placement; its checkpoint resumes on the same V, at dp=2 x pp=2 with
    the V and on one device, and a round-robin checkpoint resumes into the V: all end at the
    uninterrupted run's weights (float64, to rounding)."""
    tmp = fault_launches["tmp"]
    ck = checkpoint._committed(tmp / "v" / "checkpoints" / checkpoint.step_dir_name(3))
    assert ck is not None
    plan = ck.meta["plan"]
    assert plan["placement"] == "v" and plan["stage_to_rank"] == [0, 1, 1, 0]
    assert [s["rank"] for s in plan["stages"]] == [0, 1, 1, 0]
    ref = _weights(tmp / "sgd" / "ref")
    for run in ("v", "v-dp2", "v-one", "sgd/zbv-from-1f1b"):
        assert_resumed(tmp / run, 3, 6)
        assert weights_rel_err(_weights(tmp / run), ref) < 1e-12, run


@pytest.mark.timeout(120)
def test_the_resume_assertion_fails_when_resume_is_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation check: with resume broken (every checkpoint ignored, the run restarts from
    step 0) the final weights are still those of an uninterrupted run, because training is
    deterministic; only `assert_resumed`, which every resume test calls, can tell."""
    run, good = tmp_path / "run", tmp_path / "good"
    fast = ["trace.enabled=false"]
    single_run([*fast, "train.steps=3", f"run_dir={good}"])
    single_run([*fast, "train.steps=6", f"run_dir={good}"])
    assert_resumed(good, 3, 6)  # resume working: the assertion holds
    single_run([*fast, "train.steps=3", f"run_dir={run}"])
    monkeypatch.setattr(checkpoint, "find_resume", lambda *args, **kwargs: None)
    single_run([*fast, "train.steps=6", f"run_dir={run}"])
    assert weights_rel_err(_weights(run), _weights(good)) == 0.0  # the weights cannot tell
    with pytest.raises(AssertionError, match="resumed from None, expected 3"):
        assert_resumed(run, 3, 6)
