"""The step priced in the run's conditions (cost/calibrate.py): each term lands where it
should, and the fit recovers known overheads. Deterministic: FLOP-priced layers, given
calibrations; nothing is timed here but one tiny split profile (that it runs and caches)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from splitgraph.config import Workload, load_config
from splitgraph.cost import calibrate as cal_mod
from splitgraph.cost.calibrate import Calibration, FixedCosts, fit_overheads, priced_step
from splitgraph.cost.costs import model_costs
from splitgraph.partition import make_plan
from splitgraph.schedule import simulate

NO_FIXED = FixedCosts(0.0, 0.0)


def _setup(schedule: str, m: int) -> tuple:
    cfg = load_config(
        [
            "model.hidden=[64,256,64]",
            "costs.times=flops",
            "pipeline.bandwidth=1GB",
            f"schedule={schedule}",
            f"pipeline.microbatches={m}",
        ]
    )
    cfg = Workload.of(cfg)
    costs = model_costs(cfg, 2)
    plan = make_plan(cfg, 2, costs)
    return cfg, costs, plan.bounds, costs.schedule(2)


def test_no_overhead_is_the_simulated_step() -> None:
    cfg, costs, bounds, sched = _setup("1f1b", 4)
    got = priced_step(cfg, costs, bounds, sched, 2, Calibration(2, 0.0, 0.0), NO_FIXED)
    assert got.step_s == pytest.approx(simulate(sched, costs.sim_costs(bounds)).step_time)


def test_each_compute_action_pays_the_overhead_and_each_step_the_constant() -> None:
    cfg, costs, bounds, sched = _setup("naive", 1)  # F0 F1 B1 B0 in a chain: 4 actions
    base = priced_step(cfg, costs, bounds, sched, 2, Calibration(2, 0.0, 0.0), NO_FIXED)
    o = priced_step(cfg, costs, bounds, sched, 2, Calibration(2, 1e-3, 0.0), NO_FIXED)
    c = priced_step(cfg, costs, bounds, sched, 2, Calibration(2, 0.0, 2e-3), NO_FIXED)
    assert o.step_s - base.step_s == pytest.approx(4e-3)
    assert c.step_s - base.step_s == pytest.approx(2e-3)


def test_fixed_costs_follow_the_larger_rank_sizes() -> None:
    cfg, costs, bounds, sched = _setup("1f1b", 4)
    per_param = 1e-8
    got = priced_step(
        cfg, costs, bounds, sched, 2, Calibration(2, 0.0, 0.0), FixedCosts(per_param, 0.0)
    )
    params = [
        costs.param_bytes(bounds[s], bounds[s + 1]) // costs.shape.element_size for s in range(2)
    ]
    assert got.fixed_s == pytest.approx(per_param * max(params))
    assert got.step_s == pytest.approx(got.span_s + per_param * max(params))


def test_more_ranks_than_cores_take_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, costs, bounds, sched = _setup("1f1b", 4)
    calib = Calibration(2, 0.0, 0.0)
    two = priced_step(cfg, costs, bounds, sched, 2, calib, NO_FIXED)
    assert two.bound == "schedule"
    monkeypatch.setattr(cal_mod, "cores", lambda: 1)
    one = priced_step(cfg, costs, bounds, sched, 2, calib, NO_FIXED)
    assert one.bound == "timeshared"
    # one core: never faster than all the work in a row, idle only while a transfer moves
    comm = sum(costs.sim_costs(bounds).comm or []) * 2 * len(costs.sizes)
    assert sum(one.busy_s) <= one.step_s <= sum(one.busy_s) + comm
    assert one.step_s > two.step_s * 1.2


def test_fixed_costs_take_turns_where_ranks_exceed_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks' optimizer steps at once on one core take their sum, on two the larger."""
    cfg, costs, bounds, sched = _setup("1f1b", 4)
    calib, fixed = Calibration(2, 0.0, 0.0), FixedCosts(1e-8, 0.0)
    params = [
        costs.param_bytes(bounds[s], bounds[s + 1]) // costs.shape.element_size for s in range(2)
    ]
    monkeypatch.setattr(cal_mod, "cores", lambda: 1)
    assert priced_step(cfg, costs, bounds, sched, 2, calib, fixed).fixed_s == pytest.approx(
        1e-8 * sum(params)
    )


