"""The bubble, defined once (simulate.idle_share): the README's closed form at equal costs, and
the same number in the log, summary.json's timeline and timeline.png's titles."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from PIL import Image

from splitgraph.observe.trace import Bubbles, Tracer, TraceWindow
from splitgraph.schedule import build_schedule, simulate
from splitgraph.schedule.simulate import Costs, idle_share

MS = 1e-3


@pytest.mark.parametrize(("name", "p", "m"), [("gpipe", 2, 4), ("1f1b", 2, 4), ("1f1b", 4, 8)])
def test_idle_share_is_the_readme_closed_form_at_equal_costs(name: str, p: int, m: int) -> None:
    """(p-1)/(m+p-1) for GPipe and 1F1B with F=1, B=2 and no transfers (README, Schedules)."""
    sim = simulate(build_schedule(name, p, m), Costs.uniform(p, 1.0, 2.0))
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert idle_share(sim.busy, sim.step_time) == sim.bubble_fraction


def _two_rank_trace(delay: float) -> tuple[list[list[tuple]], float]:
    """Two traced steps of 1F1B (p=2, m=4, uneven stages) as two ranks would record them, with
    every action from 5 ms on `delay` late (an idle gap no cost explains), then weight decay,
    the step sum (rank 1 arrives first and waits for rank 0) and the optimizer."""
    sched = build_schedule("1f1b", 2, 4)
    sim = simulate(sched, Costs([1 * MS, 1.5 * MS], [2 * MS, 3 * MS]))
    period = 40 * MS
    rows: list[list[tuple]] = [[], []]
    for step in (0, 1):
        base = step * period
        for r, row in enumerate(sim.events):
            for e in row:
                shift = delay if e.start >= 5 * MS else 0.0
                kind = e.action.op.value
                rows[r].append((step, e.action, kind, base + e.start + shift, base + e.end + shift))
        end = base + sim.step_time + delay
        for r in (0, 1):
            last = max(x[4] for x in rows[r] if x[0] == step)
            rows[r] += [
                (step, "weight decay", "L2", last, last + 0.1 * MS),
                (step, "step sum", "SYNC", last + 0.1 * MS, end + 0.6 * MS),
                (step, "OPT", "OPT", end + 0.6 * MS, end + 0.9 * MS),
            ]
    compute = [sum(e.end - e.start for e in row) for row in sim.events]
    return rows, idle_share(compute, sim.step_time + delay)


def test_log_summary_and_picture_print_the_same_bubble(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, expected = _two_rank_trace(delay=2 * MS)
    # rank 0 of two: the gather hands it both ranks' events
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(
        dist, "gather_object", lambda mine, out, dst=0: out.__setitem__(slice(None), rows)
    )
    tracer = Tracer()
    tracer.events = rows[0]
    window = TraceWindow(SimpleNamespace(warmup=0, steps=2, picture=True), tracer, 2)
    sched = build_schedule("1f1b", 2, 4)
    with caplog.at_level(logging.INFO, logger="splitgraph"):
        out = window.finish(tmp_path, True, sched, [8, 8, 8, 8], step_times=[30 * MS, 30 * MS])
    assert out is not None
    measured, predicted = out["measured"]["bubble"], out["reconstructed"]["bubble"]
    assert measured == pytest.approx(expected)  # the delay is idle time in the span
    assert predicted < measured - 0.05  # the costs alone do not explain it
    assert out["bubble_at_unit_costs"] == pytest.approx(1 / 5)  # (p-1)/(m+p-1)
    assert measured == pytest.approx(sum(out["measured"]["bubble_per_rank"]) / 2)
    m_text, p_text = Bubbles.text(measured), Bubbles.text(predicted)
    assert m_text != p_text
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timeline:")]
    assert (
        f", {m_text})" in line.split("reconstructed")[0]
        and f", {p_text})" in line.split("reconstructed")[1]
    )
    text = Image.open(tmp_path / "timeline.png").text  # the PNG's titles
    pred_title, meas_title = text["Description"].splitlines()
    assert pred_title.endswith(p_text) and meas_title.endswith(m_text)
    assert Bubbles.text(1 / 5) in text["Title"]
    assert out["picture"] == "timeline.png" and (tmp_path / "trace.json").exists()


def test_trace_picture_off_keeps_the_trace_and_the_numbers_and_draws_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trace.picture=false (what the tests that read no picture run with): trace.json and the
    summary's numbers as with the picture, no timeline.png, and the log says there is none."""
    rows, expected = _two_rank_trace(delay=2 * MS)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(
        dist, "gather_object", lambda mine, out, dst=0: out.__setitem__(slice(None), rows)
    )
    outs = {}
    for picture in (True, False):
        tracer = Tracer()
        tracer.events = rows[0]
        window = TraceWindow(SimpleNamespace(warmup=0, steps=2, picture=picture), tracer, 2)
        d = tmp_path / str(picture)
        d.mkdir()
        with caplog.at_level(logging.INFO, logger="splitgraph"):
            outs[picture] = window.finish(
                d, True, build_schedule("1f1b", 2, 4), [8] * 4, step_times=[30 * MS] * 2
            )
        assert (d / "trace.json").exists() and (d / "timeline.png").exists() == picture
    on, off = outs[True], outs[False]
    assert on is not None and off is not None
    assert off["picture"] is None and on["picture"] == "timeline.png"
    assert off["measured"]["bubble"] == pytest.approx(expected)
    assert {k: v for k, v in off.items() if k != "picture"} == {
        k: v for k, v in on.items() if k != "picture"
    }
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timeline:")]
    assert lines[0].endswith("timeline.png") and lines[1].endswith("(trace.picture=false)")


def test_the_step_sum_wait_is_drawn_as_a_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 reaches the step sum before rank 0: its wait for rank 0 is a wait box, and only
    the sum after rank 0 arrives is a step-sum box; rank 0 waits for nobody."""
    from splitgraph.observe import trace
    from splitgraph.observe.timeline import Box

    rows, _ = _two_rank_trace(delay=0.0)
    drawn: list[list[Box]] = []
    monkeypatch.setattr(
        "splitgraph.observe.timeline.draw",
        lambda panels, path, suptitle="": drawn.extend([list(p.boxes) for p in panels]),
    )
    m = trace.measure(rows, build_schedule("1f1b", 2, 4), [8] * 4)
    sim = trace.reconstruct(m, build_schedule("1f1b", 2, 4), [8] * 4)
    trace._draw(
        tmp_path / "t.png", rows, build_schedule("1f1b", 2, 4), sim, m, {}, Bubbles(0, 0, 0)
    )
    measured = drawn[1]
    waits = [b for b in measured if b.label == "step sum: wait"]
    assert [b.rank for b in waits] == [1]
    (step,) = {e[0] for e in rows[1] if e[2] == "SYNC" and e[3] == waits[0].start}
    sync_start = {r: next(e[3] for e in rows[r] if e[2] == "SYNC" and e[0] == step) for r in (0, 1)}
    assert sync_start[1] < sync_start[0]
    assert waits[0].start == sync_start[1] and waits[0].end == sync_start[0]
    sums = {b.rank: b for b in measured if b.kind == "SYNC"}
    assert sums[1].start == sync_start[0] and sums[0].start == sync_start[0]
