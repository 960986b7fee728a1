"""A real torchrun with a measured strategy: one plan on every rank, and summary.json holds
predicted vs measured per rank and stage, with the saved-activation peaks equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_e2e import SMALL, torchrun


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_training_reports_prediction_against_measurement(tmp_path: Path) -> None:
    over = [*SMALL, "train.steps=8", "partition=time", "schedule=1f1b", "pipeline.microbatches=3"]
    res = torchrun(2, *over, "costs.repeats=3", f"run_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan"]["strategy"] == "time"
    pred = summary["prediction"]
    assert pred["saved_peaks_equal"] is True and pred["time_source"] == "measured"
    assert "measured in this run" in pred["link"]["source"]
    measured = {m["rank"]: m["saved_activation_peak_bytes"] for m in summary["memory_per_rank"]}
    for r in pred["saved_peak_bytes_per_rank"]:
        assert r["predicted"] == r["measured"] == measured[r["rank"]] > 0
    for stage in pred["stages"]:
        for kind in ("forward_s", "backward_s"):  # measured from the trace: compute only
            assert stage[kind]["predicted"] > 0 and stage[kind]["measured"] > 0
    steps = pred["step_time_s"]
    assert steps["predicted"] > 0 and steps["measured_median"] > 0
    assert steps["measured_schedule_median"] > 0
