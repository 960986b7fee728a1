"""Measured timelines: what the trace records, what it says, and the schedule command."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from splitgraph.observe.trace import chrome_trace, measure
from splitgraph.schedule import build_schedule, simulate
from splitgraph.schedule.cli import main as schedule_main
from splitgraph.schedule.ir import Action
from splitgraph.schedule.simulate import Costs


def _recorded(rows: list[list[tuple]]) -> list[list[tuple]]:
    """Hand-written traces name actions as text; the tracer records the Action itself (a
    transfer group as a tuple of Actions), and measure reads those, never text."""

    def label(text: str, kind: str) -> object:
        if kind == "comm":
            return tuple(Action.parse(t) for t in text.split())
        return Action.parse(text) if kind in ("F", "B", "I", "W", "wait") else text

    return [[(st, label(lb, k), k, a, b) for st, lb, k, a, b in row] for row in rows]


def _synthetic_trace(name: str, p: int, m: int, costs: Costs) -> list[list[tuple]]:
    """What a perfect run of the simulator's own timeline would record, in seconds."""
    sched = build_schedule(name, p, m)
    sim = simulate(sched, costs)
    return [[(0, e.action, e.action.op.value, e.start, e.end) for e in row] for row in sim.events]


def test_measure_recovers_the_costs_and_bubble_of_a_known_timeline() -> None:
    costs = Costs([1e-3, 2e-3], [2e-3, 4e-3])
    trace = _synthetic_trace("1f1b", 2, 4, costs)
    meas = measure(trace, build_schedule("1f1b", 2, 4), [8, 8, 8, 8])
    assert meas.forward == pytest.approx([1e-3, 2e-3])
    assert meas.backward == pytest.approx([2e-3, 4e-3])
    sim = simulate(build_schedule("1f1b", 2, 4), costs)
    assert meas.span == pytest.approx(sim.step_time)
    assert meas.bubble == pytest.approx(sim.bubble)


def test_measure_separates_waiting_from_compute_and_estimates_transfer_time() -> None:
    """Rank 1's F0 starts at 1.0 ms but waits 0.5 ms for data sent at 0.8 ms: compute 1 ms,
    transfer 0.7 ms."""
    ms = 1e-3
    trace = [
        [
            (0, "0F0", "F", 0.0, 0.8 * ms),
            (0, "0SEND_F0", "comm", 0.8 * ms, 0.8 * ms),
            (0, "0RECV_B0", "wait", 4 * ms, 4 * ms),
            (0, "0B0", "B", 4 * ms, 5 * ms),
        ],
        [
            (0, "1RECV_F0", "wait", 1.0 * ms, 1.5 * ms),
            (0, "1F0", "F", 1.0 * ms, 2.5 * ms),
            (0, "1B0", "B", 2.5 * ms, 3.5 * ms),
            (0, "1SEND_B0", "comm", 3.5 * ms, 3.5 * ms),
        ],
    ]
    meas = measure(_recorded(trace), build_schedule("1f1b", 2, 1), [4])
    assert meas.forward == pytest.approx([0.8 * ms, 1.0 * ms])
    assert meas.comm == pytest.approx([0.7 * ms])
    assert meas.span == pytest.approx(5 * ms)
    assert meas.bubble == pytest.approx([1 - 1.8 / 5, 1 - 2.0 / 5])


def test_chrome_trace_format() -> None:
    trace = chrome_trace([[(3, "0F1", "F", 0.001, 0.002)], [(3, "1B0", "B", 0.0, 0.5)]])
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {0, 1}
    assert slices[0]["ts"] == 1000.0 and slices[0]["dur"] == 1000.0
    assert slices[0]["args"]["step"] == 3 and slices[0]["cat"] == "F"
    json.dumps(trace)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb1", "interleaved", "loopedbfs", "naive"])
