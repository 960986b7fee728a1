"""The schedule benchmark: what it sweeps, and one real (tiny) sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitgraph.bench.schedules import configurations, main

#: traced, without timeline.png (the benchmark reads summaries; drawing is after the steps)
TINY = [
    "model.hidden=[16,16,16]",
    "data.samples=256",
    "train.batch_size=32",
    "trace.picture=false",
]


def test_configurations_skip_what_a_schedule_refuses() -> None:
    confs = configurations(2, [1, 2, 3])
    labels = {(label, m) for label, m, _ in confs}
    assert ("naive", 1) in labels and ("naive", 2) not in labels  # naive has one microbatch
    assert ("interleaved v=2", 2) in labels and ("interleaved v=2", 3) not in labels
    assert {m for label, m in labels if label == "zb1"} == {1, 2, 3}
    for label in ("zb2", "zbv v=2", "vhalf v=2", "vmin v=2", "auto", "auto v=2"):  # issue 18
        assert (label, 3) in labels
    only = configurations(2, [2], ["1f1b", "zb1"])
    assert [(label, m) for label, m, _ in only] == [("1f1b", 2), ("zb1", 2)]
    with pytest.raises(ValueError, match=r"unknown.*1f1c"):
        configurations(2, [2], ["1f1c"])


@pytest.mark.timeout(180)
def test_a_sweep_writes_the_table_and_the_json(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["--nproc", "2", "--microbatches", "2", "--repeats", "1", "--steps", "3"]
    assert main([*argv, "--schedules", "1f1b,zb1", "--out", str(out), *TINY]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["schedule"], r["m"]) for r in rows] == [("1f1b", 2), ("zb1", 2)]
    for r in rows:
        assert r["step_ms"] > 0 and r["pred_ms"] > 0 and r["span_ratio"] > 0
        assert 0 <= r["bubble_pred"] < 1 and len(r["saved_kib"]) == 2
    md = out.with_suffix(".md").read_text()
    assert "python -m splitgraph.bench.schedules" in md and "| 1f1b | 2 |" in md
    assert all(r["backward_ms"] > 0 for r in rows)
    assert "zb1 m=2: backward (I + W)" in md and "ratio" in md


@pytest.mark.timeout(180)
def test_the_overhead_run_prices_tracing_two_ways(tmp_path: Path) -> None:
    out = tmp_path / "overhead"
    argv = ["--nproc", "2", "--overhead", "--repeats", "1", "--steps", "4", "--out", str(out)]
    assert main([*argv, *TINY]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["launches_each"] == 1 and res["ratio"] > 0
    # 1f1b, 4 microbatches, 2 ranks: 8 compute actions + transfers + L2, SYNC, OPT per rank
    assert 11 <= res["events_per_rank_per_step"] < 40
    assert 0 < res["event_cost_us"] < 50 and 0 < res["recording_share"] < 0.5
    assert "recording:" in out.with_suffix(".md").read_text()
