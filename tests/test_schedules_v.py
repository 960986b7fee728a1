"""zb2, zbv, vhalf, vmin and interleaving for any m: what each is proved to do, in the simulator.

Unit costs throughout: F = I = W = 1 per stage (B = 2) for one stage per rank, and per chunk
for the V schedules (so a V rank does the work of a 1F1B rank whose stage is twice as large:
1F1B is simulated with F = 2, B = 4 to compare). Peaks are `peak_activation`: activations a
rank holds, in whole-model microbatches (1F1B's first rank holds exactly 1).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from splitgraph.config import load_config
from splitgraph.config import validate as validate_config
from splitgraph.errors import ConfigError
from splitgraph.schedule import SCHEDULES, Costs, build_schedule, render_ascii, simulate
from splitgraph.schedule.ir import RECV_F, SEND_F, round_robin, v_shape
from splitgraph.schedule.simulate import peak_activation


def _unit(p: int, v: int) -> Costs:
    return Costs.uniform(p * v, 1.0, 2.0, w=1.0)


def _1f1b_peak(p: int, m: int) -> float:
    return max(peak_activation(build_schedule("1f1b", p, m)))


def test_placements() -> None:
    assert round_robin(3, 6) == (0, 1, 2, 0, 1, 2)
    assert v_shape(3, 6) == (0, 1, 2, 2, 1, 0)
    assert v_shape(2, 6) == (0, 1, 1, 0, 0, 1)  # torch's "v" style zigzags on
    for name in ("zbv", "vhalf", "vmin"):
        assert SCHEDULES[name].placement is v_shape
        assert build_schedule(name, 4, 8, 2).stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    for name in ("interleaved", "loopedbfs", "zb2"):
        assert SCHEDULES[name].placement is round_robin


def test_the_v_turns_on_one_rank_without_a_transfer() -> None:
    """Stages p-1 and p share rank p-1: lowering hands the activation over locally."""
    p = 3
    sched = build_schedule("zbv", p, 4, 2)
    last = sched.actions[p - 1]
    assert not [a for a in last if a.op == SEND_F and a.stage == p - 1]
    assert not [a for a in last if a.op == RECV_F and a.stage == p]
    assert [a for a in sched.actions[0] if a.op == RECV_F and a.stage == 2 * p - 1]  # from rank 1


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6])
def test_zbv_has_no_idle_in_any_span_and_reaches_the_lower_bound(p: int) -> None:
    """For m >= 2p at F = I = W: every rank is busy from its first action to its last, and
    the step is 6m + p - 1, the least possible (rank p-1 cannot start before p-1 forwards
    have passed, and then has 6m of work). Its peak is 1F1B's, on every rank."""
    for m in (2 * p, 2 * p + 1, 3 * p):
        sim = simulate(build_schedule("zbv", p, m, 2), _unit(p, 2))
        assert sim.span_idle == pytest.approx([0.0] * p)
        assert sim.step_time == pytest.approx(6 * m + p - 1)
        assert sim.events[p - 1][0].start == pytest.approx(p - 1)
        assert sim.peak_activation == pytest.approx([_1f1b_peak(p, m)] * p)
        assert _1f1b_peak(p, m) == pytest.approx(1.0)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_zbv_never_holds_more_than_1f1b(p: int) -> None:
    for m in range(1, 3 * p):
        assert max(peak_activation(build_schedule("zbv", p, m, 2))) <= _1f1b_peak(p, m) + 1e-9


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6])
def test_zb2_has_no_idle_in_any_span_where_zb1_does(p: int) -> None:
    """m >= 2p-1, F = I = W: zb2 idles nowhere inside a rank's span and its step is the
    lower bound 3m + p - 1; zb1 reaches the same step but rank r idles p-1-r inside its
    span (waiting for its first I). The price: 2p-1 microbatches held, (2p-1)/p of 1F1B."""
    for m in (2 * p - 1, 2 * p, 4 * p):
        zb2 = simulate(build_schedule("zb2", p, m), _unit(p, 1))
        zb1 = simulate(build_schedule("zb1", p, m), _unit(p, 1))
        assert zb2.span_idle == pytest.approx([0.0] * p)
        assert zb1.span_idle == pytest.approx([float(p - 1 - r) for r in range(p)])
        assert zb2.step_time == pytest.approx(3 * m + p - 1) == zb1.step_time
        assert zb2.peak_activation == pytest.approx([(2 * p - 1) / p] * p)


