"""The schedule IR: exact action lists, lowering, and the validator's refusals."""

from __future__ import annotations

import pytest

from splitgraph.errors import ScheduleError
from splitgraph.schedule import (
    Action,
    Costs,
    Op,
    build_schedule,
    make_schedule,
    render_ascii,
    simulate,
    validate,
)
from splitgraph.schedule.gpipe import gpipe
from splitgraph.schedule.ir import parse_actions
from splitgraph.schedule.onefoneb import one_f_one_b


def rows(actions: list[list[Action]]) -> list[str]:
    return [" ".join(map(str, r)) for r in actions]


def test_action_text_round_trip() -> None:
    for text in ("2F0", "0B13", "1SEND_F3", "3RECV_B0", "0I2", "0W2"):
        assert str(Action.parse(text)) == text
    assert Action.parse("2F0") == Action(2, Op.F, 0)
    with pytest.raises(ValueError, match="not an action"):
        Action.parse("F0")


def test_gpipe_exact_actions_and_picture() -> None:
    """GPipe, 3 stages, 4 microbatches:

    rank 0 | F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
    rank 1 | .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .
    rank 2 | .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .
    """
    assert rows(gpipe(3, 3, 4)) == [
        "0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3",
        "1F0 1F1 1F2 1F3 1B0 1B1 1B2 1B3",
        "2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3",
    ]
    picture = render_ascii(simulate(build_schedule("gpipe", 3, 4)))
    assert picture == (
        "rank 0 | F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3\n"
        "rank 1 | .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .\n"
        "rank 2 | .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  ."
    )


def test_1f1b_exact_actions_and_picture() -> None:
    """1F1B, 3 stages, 4 microbatches:

    rank 0 | F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
    rank 1 | .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .
    rank 2 | .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .
    """
    assert rows(one_f_one_b(3, 3, 4)) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]
    picture = render_ascii(simulate(build_schedule("1f1b", 3, 4)))
    assert picture == (
        "rank 0 | F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3\n"
        "rank 1 | .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .\n"
        "rank 2 | .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  ."
    )


def test_1f1b_with_fewer_microbatches_than_stages() -> None:
    """m < p: warm-up is cut to m forwards; every stage still runs everything once."""
    assert rows(one_f_one_b(4, 4, 2)) == [
        "0F0 0F1 0B0 0B1",
        "1F0 1F1 1B0 1B1",
        "2F0 2F1 2B0 2B1",
        "3F0 3B0 3F1 3B1",
    ]
    validate(build_schedule("1f1b", 4, 2))


def test_lowering_places_transfers_around_compute() -> None:
    sched = build_schedule("1f1b", 2, 2)
    assert rows([list(r) for r in sched.actions]) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1",
        "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1",
    ]


def test_naive_is_one_microbatch() -> None:
    sched = build_schedule("naive", 3, 1)
    assert [len(sched.compute(r)) for r in range(3)] == [2, 2, 2]
    with pytest.raises(ValueError, match="one microbatch"):
        build_schedule("naive", 3, 2)


@pytest.mark.parametrize(
    ("name", "p", "m"),
    [
        (name, p, m)
        for name in ("naive", "gpipe", "1f1b")
        for p in (1, 2, 3, 4, 5)
        for m in (1, 2, 3, 4, 8)
        if name != "naive" or m == 1  # naive is defined for one microbatch only
    ],
)
def test_every_generated_schedule_validates(name: str, p: int, m: int) -> None:
    sched = build_schedule(name, p, m)
    sim = simulate(sched, strict=True)
    assert sum(len(e) for e in sim.events) == 2 * p * m


def _broken(rows_text: list[str], stages: int | None = None, m: int = 2) -> ScheduleError:
    compute = parse_actions(rows_text)
    sched = make_schedule("broken", compute, list(range(stages or len(compute))), m)
    with pytest.raises(ScheduleError) as info:
        validate(sched)
    return info.value


