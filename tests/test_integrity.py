"""Checkpoints prove their integrity: every file's SHA-256 recorded at commit, checked before
any byte is loaded; a damaged checkpoint is named, set aside (never overwritten, never deleted)
and `resume=auto` falls back to the newest intact one; an explicit path refuses."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from splitgraph.config import load_config
from splitgraph.errors import CheckpointError
from splitgraph.reliability import checkpoint
from tests.conftest import assert_resumed, single_run
from tests.fault_workers import TINY

FAST = ["trace.enabled=false"]
SHARD = "__0_0.distcp"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One device, 6 steps, checkpoints at 2, 4 and 6."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    single_run([*FAST, "train.steps=6", "checkpoint.every=2", f"run_dir={run}"])
    return run


def _copy(trained: Path, tmp: Path) -> tuple[Path, Path]:
    run = tmp / "run"
    shutil.copytree(trained, run)
    return run, run / "checkpoints"


def _flip_low_bits(path: Path, start: int = 1024, stride: int = 4) -> bytes:
    """The issue's damage: the low bit of every 4th byte flipped from `start` on (the tensors'
    bytes), so the file keeps its size and still parses; returns the damaged bytes."""
    data = bytearray(path.read_bytes())
    for i in range(start, len(data), stride):
        data[i] ^= 1
    path.write_bytes(bytes(data))
    return bytes(data)


def _marker(ck: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint's splitgraph.json, or (with `meta`) write it as given."""
    path = ck / checkpoint.MARKER
    if meta is not None:
        path.write_text(json.dumps(meta))
        return meta
    return json.loads(path.read_text())


def _auto(run: Path, caplog: pytest.LogCaptureFixture) -> checkpoint.Checkpoint | None:
    cfg = load_config(TINY + [f"run_dir={run}"])
    with caplog.at_level(logging.WARNING, logger="splitgraph"):
        found = checkpoint.find_resume(cfg.checkpoint, cfg.model, checkpoint.identity(cfg))
    return found[0] if found else None


def test_every_file_is_recorded_with_its_digest_while_writing(trained: Path) -> None:
    ck = checkpoint.list_checkpoints(trained / "checkpoints")[-1]
    files = ck.meta["files"]
    assert sorted(files) == [".metadata", SHARD]
    for name, rec in files.items():  # the digest taken while writing is the file's
        assert checkpoint.hash_file(ck.path / name) == (rec["sha256"], rec["bytes"])
    assert ck.meta["format"] == 2 and checkpoint.verify(ck) is None
    assert checkpoint.integrity_note(ck.path).endswith(
        "is intact (its files match the digests recorded when it was written, checked now)"
    )