def test_schedule_command_draws_every_schedule(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = 1 if name == "naive" else 4
    out = tmp_path / f"{name}.png"
    assert (
        schedule_main(
            [
                f"schedule={name}",
                "pipeline.stages=2",
                f"pipeline.microbatches={m}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "step time" in text and "bubble" in text and "rank 1 |" in text
    assert out.stat().st_size > 10_000


def test_schedule_command_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule_main(["schedule=1f1b", "--no-picture"]) == 2
    assert "pipeline.stages=P" in capsys.readouterr().err
    assert (
        schedule_main(
            ["schedule=zbv", "pipeline.stages=4", "schedule.virtual_stages=1", "--no-picture"]
        )
        == 2
    )
    assert "Set schedule.virtual_stages=2" in capsys.readouterr().err
    assert (
        schedule_main(["schedule=1f1b", "pipeline.stages=2", "--costs", "1", "--no-picture"]) == 2
    )


def test_w_actions_are_not_charged_for_their_is_wait() -> None:
    """A W never waits; the receive its I blocked on must not be subtracted from it."""
    ms = 1e-3
    trace = [
        [
            (0, "0F0", "F", 0.0, 1 * ms),
            (0, "0SEND_F0", "comm", 1 * ms, 1 * ms),
            (0, "0RECV_B0", "wait", 2 * ms, 5 * ms),
            (0, "0I0", "I", 2 * ms, 6 * ms),
            (0, "0W0", "W", 6 * ms, 7 * ms),
        ],
        [
            (0, "1RECV_F0", "wait", 1 * ms, 1 * ms),
            (0, "1F0", "F", 1 * ms, 2 * ms),
            (0, "1I0", "I", 2 * ms, 3 * ms),
            (0, "1SEND_B0", "comm", 3 * ms, 3 * ms),
            (0, "1W0", "W", 3 * ms, 4 * ms),
        ],
    ]
    meas = measure(_recorded(trace), build_schedule("zb1", 2, 1), [4])
    assert meas.weight == pytest.approx([1 * ms, 1 * ms])
    assert meas.backward_input == pytest.approx([1 * ms, 1 * ms])


def test_the_steps_fixed_costs_are_measured_apart_from_the_span() -> None:
    """Weight decay (L2), the step sum (SYNC) and the optimizer (OPT) follow the
    schedule: they leave span and bubbles alone, and the predicted step adds the slowest
    rank's weight decay and optimizer to the all-reduce's own latency (the last rank to
    arrive waits for nothing else: the minimum over ranks)."""
    ms = 1e-3
    costs = Costs([1 * ms, 2 * ms], [2 * ms, 4 * ms])
    sched = build_schedule("1f1b", 2, 4)
    trace = _synthetic_trace("1f1b", 2, 4, costs)
    end = max(e[4] for row in trace for e in row)
    fixed = [(0.2 * ms, 0.9 * ms, 0.3 * ms), (0.1 * ms, 0.5 * ms, 0.4 * ms)]
    for rank, (decay, sync, opt) in enumerate(fixed):
        t = end + 0.01 * ms
        trace[rank] += [
            (0, "weight decay", "L2", t, t + decay),
            (0, "step sum", "SYNC", t + decay, t + decay + sync),
            (0, "OPT", "OPT", t + decay + sync, t + decay + sync + opt),
        ]
    meas = measure(trace, sched, [8, 8, 8, 8])
    sim = simulate(sched, costs)
    assert meas.span == pytest.approx(sim.step_time)  # the fixed costs are not in the span
    assert meas.bubble == pytest.approx(sim.bubble)
    assert meas.weight_decay == pytest.approx([0.2 * ms, 0.1 * ms])
    assert meas.sync == pytest.approx([0.9 * ms, 0.5 * ms])
    assert meas.optimizer == pytest.approx([0.3 * ms, 0.4 * ms])


def test_the_window_reports_span_and_step_predictions_side_by_side(tmp_path: Path) -> None:
    """One process (no process group): the traced step, its measured step time and the
    prediction = simulated span + weight decay + step sum + optimizer."""
    from splitgraph.observe.trace import Tracer, TraceWindow

    ms = 1e-3
    sched = build_schedule("gpipe", 1, 2)
    costs = Costs([1 * ms], [2 * ms])
    tracer = Tracer()
    (row,) = _synthetic_trace("gpipe", 1, 2, costs)
    end = max(e[4] for e in row)
    tracer.events = [
        *row,
        (0, "weight decay", "L2", end, end + 0.5 * ms),
        (0, "step sum", "SYNC", end + 0.5 * ms, end + 1.0 * ms),
        (0, "OPT", "OPT", end + 1.0 * ms, end + 2.0 * ms),
    ]
    window = TraceWindow(SimpleNamespace(trace=None, warmup=0, steps=1, picture=True), tracer, 5)
    out = window.finish(tmp_path, True, sched, [4, 4], step_times=[9 * ms, 8 * ms])
    assert out is not None and (tmp_path / "timeline.png").stat().st_size > 0
    span = simulate(sched, costs).step_time  # 6 ms
    pred = out["reconstructed"]
    assert pred["schedule_span_s"] == pytest.approx(span)
    assert sum(pred["fixed_per_step_s"].values()) == pytest.approx(2 * ms)
    assert pred["step_time_s"] == pytest.approx(span + 2 * ms)
    assert out["measured"]["step_time_median_s"] == pytest.approx(9 * ms)  # the traced step
    assert out["measured_over_reconstructed_step_time"] == pytest.approx(9 / 8)
    assert out["measured_over_reconstructed_span"] == pytest.approx(1.0)


def test_a_span_records_its_block_only_while_the_window_is_open() -> None:
    """`with tracer.span(...)`: one event with the label object itself while active; nothing
    outside the window, nothing for a block that raised; NULL_TRACER never records."""
    from splitgraph.observe.trace import NULL_TRACER, Tracer, TraceWindow, label_text

    tr = Tracer()
    group = (Action.parse("0SEND_F0"), Action.parse("0RECV_B1"))
    with tr.span(group, "comm"):
        pass
    assert tr.events == []  # the window is closed
    tr.active = True
    with tr.span(group, "comm"):
        pass
    with pytest.raises(RuntimeError), tr.span("OPT", "OPT"):
        raise RuntimeError("a failed step is not timed")
    assert [(e[1], e[2]) for e in tr.events] == [(group, "comm")]
    assert tr.events[0][3] <= tr.events[0][4]
    assert label_text(group) == "0SEND_F0 0RECV_B1"
    NULL_TRACER.active = True
    assert not NULL_TRACER.active
    with NULL_TRACER.span("OPT", "OPT"):
        pass
    assert NULL_TRACER.events == []
    window = TraceWindow(SimpleNamespace(warmup=0, steps=1, picture=True), NULL_TRACER, 3)
    window.before_step(0)  # no barrier, no reference: the window never opens
    assert window.finish(".", True, build_schedule("1f1b", 1, 1), [1], [0.1]) is None