def test_validator_marks_backward_before_forward() -> None:
    err = _broken(["0B0 0F0 0F1 0B1", "1F0 1B0 1F1 1B1"])
    text = str(err)
    assert "0B0 runs before its forward 0F0" in text
    assert "<-- ERROR HERE" in text and "*0B0" in text
    assert "rank 0" in text and "rank 1" in text  # the step-by-rank grid


def test_validator_reports_missing_backward() -> None:
    err = _broken(["0F0 0F1 0B0", "1F0 1B0 1F1 1B1"])
    assert "0B1" in str(err) and "missing" in str(err)


def test_validator_rejects_action_on_wrong_rank() -> None:
    compute = parse_actions(["0F0 0B0 1F0", "1B0"])
    sched = make_schedule("broken", compute, [0, 1], 1)
    with pytest.raises(ScheduleError, match="1F0 is on rank 0 but stage 1 lives on rank 1"):
        validate(sched)


def test_validator_catches_mismatched_transfer_order() -> None:
    """Rank 0 sends microbatch 0 then 1; rank 1 receives 1 then 0: the FIFO rule fails."""
    err = _broken(["0F0 0F1 0B0 0B1", "1F1 1F0 1B0 1B1"])
    assert "each channel must deliver in send order" in str(err)
    assert "*0SEND_F0" in str(err) and "*1RECV_F1" in str(err)


def test_validator_detects_deadlock_and_marks_every_stuck_rank() -> None:
    """Rank 0 runs microbatch 0's backward before microbatch 1's forward; rank 1 runs both
    forwards before any backward. Each waits for what the other will only send later."""
    compute = parse_actions(["0F0 0B0 0F1 0B1", "1F0 1F1 1B0 1B1"])
    sched = make_schedule("deadlocked", compute, [0, 1], 2)
    with pytest.raises(ScheduleError) as info:
        validate(sched)
    text = str(info.value)
    assert "deadlock" in text and "<-- ERROR HERE" in text
    assert "*0B0" in text and "*1F1" in text
    assert "rank 0: 0B0 waits for data from rank 1" in text
    assert "rank 1: 1F1 waits for data from rank 0" in text


def test_async_simulation_times_match_closed_form() -> None:
    """With unit F and B, both GPipe and 1F1B take 2(m + p - 1) and idle (p-1)/(m+p-1)."""
    for name in ("gpipe", "1f1b"):
        for p, m in ((2, 1), (3, 4), (4, 8), (4, 2)):
            sim = simulate(build_schedule(name, p, m), Costs.uniform(p, 1.0, 1.0))
            assert sim.step_time == pytest.approx(2 * (m + p - 1))
            assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


def test_peak_inflight_gpipe_holds_all_1f1b_holds_p_minus_i() -> None:
    for p, m in ((4, 8), (4, 2), (3, 3)):
        assert simulate(build_schedule("gpipe", p, m)).peak_inflight == [m] * p
        expect = [min(p - i, m) for i in range(p)]
        assert simulate(build_schedule("1f1b", p, m)).peak_inflight == expect


def test_interleaved_exact_picture_and_closed_form() -> None:
    """2 ranks x 2 chunks, 4 microbatches (rank 0 runs stages 0 and 2):

    rank 0 | 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
    rank 1 | .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .
    """
    sched = build_schedule("interleaved", 2, 4, virtual_stages=2)
    assert sched.stage_to_rank == (0, 1, 0, 1)
    assert render_ascii(simulate(sched)) == (
        "rank 0 | 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3\n"
        "rank 1 | .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 ."
    )
    for p, v, m in ((2, 2, 4), (4, 2, 8), (3, 3, 6), (4, 3, 4), (2, 4, 8), (1, 3, 5)):
        sim = simulate(build_schedule("interleaved", p, m, v), Costs.uniform(p * v, 1.0, 1.0))
        assert sim.step_time == pytest.approx(2 * (v * m + p - 1))
        assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))


