"""The schedule benchmark: what it sweeps, and one real (tiny) sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitgraph.bench.schedules import (
    compute_medians,
    configurations,
    criteria,
    main,
    onefoneb_bytes,
)

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
    issue18 = ("zb2", "zbv v=2", "vhalf v=2", "vmin v=2", "auto", "auto v=2", "auto-cap1f1b v=2")
    for label in issue18:
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
    assert "python -m splitgraph.bench.schedules" in md and "| 1f1b | 2 | 2 |" in md
    assert "load average at the start" in md
    assert all(r["backward_ms"] > 0 and r["backward_median_ms"] > 0 for r in rows)
    assert "zb1 m=2: backward per microbatch" in md and "ratio paired by round" in md
    assert "m=2 zb1: (I + W) / B" in md  # the criterion, read off the rows


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


def _event(pid: int, name: str, cat: str, ts: float, dur: float) -> dict:
    return {
        "ph": "X",
        "pid": pid,
        "name": name,
        "cat": cat,
        "ts": ts,
        "dur": dur,
        "args": {"step": 1},
    }


def test_compute_medians_take_out_the_wait_inside_an_action() -> None:
    """An I that waited 300 us for its gradient did 100 us of work; W never waits; the
    median ignores one descheduled action."""
    evs = [
        _event(0, "0I0", "I", 0, 400),
        _event(0, "0RECV_B0", "wait", 10, 300),
        _event(0, "0I1", "I", 1000, 100),
        _event(0, "0I2", "I", 2000, 5000),  # descheduled
        _event(0, "0W0", "W", 500, 80),
        _event(0, "0RECV_B5", "wait", 500, 50),  # another action's receive
    ]
    med = compute_medians({"traceEvents": evs})
    assert med[("I", 0)] == pytest.approx(100e-6)
    assert med[("W", 0)] == pytest.approx(80e-6)


def _row(name: str, m: int, step: float, bubble: float, saved: list[float], **kw: object) -> dict:
    return {
        "schedule": name,
        "m": m,
        "step_ms": step,
        "bubble": bubble,
        "saved_kib": saved,
        "spread": 0.1,
        **kw,
    }


def test_criteria_say_yes_and_no_from_the_numbers() -> None:
    rows = [
        _row("1f1b", 4, 10.0, 0.40, [288, 131], per_round={0: {"backward_median_ms": 2.0}}),
        _row("zb1", 4, 9.0, 0.30, [352, 389], per_round={0: {"backward_median_ms": 2.1}}),
        _row("zb2", 4, 9.5, 0.35, [560, 584]),
        _row("zbv v=2", 4, 8.0, 0.20, [320, 448]),
        _row("auto-cap1f1b v=2", 4, 9.8, 0.25, [208, 195]),
        _row("auto", 4, 12.0, 0.45, [560, 584]),
    ]
    text = "\n".join(criteria(rows))
    assert "m=4 zbv v=2: bubble 20% <= zb1's 30%: yes; peak saved 448 KiB <= 1f1b's 288: NO" in text
    assert "m=4 auto-cap1f1b v=2: bubble 25% <= zb1's 30%: yes; peak saved 208 KiB" in text
    assert "m=4 zb2: bubble 35% < zb1's 30%: NO" in text
    assert "m=4 auto: bubble 45% <= zb1's 30%: NO; peak saved 584 KiB <= 1f1b's 288: NO" in text
    assert (
        "auto: step 12.00 ms <= best fixed (zbv v=2) 8.00 ms within the noise floor 10%: NO" in text
    )
    # the fixed schedules within 1F1B's 288 KiB: 1f1b only (10.0 ms); 9.8 <= 10.0
    assert "best fixed that fits (1f1b) 10.00 ms within the noise floor 10%: yes" in text
    assert "m=4 zb1: (I + W) / B 1.05 <= 1.10 (medians, paired by round): yes" in text


def test_the_1f1b_cap_is_what_the_memory_model_says_1f1b_saves() -> None:
    """Default model, 2 ranks, 4 microbatches: 288 / 131 KiB saved, as measured in training
    (results/schedules/bench_v_p2.md), plus each rank's parameters, gradients, Adam state."""
    saved, total = onefoneb_bytes(2, 4, [])
    assert [round(b / 1024) for b in saved] == [288, 131]
    assert all(t > s for t, s in zip(total, saved))