def test_fit_recovers_known_overheads() -> None:
    # four launches: compute actions and transfer groups on the critical path
    base, actions, groups = [1e-3, 2e-3, 5e-3, 3e-3], [4, 12, 40, 16], [2, 6, 20, 12]
    fixed = [1e-4, 1e-4, 2e-4, 1e-4]
    o_true, t_true, c_true = cal_mod.GRID[21], cal_mod.GRID[10], 3e-4
    measured = [
        b + n * o_true + g * t_true + f + c_true for b, n, g, f in zip(base, actions, groups, fixed)
    ]

    def spans(o: float, t: float) -> list[float]:
        return [b + n * o + g * t for b, n, g in zip(base, actions, groups)]

    o, t, c, rms = fit_overheads(spans, fixed, measured)
    assert o == pytest.approx(o_true)
    assert t == pytest.approx(t_true)
    assert c == pytest.approx(c_true)
    assert rms < 1e-9


def test_each_transfer_group_pays_its_post() -> None:
    cfg, costs, bounds, sched = _setup("naive", 1)  # F0 | send, recv | F1 B1 | ... B0
    base = priced_step(cfg, costs, bounds, sched, 2, Calibration(2, 0.0, 0.0), NO_FIXED)
    t = priced_step(
        cfg, costs, bounds, sched, 2, Calibration(2, 0.0, 0.0, transfer_s=1e-3), NO_FIXED
    )
    assert t.step_s > base.step_s + 1e-3


def test_search_ranks_by_the_price_it_is_given() -> None:
    from splitgraph.planner.search import search

    cfg, costs, _, _ = _setup("1f1b", 4)
    plain = [c for c in search(cfg, 2, costs.link) if c.fits]
    flipped = [c for c in search(cfg, 2, costs.link, price=lambda p: -p.step_time) if c.fits]
    assert [c.step_s for c in plain] == sorted(c.step_s for c in plain)
    assert plain[0].step_s < plain[-1].step_s
    # the priced order is the reverse of the simulated one
    assert [c.prediction.step_time for c in flipped] == sorted(
        (c.prediction.step_time for c in plain), reverse=True
    )
    assert flipped[0].priced_s == -flipped[0].prediction.step_time


def test_pricer_prices_a_prediction_as_priced_step() -> None:
    from splitgraph.planner.predict import predict

    cfg, costs, bounds, sched = _setup("gpipe", 4)
    calib = Calibration(2, 1e-4, 5e-4)
    plan = make_plan(cfg, 2, costs)
    fixed = FixedCosts(1e-8, 1e-6)
    got = cal_mod.pricer(cfg, 2, calib, fixed)(predict(plan, costs))
    assert got == pytest.approx(priced_step(cfg, costs, bounds, sched, 2, calib, fixed).step_s)
    assert got > predict(plan, costs).step_time