def test_chunked_schedules_need_a_chunked_spec() -> None:
    with pytest.raises(ValueError, match="virtual_stages=2 needs one of: interleaved, loopedbfs"):
        build_schedule("1f1b", 2, 4, virtual_stages=2)


def test_loopedbfs_has_interleavings_bubble_and_gpipes_memory() -> None:
    for p, v, m in ((2, 2, 4), (4, 2, 8), (3, 3, 5)):
        sim = simulate(build_schedule("loopedbfs", p, m, v), Costs.uniform(p * v, 1.0, 1.0))
        assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
        assert sim.peak_inflight == [m] * (p * v)
    inter = simulate(build_schedule("interleaved", 4, 8, 2)).peak_inflight
    bfs = simulate(build_schedule("loopedbfs", 4, 8, 2)).peak_inflight
    assert inter == [8, 8, 7, 5, 4, 4, 3, 1] and bfs == [8] * 8  # depth-first frees earlier


def test_zb1_exact_picture() -> None:
    sched = build_schedule("zb1", 4, 8)
    picture = render_ascii(simulate(sched, Costs.uniform(4, 1.0, 2.0, w=1.0)))
    assert picture.splitlines() == [
        "rank 0 | F0 F1 F2 F3 .  .  .  I0 W0 F4 I1 W1 F5 I2 W2 F6 I3 W3 F7 I4 W4 I5 W5 I6 W6 I7 W7",
        "rank 1 | .  F0 F1 F2 .  .  I0 F3 I1 W0 F4 I2 W1 F5 I3 W2 F6 I4 W3 F7 I5 W4 I6 W5 I7 W6 W7",
        "rank 2 | .  .  F0 F1 .  I0 F2 I1 F3 I2 W0 F4 I3 W1 F5 I4 W2 F6 I5 W3 F7 I6 W4 I7 W5 W6 W7",
        "rank 3 | .  .  .  F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 F5 I5 W2 F6 I6 W3 F7 I7 W4 W5 W6 W7",
    ]


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 8), (3, 3), (4, 4), (4, 8), (4, 16)])
def test_zb1_idles_a_third_of_1f1b_with_the_same_peak(p: int, m: int) -> None:
    """F = I = W = 1 (a full backward is 2): 1F1B idles (p-1)(F+B) per rank, ZB-H1 (p-1)F."""
    zb = simulate(build_schedule("zb1", p, m), Costs.uniform(p, 1.0, 2.0, w=1.0))
    f1b = simulate(build_schedule("1f1b", p, m), Costs.uniform(p, 1.0, 2.0))
    idle_zb = p * zb.step_time - sum(zb.busy)
    idle_1f1b = p * f1b.step_time - sum(f1b.busy)
    assert idle_1f1b == pytest.approx(p * (p - 1) * 3)
    assert idle_zb == pytest.approx(idle_1f1b / 3)
    assert max(zb.peak_inflight) == max(f1b.peak_inflight) == p


def test_split_backward_schedules_have_i_and_w_not_b() -> None:
    sched = build_schedule("zb1", 3, 4)
    ops = {a.op for row in sched.actions for a in row if a.op.is_compute}
    assert ops == {Op.F, Op.I, Op.W}


@pytest.mark.parametrize(
    ("name", "p", "v", "m"),
    [
        (name, p, v, m)
        for name, v in (("zb1", 1), ("interleaved", 2), ("interleaved", 3), ("loopedbfs", 2))
        for p in (1, 2, 3, 4)
        for m in (1, 2, 3, 4, 6, 8)
    ],
)
def test_every_new_schedule_validates(name: str, p: int, v: int, m: int) -> None:
    sched = build_schedule(name, p, m, v)
    compute = [a for row in sched.actions for a in row if a.op.is_compute]
    per_mb = 3 if name == "zb1" else 2
    assert len(compute) == per_mb * p * v * m
