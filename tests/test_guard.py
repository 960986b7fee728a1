"""The numerical guard: a NaN stops the run at the step, stage and microbatch where it first
appeared, before the optimizer step, and the last good checkpoint stays as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitgraph.errors import NonFiniteError
from splitgraph.reliability import checkpoint
from splitgraph.runtime.guard import describe, first_event
from tests.conftest import single_run


def _outcome(tmp: Path, case: str, rank: int) -> str:
    return (tmp / case / f"outcome.rank{rank}").read_text()


@pytest.mark.timeout(420)
def test_a_nan_in_the_data_names_step_stage_and_microbatch(fault_launches: dict[str, Any]) -> None:
    tmp = fault_launches["tmp"]
    texts = [_outcome(tmp, "nan", r) for r in range(2)]
    assert texts[0] == texts[1]  # every rank stops with the same message
    text = texts[0]
    assert text.startswith(
        "NonFiniteError: non-finite values at step 3: first in stage 0's forward of "
        "microbatch 3 (rank 0): its output."
    ), text
    assert "(located by replaying step 3 with runtime.nan_check=microbatch)" in text
    assert "stage 1's forward of microbatch 3 (rank 1): loss" in text  # where it spread
    last = tmp / "nan" / "checkpoints" / checkpoint.step_dir_name(2)
    assert f"the last checkpoint, {last}, is intact (its files match the digests" in text
    # nothing after the last good step was written: no step-4 checkpoint, no model.pt
    assert [c.step for c in checkpoint.list_checkpoints(tmp / "nan" / "checkpoints")] == [2]
    assert not (tmp / "nan" / "model.pt").exists()
    lines = (tmp / "nan" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # steps 0-2
    ck = checkpoint._committed(last)
    assert ck is not None
    state = checkpoint.read_rank_state(
        ck, checkpoint.read_metadata(last), ["layers.0.weight", "layers.5.weight"], 0
    )
    assert all(torch.isfinite(t).all() for t in state.model.values())


@pytest.mark.timeout(420)
def test_every_check_on_every_step_finds_the_same_origin_without_a_replay(
    fault_launches: dict[str, Any],
) -> None:
    text = _outcome(fault_launches["tmp"], "nan-full", 0)
    assert text.startswith(
        "NonFiniteError: non-finite values at step 3: first in stage 0's forward of "
        "microbatch 3 (rank 0): its output."
    ), text
    assert "replay" not in text


@pytest.mark.timeout(420)
def test_a_nan_gradient_is_traced_to_the_backward_that_made_it(
    fault_launches: dict[str, Any],
) -> None:
    """Stage 1's backward of microbatch 1 sends back NaN; stage 0's parameter gradients then
    turn NaN too, but the report names the origin."""
    text = _outcome(fault_launches["tmp"], "nan-grad", 0)
    assert text.startswith(
        "non-finite values at step 0: first in stage 1's backward of microbatch 1 (rank 1): "
        "its input gradient."
    ), text
    assert "stage 0's backward of microbatch 1 (rank 0): parameter gradients" in text


def test_single_device_nan_stops_before_the_update(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=r"step 1: first in stage 0's forward of microbatch 3"):
        single_run(
            ["train.steps=4", "debug.fail_at_step=1", "debug.fail_mode=nan", f"run_dir={tmp_path}"]
        )


def test_a_step_level_event_without_a_microbatch_says_so() -> None:
    text = describe(7, [_ev(0, 0, "B", None, "parameter gradients")], None, "a replay ...")
    assert "first in stage 0's backward (rank 0): its parameter gradients (the microbatch" in text
    assert "  (a replay ...)" in text and "no checkpoint was written" in text
    backward = {**_ev(1, 1, "B", 2, "parameter gradients"), "bad_grads": ["layers.3.weight"]}
    assert "non-finite parameter gradients: ['layers.3.weight']" in describe(1, [backward], None)
    forward = {**_ev(0, 0, "F", 2, "output"), "bad_grads": ["layers.0.weight"]}
    assert "parameter gradients" not in describe(1, [forward], None)  # not yet computed then
    weights = {**forward, "bad_weights": ["layers.0.weight"]}
    assert "weights are themselves non-finite: ['layers.0.weight']" in describe(1, [weights], None)


def _ev(rank: int, stage: int, op: str, mb: int | None, *what: str) -> dict[str, Any]:
    return {
        "rank": rank,
        "stage": stage,
        "op": op,
        "mb": mb,
        "what": list(what),
        "bad_weights": [],
        "bad_grads": [],
    }


def test_the_origin_is_chosen_by_causality_not_by_rank_or_clock() -> None:
    spread_forward = [
        _ev(2, 2, "F", 1, "loss"),
        _ev(1, 1, "F", 1, "output"),
        _ev(0, 0, "B", 1, "parameter gradients"),
        _ev(1, 1, "B", 1, "input gradient", "parameter gradients"),
        _ev(1, 1, "B", 2, "parameter gradients"),  # accumulated: stays NaN for later mbs
    ]
    assert first_event(spread_forward) is spread_forward[1]
    spread_backward = [
        _ev(0, 0, "B", 2, "parameter gradients"),
        _ev(2, 2, "B", 2, "input gradient"),
        _ev(1, 1, "B", 2, "input gradient", "parameter gradients"),
    ]
    assert first_event(spread_backward) is spread_backward[1]
    step_level = [_ev(0, 0, "B", None, "parameter gradients"), _ev(1, 1, "F", 0, "loss")]
    assert first_event(step_level) is step_level[1]
