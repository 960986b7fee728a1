"""The partition benchmark reads the training summary's prediction block: keep them in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitgraph.bench.partition import aggregate
from splitgraph.config import load_config
from splitgraph.train import run as train

SMALL = [
    "model.hidden=[32,48,16]",
    "data.samples=512",
    "train.batch_size=64",
    "train.steps=4",
    "train.progress=false",
    "trace.warmup=1",
]


@pytest.mark.timeout(120)
def test_aggregate_reads_a_real_summary(tmp_path: Path) -> None:
    summary = train.run(load_config([*SMALL, f"run_dir={tmp_path}"]))
    assert summary is not None
    summary["step_time_min_s"] = 1e-3  # the benchmark adds it from metrics.jsonl
    agg = aggregate({"uniform": [summary, summary]})["uniform"]
    (stage,) = agg["stages"]
    assert stage["saved_peak_measured"] == [stage["saved_peak_predicted"]] != [None]
    assert agg["saved_peaks_equal_every_run"] is True
    assert agg["step_ms_predicted"] > 0 and agg["step_ms_measured"] > 0
    assert stage["forward_ms_measured"] > 0 and stage["backward_ms_predicted"] > 0