def test_a_damaged_shard_is_set_aside_and_auto_falls_back(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the flipped bytes loaded silently and training went on from wrong weights."""
    run, ckdir = _copy(trained, tmp_path)
    damaged = _flip_low_bits(ckdir / "step_00000006" / SHARD)
    found = _auto(run, caplog)
    assert found is not None and found.step == 4
    aside = ckdir / "step_00000006.damaged"
    assert (aside / SHARD).read_bytes() == damaged  # moved, not rewritten, not deleted
    assert f"checkpoint {ckdir / 'step_00000006'} is damaged ({SHARD} does not match its " in (
        caplog.text
    )
    assert f"moved aside to {aside}" in caplog.text
    assert f"resuming from {ckdir / 'step_00000004'} instead" in caplog.text
    # training resumes from step 4; its own step-6 checkpoint does not touch the damaged copy
    single_run([*FAST, "train.steps=8", "checkpoint.every=2", f"run_dir={run}"])
    assert_resumed(run, 4, 8)
    assert (aside / SHARD).read_bytes() == damaged
    cks = checkpoint.list_checkpoints(ckdir)
    assert [c.step for c in cks] == [2, 4, 6, 8] and checkpoint.verify(cks[2]) is None


def test_a_truncated_shard_is_refused_by_an_explicit_path_and_not_moved(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a raw CheckpointException traceback, no fallback."""
    run, ckdir = _copy(trained, tmp_path)
    shard = ckdir / "step_00000006" / SHARD
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    resume = f"checkpoint.resume={ckdir / 'step_00000006'}"
    with pytest.raises(CheckpointError) as info:
        single_run([*FAST, "train.steps=8", resume, f"run_dir={tmp_path / 'x'}"])
    text = str(info.value)
    assert f"{SHARD} is {size // 2} bytes, {size} when written (truncated)" in text
    assert "it was not loaded, and left where it is" in text
    assert f"The newest intact one there is {ckdir / 'step_00000004'}" in text
    assert shard.exists()  # an explicit path is never moved
    # a directory of checkpoints whose newest is damaged: refused the same way
    with pytest.raises(CheckpointError, match=r"step_00000006 refused: it is damaged"):
        single_run([*FAST, "train.steps=8", f"checkpoint.resume={ckdir}", f"run_dir={run}"])
    found = _auto(run, caplog)  # auto: set aside, the one before is taken
    assert found is not None and found.step == 4
    assert (ckdir / "step_00000006.damaged" / SHARD).stat().st_size == size // 2


def test_missing_metadata_is_named_and_set_aside(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the previous checkpoint was resumed with no word, and the damaged one was
    then overwritten by the new step-6 save."""
    run, ckdir = _copy(trained, tmp_path)
    (ckdir / "step_00000006" / ".metadata").unlink()
    found = _auto(run, caplog)
    assert found is not None and found.step == 4
    assert "step_00000006 is damaged (.metadata is missing)" in caplog.text
    assert (ckdir / "step_00000006.damaged" / SHARD).exists()


def test_a_changed_marker_and_a_changed_metadata_are_damage(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, ckdir = _copy(trained, tmp_path)
    meta = _marker(ckdir / "step_00000006")
    meta["identity"]["optim.lr"] = 0.5  # still valid JSON, still step 6
    _marker(ckdir / "step_00000006", meta)
    _flip_low_bits(ckdir / "step_00000004" / ".metadata", start=200, stride=50)
    found = _auto(run, caplog)
    assert found is not None and found.step == 2
    assert "step_00000006 is damaged (splitgraph.json was changed after it was written" in (
        caplog.text
    )
    assert "step_00000004 is damaged (.metadata does not match its recorded sha256" in caplog.text


def test_no_intact_checkpoint_left_says_training_starts_afresh(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, ckdir = _copy(trained, tmp_path)
    for ck in checkpoint.list_checkpoints(ckdir):
        (ck.path / SHARD).write_bytes(b"")
    assert _auto(run, caplog) is None
    assert "no intact checkpoint left in" in caplog.text
    assert "training starts from step 0" in caplog.text
    assert len(list(ckdir.glob("step_*.damaged"))) == 3


def test_a_checkpoint_without_digests_loads_with_a_warning(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 1 (before digests) still resumes, saying it was not verified."""
    run, ckdir = _copy(trained, tmp_path)
    meta = _marker(ckdir / "step_00000006")
    for key in ("files", "marker_sha256"):
        del meta[key]
    _marker(ckdir / "step_00000006", {**meta, "format": 1})
    found = _auto(run, caplog)
    assert found is not None and found.step == 6
    assert "format 1): loaded without an integrity check" in caplog.text
    assert checkpoint.integrity_note(found.path) == (
        f"the last checkpoint is {found.path} (not verified: it records no digests)"
    )


def test_the_guard_calls_a_checkpoint_intact_only_when_it_is(trained: Path, tmp_path: Path) -> None:
    _, ckdir = _copy(trained, tmp_path)
    path = ckdir / "step_00000006"
    assert "is intact" in str(checkpoint.integrity_note(path))
    _flip_low_bits(path / SHARD)
    note = str(checkpoint.integrity_note(path))
    assert note.startswith(f"the last checkpoint, {path}, is damaged ({SHARD} does not match")
    assert note.endswith("do not resume from it")
    assert checkpoint.integrity_note(None) is None


def test_a_rank_missing_from_the_checkpoint_warns_about_its_rng(
    trained: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = checkpoint.list_checkpoints(trained / "checkpoints")[-1]
    meta = checkpoint.read_metadata(ck.path)
    with caplog.at_level(logging.WARNING, logger="splitgraph"):
        state = checkpoint.read_rank_state(ck, meta, [], 3)
    assert "rank 3: checkpoint" in caplog.text and "holds no RNG state for rank 3" in caplog.text
    assert "the weights are unaffected" in caplog.text
    assert torch.equal(state.rng["cpu"], checkpoint.read_rank_state(ck, meta, [], 0).rng["cpu"])


@pytest.mark.timeout(420)
def test_two_ranks_agree_to_skip_a_damaged_shard(fault_launches: dict[str, Any]) -> None:
    """Rank 1's shard of step 4 damaged between two launches on 2 ranks: both ranks verify
    every file before any process group exists, reach the same verdict, and resume from step
    2; rank 0 alone set the damaged checkpoint aside, intact (moved, not rewritten)."""
    run = fault_launches["tmp"] / "dmg"
    assert [(run / f"outcome.rank{r}").read_text() for r in (0, 1)] == ["ok", "ok"]
    assert_resumed(run, 2, 6)
    aside = run / "checkpoints" / "step_00000004.damaged"
    assert sorted(p.name for p in aside.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "splitgraph.json",
    ]
    ck = checkpoint._inspect(aside.with_name("step_00000004"))
    assert isinstance(ck, checkpoint.Checkpoint) and checkpoint.verify(ck) is None  # re-saved
    bad = json.loads((aside / checkpoint.MARKER).read_text())["files"]["__1_0.distcp"]
    assert checkpoint.hash_file(aside / "__1_0.distcp")[0] != bad["sha256"]
