"""Checkpoint files: what counts as committed, what is refused, and never unpickling strangers."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from splitgraph.config import load_config, validate
from splitgraph.errors import CheckpointError, ConfigError
from splitgraph.reliability import checkpoint
from splitgraph.reliability.safeload import load_tensor_dict, read_metadata
from tests.conftest import assert_resumed, single_run
from tests.fault_workers import TINY


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a hostile pickle."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple:
        return (open, (self.target, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-device run of 6 steps with checkpoints at 2, 4, 6 (keep 2: 4 and 6 remain)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    single_run(["train.steps=6", "checkpoint.every=2", "checkpoint.keep=2", f"run_dir={run}"])
    return run


def _copy(trained: Path, tmp: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(trained, dst)
    return dst


def test_keep_prunes_and_the_marker_records_the_position(trained: Path) -> None:
    cks = checkpoint.list_checkpoints(trained / "checkpoints")
    assert [c.step for c in cks] == [4, 6]
    meta = cks[-1].meta
    assert meta["data_position"] == {
        "next_step": 6,
        "epoch": 0,
        "batch_in_epoch": 6,
        "samples_seen": 72,
    }
    assert meta["config_hash"] == checkpoint.config_hash(checkpoint.identity(load_config(TINY)))
    entries = read_metadata(cks[-1].path).state_dict_metadata
    assert "model.layers.5.weight" in entries and "rng.rank0.cpu" in entries
    assert "optim.layers.5.weight.momentum_buffer" in entries  # keyed by name, not index


def test_uncommitted_and_damaged_directories_are_never_resumed(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy(trained, tmp_path)
    ckdir = run / "checkpoints"
    shutil.copytree(ckdir / "step_00000006", ckdir / ".step_00000008.tmp")  # a save cut short
    (ckdir / ".step_00000008.tmp" / checkpoint.MARKER).unlink()
    shutil.copytree(ckdir / "step_00000006", ckdir / "step_00000010")  # marker missing
    (ckdir / "step_00000010" / checkpoint.MARKER).unlink()
    shutil.copytree(ckdir / "step_00000006", ckdir / "step_00000012")  # marker garbled
    (ckdir / "step_00000012" / checkpoint.MARKER).write_text("{not json")
    assert [c.step for c in checkpoint.list_checkpoints(ckdir)] == [4, 6]
    cfg = load_config(TINY + [f"run_dir={run}"])
    with caplog.at_level(logging.WARNING, logger="splitgraph"):
        found = checkpoint.find_resume(cfg.checkpoint, cfg.model, checkpoint.identity(cfg))
    assert found is not None and found[0].step == 6
    # the committed-looking ones are damaged: named, set aside; the cut-short save is not
    assert f"{ckdir / 'step_00000010'} is damaged (splitgraph.json is missing)" in caplog.text
    assert "step_00000012 is damaged (splitgraph.json is unreadable or not JSON" in caplog.text
    assert sorted(p.name for p in ckdir.iterdir()) == [
        ".step_00000008.tmp",
        "step_00000004",
        "step_00000006",
        "step_00000010.damaged",
        "step_00000012.damaged",
    ]


def test_a_hostile_metadata_pickle_is_refused_and_never_run(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    ran = tmp_path / "code-ran"
    newest = run / "checkpoints" / "step_00000006"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(ran)))
    with pytest.raises(CheckpointError, match=r"refused to load io\.open"):
        read_metadata(newest)
    with pytest.raises(CheckpointError, match="refused"):
        single_run(["train.steps=8", f"checkpoint.resume={newest}", f"run_dir={tmp_path / 'x'}"])
    # auto skips it (with a warning) for the one before: progress since step 4 is redone
    cfg = load_config(TINY + [f"run_dir={run}"])
    found = checkpoint.find_resume(cfg.checkpoint, cfg.model, checkpoint.identity(cfg))
    assert found is not None and found[0].step == 4
    assert not ran.exists()


def test_metadata_declaring_pickled_objects_is_refused(tmp_path: Path) -> None:
    """DCP would unpickle a non-tensor entry with weights_only=False; splitgraph refuses it."""
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"w": torch.zeros(2), "obj": [1, 2]}, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(CheckpointError, match=r"refused to load .*\.BytesStorageMetadata"):
        read_metadata(tmp_path)


def test_init_from_refuses_hostile_and_foreign_files(tmp_path: Path) -> None:
    ran = tmp_path / "code-ran"
    torch.save({"layers.0.weight": _Payload(ran)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused: .*\(Unsupported global: GLOBAL io\.open"):
        load_tensor_dict(tmp_path / "evil.pt")
    assert not ran.exists()
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="refused: it is damaged"):
        load_tensor_dict(tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_tensor_dict(tmp_path / "empty.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="must be a state dict"):
        load_tensor_dict(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tensor_dict(tmp_path / "nope.pt")


def test_a_checkpoint_of_another_model_shape_names_the_parameters(
    trained: Path, tmp_path: Path
) -> None:
    other = ["model.hidden=[5,9,4,7]", "model.bias=true", f"run_dir={tmp_path / 'o'}"]
    with pytest.raises(CheckpointError, match=r"\(8 mismatched parameters\)") as info:
        single_run([*other, f"checkpoint.init_from={trained / 'model.pt'}"])
    text = str(info.value)
    assert "layers.0.bias is missing" in text
    assert "layers.3.weight has shape (8, 4), the model (7, 4)" in text
    assert "layers.5.weight is not in this model" in text
    # a training checkpoint of it: refused by config identity first, by shapes with strict off
    resume = f"checkpoint.resume={trained / 'checkpoints'}"
    with pytest.raises(CheckpointError, match=r"model\.hidden: saved \[5, 9, 4, 8, 3\], now"):
        single_run([*other, resume])
    with pytest.raises(CheckpointError, match=r"layers\.4\.weight has shape \(3, 8\), the mo"):
        single_run([*other, resume, "checkpoint.strict=false"])


def test_a_changed_config_is_refused_unless_strict_is_off(trained: Path, tmp_path: Path) -> None:
    resume = f"checkpoint.resume={trained / 'checkpoints'}"
    with pytest.raises(CheckpointError, match=r"optim\.lr: saved 0\.05, now 0\.01.*strict=false"):
        single_run(["optim.lr=0.01", "train.steps=8", resume, f"run_dir={tmp_path / 'a'}"])
    single_run(
        [
            "optim.lr=0.01",
            "train.steps=8",
            resume,
            "checkpoint.strict=false",
            f"run_dir={tmp_path / 'b'}",
        ]
    )
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [6, 7]  # resumed at 6
    assert_resumed(tmp_path / "b", 6, 8)
    # the layout, train.steps and runtime may change freely (not in the identity)
    single_run(["pipeline.microbatches=3", "train.steps=7", resume, f"run_dir={tmp_path / 'c'}"])
    assert_resumed(tmp_path / "c", 6, 7)


def test_resume_errors_name_the_fix(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist.*auto or never"):
        single_run([f"checkpoint.resume={tmp_path / 'nothing'}", f"run_dir={tmp_path / 'a'}"])
    with pytest.raises(CheckpointError, match=re.escape("beyond this run's 4 steps")):
        single_run(
            ["train.steps=4", f"checkpoint.resume={trained / 'checkpoints'}", f"run_dir={tmp_path}"]
        )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["checkpoint.every=0"], "checkpoint.every=0 must be >= 1"),
        (["checkpoint.keep=0"], "checkpoint.keep=0 must be >= 1"),
        (["checkpoint.resume= "], "checkpoint.resume is empty"),
        (["runtime.hang_timeout=120"], "runtime.hang_timeout=120.0 must be > 0 and below"),
        (["runtime.hang_timeout=-1"], "runtime.hang_timeout=-1.0"),
        (["debug.fail_mode=crash"], "debug.fail_mode='crash' is not a fault"),
        (["debug.fail_mode=kill_in_save", "checkpoint.every=null"], "writes none"),
        (["debug.fail_at_step=-1"], "debug.fail_at_step=-1 must be >= 0"),
        (["optim.lr=nan"], "optim.lr=nan must be a finite number"),
        (["optim.weight_decay=inf"], "optim.weight_decay=inf must be a finite number"),
        (["runtime.timeout=inf"], "runtime.timeout=inf must be a finite number"),
    ],
)
def test_validate_checks_the_reliability_settings(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides), 2)
    assert needle in str(info.value), str(info.value)


def test_resume_never_trains_afresh_and_replaces_same_step_checkpoints(
    trained: Path, tmp_path: Path
) -> None:
    run = _copy(trained, tmp_path)
    before = checkpoint.list_checkpoints(run / "checkpoints")[-1].meta
    single_run(
        [
            "optim.lr=0.01",
            "train.steps=6",
            "checkpoint.every=2",
            "checkpoint.keep=2",
            "checkpoint.resume=never",
            f"run_dir={run}",
        ]
    )
    after = checkpoint.list_checkpoints(run / "checkpoints")
    assert [c.step for c in after] == [4, 6]
    assert after[-1].meta["identity"]["optim.lr"] == 0.01 != before["identity"]["optim.lr"]
    assert not list((run / "checkpoints").glob(".step_*"))  # no .tmp or .old left behind


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_weights(
    trained: Path, tmp_path: Path
) -> None:
    run = _copy(trained, tmp_path)
    single_run(["train.steps=6", f"run_dir={run}"])
    assert (run / "metrics.jsonl").read_text().count("\n") == 6  # the first run's, kept
    assert_resumed(run, 6, 6)  # nothing trained again
    a = torch.load(trained / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