def test_zero_bubble_prices_its_measured_input_and_weight_halves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zb1's I and W are the split profile's, per layer, not B/2 each: halves that sum to
    1.5 B lengthen the step; the 1f1b step (no I, no W) does not read them."""
    cfg, costs, bounds, sched = _setup("zb1", 4)
    calib = Calibration(2, 0.0, 0.0)
    half = priced_step(cfg, costs, bounds, sched, 2, calib, NO_FIXED)
    split = [(0.75 * b, 0.75 * b) for b in costs.backward]
    monkeypatch.setattr(cal_mod, "split_times", lambda work, mc, ranks: split)
    measured = priced_step(cfg, costs, bounds, sched, 2, calib, NO_FIXED)
    assert measured.step_s > half.step_s * 1.1
    sim = cal_mod.sim_with_overhead(costs, bounds, 1e-3, 0.0, split)
    for s in range(2):
        lo, hi = bounds[s], bounds[s + 1]
        assert sim.backward_input[s] == pytest.approx(sum(x for x, _ in split[lo:hi]) + 1e-3)
        assert sim.weight[s] == pytest.approx(sum(y for _, y in split[lo:hi]) + 1e-3)
    cfg1, costs1, bounds1, sched1 = _setup("1f1b", 4)
    assert not sched1.split_backward
    assert priced_step(cfg1, costs1, bounds1, sched1, 2, calib, NO_FIXED).step_s == pytest.approx(
        simulate(sched1, costs1.sim_costs(bounds1)).step_time
    )


def test_split_profile_times_each_layer_and_caches_it(tmp_path: Path) -> None:
    cfg = Workload.of(
        load_config(["model.hidden=[64,64]", f"costs.cache_dir={tmp_path}", "costs.repeats=3"])
    )
    import torch

    got = cal_mod.split_profile(cfg, 16, torch.float32, busy=1)
    assert len(got) == 3 and all(i > 0 and w > 0 for i, w in got)
    assert cal_mod.split_profile(cfg, 16, torch.float32, busy=1) == got  # read back


def test_the_compute_factor_scales_every_compute_action_not_the_overheads() -> None:
    cfg, costs, bounds, sched = _setup("gpipe", 4)
    one = priced_step(cfg, costs, bounds, sched, 2, Calibration(2, 1e-4, 1e-3), NO_FIXED)
    k = Calibration(2, 1e-4, 1e-3, compute_factor=1.5)
    got = priced_step(cfg, costs, bounds, sched, 2, k, NO_FIXED)
    assert got.step_s > one.step_s
    base = costs.sim_costs(bounds)
    sim = cal_mod.sim_with_overhead(costs, bounds, 1e-4, 0.0, None, 1.5)
    assert list(sim.forward) == pytest.approx([1.5 * f + 1e-4 for f in base.forward])
    assert list(sim.backward) == pytest.approx([1.5 * b + 1e-4 for b in base.backward])
    # every action on the critical path is F or B here: the busy time grows by exactly half
    assert sum(got.busy_s) - 4 * 2 * 2 * 1e-4 == pytest.approx(
        1.5 * (sum(one.busy_s) - 4 * 2 * 2 * 1e-4)
    )


@pytest.mark.parametrize(("true_factor", "clipped"), [(1.3, False), (5.0, True)])
def test_a_fit_past_its_grid_is_said(
    caplog: pytest.LogCaptureFixture, true_factor: float, clipped: bool
) -> None:
    """A compute factor the grid cannot reach is fitted at the grid's end, and the log says
    so (the prices built on it are off); one inside the grid is found and nothing is said."""
    from splitgraph.cost.calibrate import FACTORS, fit_calibration

    def light(o: float, t: float, k: float, g: float) -> list[float]:
        return [1e-3 * k + 10 * o + 2 * t, 2e-3 * k + 20 * o + 4 * t]

    with caplog.at_level(logging.WARNING, logger="splitgraph"):
        *_, k, _, _ = fit_calibration(
            light,
            [0.0, 0.0],
            light(1e-5, 0.0, true_factor, 1.0),
            lambda o, t, k, g: [10e-3 * k],
            [0.0],
            [10e-3 * true_factor],
        )
    said = [r.getMessage() for r in caplog.records if "edge of its grid" in r.getMessage()]
    assert (k == FACTORS[-1]) is clipped
    assert bool(said) is clipped
    if not clipped:
        assert k == pytest.approx(true_factor, abs=0.02)


@pytest.mark.parametrize("crowded", [True, False])
def test_the_fit_tells_the_compute_factor_from_crowding(crowded: bool) -> None:
    """Where ranks exceed cores, the compute-bound model's naive launch (one rank at work)
    sees only the factor and its 1F1B launch (all at work) both: the fit recovers each.
    Where they do not, crowding stays 1."""
    from splitgraph.cost.calibrate import fit_calibration

    def light(o: float, t: float, k: float, g: float) -> list[float]:
        return [1e-3 * k + 10 * o + 2 * t, 2e-3 * k + 20 * o + 4 * t]

    def heavy(o: float, t: float, k: float, g: float) -> list[float]:
        return [10e-3 * k, 6e-3 * k * g]

    *_, k, _, g = fit_calibration(
        light,
        [0.0, 0.0],
        light(1e-5, 0.0, 1.3, 1.4),
        heavy,
        [0.0, 0.0],
        heavy(1e-5, 0.0, 1.3, 1.4),
        crowded=crowded,
    )
    if crowded:
        assert (k, g) == pytest.approx((1.3, 1.4), abs=0.011)
    else:
        assert g == 1.0


def test_the_fixed_costs_time_the_guards_end_of_step_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every step ends with the guard's check of every parameter gradient (an aminmax of
    each: a read of all of them, per parameter): the fixed-cost microbenchmark times it with
    weight decay and the optimizer."""
    from splitgraph.config import Workload, load_config
    from splitgraph.cost.calibrate import _time_fixed

    seen: list[int] = []
    real = torch.aminmax

    def aminmax(t: torch.Tensor, *a: Any, **k: Any) -> Any:
        seen.append(t.numel())
        return real(t, *a, **k)

    monkeypatch.setattr(torch, "aminmax", aminmax)
    work = Workload.of(load_config([]))
    _time_fixed(work, (32, 32), 2, repeats=1)
    per_step = 2 * (32 * 32 + 32 * int(bool(work.model.bias)))
    assert sum(seen) == 3 * per_step  # 1 + 2 warm-up repeats, every gradient each time