@pytest.mark.parametrize(("p", "m"), [(p, m) for p in (2, 3, 4) for m in (1, 2, 4, 8, 16)])
def test_zb2_is_never_slower_than_zb1_and_faster_when_w_is_cheap(p: int, m: int) -> None:
    """zb1 idles (p-1)(F+I-W) per rank, zb2 only the unavoidable fill: with W < I zb2 wins."""
    for w in (0.25, 0.5, 1.0):
        costs = Costs.uniform(p, 1.0, 1.0 + w, w=w)
        zb2 = simulate(build_schedule("zb2", p, m), costs).step_time
        zb1 = simulate(build_schedule("zb1", p, m), costs).step_time
        assert zb2 <= zb1 + 1e-9
        if w < 1.0 and m >= 2 * p and p > 1:
            assert zb2 < zb1 - 1e-9


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8])
def test_vhalf_and_vmin_hold_a_half_and_a_third_of_1f1b_plus_one_stage(p: int) -> None:
    """Peaks for m >= 2p, exactly: vhalf (floor(p/2)+1)/p of 1F1B's, vmin
    (floor((p+1)/3)+1)/p; never more for smaller m; and both faster than 1F1B."""
    half, third = (p // 2 + 1) / p, ((p + 1) // 3 + 1) / p
    for m in (1, 2, p, 2 * p, 3 * p):
        f1b = _1f1b_peak(p, m)
        for name, share in (("vhalf", half), ("vmin", third)):
            peak = max(peak_activation(build_schedule(name, p, m, 2)))
            assert peak <= share * 1.0 + 1e-9
            if m >= 2 * p:
                assert f1b == pytest.approx(1.0) and peak == pytest.approx(share)
            if m >= 2:
                step = simulate(build_schedule(name, p, m, 2), _unit(p, 2)).step_time
                f1b_step = simulate(build_schedule("1f1b", p, m), Costs.uniform(p, 2, 4)).step_time
                assert step < f1b_step
    if p >= 6:
        assert half <= 2 / 3 and third <= 1 / 2


@pytest.mark.parametrize(
    ("name", "p", "v"),
    [(n, p, v) for n in ("interleaved", "loopedbfs") for p in (1, 2, 3, 4, 5) for v in (1, 2, 3, 4)]
    + [(n, p, 2) for n in ("zbv", "vhalf", "vmin") for p in (1, 2, 3, 4, 5, 6)],
)
def test_multi_chunk_schedules_are_valid_for_every_m(name: str, p: int, v: int) -> None:
    """build_schedule validates (ownership, counts, order, FIFO channels) and dry-runs the
    schedule under the strict transfer rules: no deadlock, for every m from 1 to 13."""
    per = 3 if SCHEDULES[name].split_backward else 2
    for m in range(1, 14):
        sched = build_schedule(name, p, m, v)
        assert sum(len(sched.compute(r)) for r in range(p)) == per * p * v * m
        simulate(sched, strict=True)


def test_interleaved_rounds_follow_torch_and_even_out() -> None:
    from splitgraph.schedule.onefoneb import round_sizes

    assert round_sizes(4, 8) == [4, 4]
    assert round_sizes(4, 10) == [5, 5]  # torch: 2 rounds of 5
    assert round_sizes(4, 9) == [5, 4]  # torch refuses 9 (not a multiple of 2 rounds)
    assert round_sizes(4, 3) == [3]
    # m a multiple of p keeps Megatron's closed form
    sim = simulate(build_schedule("interleaved", 4, 12, 2), Costs.uniform(8, 1.0, 1.0))
    assert sim.bubble_fraction == pytest.approx(3 / (2 * 12 + 3))


def test_every_schedule_spec_carries_its_own_rules() -> None:
    assert SCHEDULES["naive"].problems(3, 1, 2)[0].startswith("schedule=naive runs the whole")
    assert "Set schedule.virtual_stages=2" in SCHEDULES["zbv"].problems(4, 1, 8)[0]
    assert "Set schedule.virtual_stages=2" in SCHEDULES["vhalf"].problems(4, 3, 8)[0]
    assert SCHEDULES["interleaved"].problems(4, 2, 6) == []  # any m now
    with pytest.raises(ValueError, match="virtual_stages=2"):
        build_schedule("vmin", 2, 4, 1)


@pytest.mark.parametrize("name", ["zb2", "zbv", "vhalf", "vmin", "auto"])
def test_the_trainer_accepts_every_schedule(name: str) -> None:
    """The plan carries the schedule's placement (V: stage s and 2p-1-s on rank s), and
    auto is built from the planner's costs in training: validate refuses none of them."""
    v = 1 if name == "zb2" else 2
    cfg = load_config([f"schedule={name}", f"schedule.virtual_stages={v}", "pipeline.stages=2"])
    validate_config(cfg, 2)


def test_schedule_csv_is_read_and_validated_before_launch(tmp_path: Path) -> None:
    from splitgraph.schedule.interop import write_csv

    base = ["schedule=csv", "schedule.virtual_stages=2", "pipeline.stages=2"]
    with pytest.raises(ConfigError, match=r"set schedule\.path=FILE\.csv"):
        validate_config(load_config(base + ["pipeline.microbatches=4"]), 2)
    path = write_csv(build_schedule("zbv", 2, 4, 2), tmp_path / "zbv.csv")
    validate_config(load_config(base + ["pipeline.microbatches=4", f"schedule.path={path}"]), 2)
    with pytest.raises(ConfigError, match=r"microbatches 4 \(expected 6\)"):
        validate_config(load_config(base + ["pipeline.microbatches=6", f"schedule.path={path}"]), 2)
    bad = tmp_path / "bad.csv"  # rank 1 runs stage 2's forward before stage 1's: refused
    bad.write_text(path.read_text().replace("1F0,2F0", "2F0,1F0", 1))
    with pytest.raises(ConfigError, match="ERROR HERE"):
        validate_config(load_config(base + ["pipeline.microbatches=4", f"schedule.path={bad}"]), 2)


def test_schedule_path_is_only_for_csv() -> None:
    cfg = load_config(["schedule=1f1b", "schedule.path=x.csv", "pipeline.stages=2"])
    with pytest.raises(ConfigError, match=r"schedule\.path is only read with schedule=csv"):
        validate_config(cfg, 2)


def test_listed_grid_is_what_the_readme_table_says() -> None:
    """The schedule tables (README, docs/schedules.md) quote these (p = 4, m = 8, unit costs)."""
    got = {}
    for name, v in itertools.chain(
        (("1f1b", 1), ("zb1", 1), ("zb2", 1)), (("zbv", 2), ("vhalf", 2), ("vmin", 2))
    ):
        sim = simulate(build_schedule(name, 4, 8, v), _unit(4, v) if v == 2 else _unit(4, 1))
        got[name] = (sim.step_time * (1 if v == 2 else 2), round(max(sim.peak_activation), 3))
    assert got == {
        "1f1b": (66.0, 1.0),
        "zb1": (54.0, 1.0),
        "zb2": (54.0, 1.75),
        "zbv": (51.0, 1.0),
        "vhalf": (60.0, 0.75),
        "vmin": (59.0, 0.5),
    }


def test_zb2_exact_picture() -> None:
    """The picture in zerobubble.py's docstring."""
    sim = simulate(build_schedule("zb2", 4, 8), _unit(4, 1))
    assert render_ascii(sim).splitlines() == [
        "rank 0 | F0 F1 F2 F3 F4 F5 F6 I0 W0 I1 F7 I2 W1 I3 W2 I4 W3 I5 W4 I6 W5 W6 I7 W7 .  .  .",
        "rank 1 | .  F0 F1 F2 F3 F4 I0 F5 I1 F6 I2 W0 I3 F7 I4 W1 I5 W2 I6 W3 W4 I7 W5 W6 W7 .  .",
        "rank 2 | .  .  F0 F1 F2 I0 F3 I1 F4 I2 F5 I3 F6 I4 W0 I5 F7 I6 W1 W2 I7 W3 W4 W5 W6 W7 .",
        "rank 3 | .  .  .  F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 F5 I5 F6 I6 W0 F7 I7 W1 W2 W3 W4 W5 W6 W7",
    ]


def test_v_pictures_in_the_docstring() -> None:
    zbv = simulate(build_schedule("zbv", 2, 3, 2), _unit(2, 2))
    assert render_ascii(zbv).splitlines() == [
        "rank 0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0I0 0W0 3F2 3I2 3W2 0I1 0W1 0I2 0W2 .",
        "rank 1 | .   1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1I1 2I2 1I2 1W1 2W2 1W2",
    ]
    vhalf = simulate(build_schedule("vhalf", 3, 2, 2), _unit(3, 2))
    assert render_ascii(vhalf).splitlines() == [
        "rank 0 | 0F0 0F1 .   .   .   5F0 5I0 5W0 .   .   5F1 5I1 5W1 0I0 0W0 .   .   0I1 0W1",
        "rank 1 | .   1F0 .   .   4F0 1F1 .   4I0 4W0 4F1 .   1I0 4I1 1W0 4W1 .   1I1 1W1 .",
        "rank 2 | .   .   2F0 3F0 .   .   2F1 3F1 3I0 3W0 2I0 2W0 .   3I1 3W1 2I1 2W1 .   .",
    ]
    vmin = render_ascii(simulate(build_schedule("vmin", 2, 3, 2), _unit(2, 2))).splitlines()
    assert vmin[0].startswith("rank 0 | 0F0 .   .   3F0 3I0 3W0 0F1 0I0 0W0 3F1 3I1 3W1 0F2 0I1")
    assert vmin[1].endswith("2F2 2W1 1W1 2I2 1I2 2W2 1W2")


def test_schedule_command_draws_and_exports_every_new_schedule(tmp_path: Path) -> None:
    from splitgraph.schedule.cli import main as schedule_main
    from splitgraph.schedule.interop import load_csv

    for name, v in (("zb2", 1), ("zbv", 2), ("vhalf", 2), ("vmin", 2), ("auto", 2)):
        png, csv = tmp_path / f"{name}.png", tmp_path / f"{name}.csv"
        args = [name, "pipeline.stages=2", "pipeline.microbatches=4"]
        args += [f"schedule.virtual_stages={v}", "--out", str(png), "--to-csv", str(csv)]
        assert schedule_main(args) == 0
        assert png.stat().st_size > 10_000
        assert load_csv(csv, 2, 4, v).num_stages == 2 * v
    assert (
        schedule_main(["schedule=csv", f"schedule.path={tmp_path / 'zbv.csv'}", "--no-picture"])
        == 0
    )
