"""The prediction benchmark's own logic: the seeded grid, the error statistics, and that the
prediction is made from what the planner knows before the launch (bench/predict.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from splitgraph.bench import predict as bp


def test_grid_is_deterministic_from_its_seed() -> None:
    assert bp.grid_models(17) == bp.grid_models(17)
    assert bp.grid_models(17) != bp.grid_models(18)
    a = bp.grid_points(bp.grid_models(17), 17, {2: 2, 4: 1})
    b = bp.grid_points(bp.grid_models(17), 17, {2: 2, 4: 1})
    assert [p.key() for p in a] == [p.key() for p in b]


@pytest.mark.parametrize("seed", [17, 3])
def test_grid_covers_the_required_ranges(seed: int) -> None:
    models = bp.grid_models(seed)
    assert len(models) >= 12
    widths = [w for m in models for w in m.hidden]
    assert min(widths) == 32 and max(widths) == 2048
    depths = [m.layers for m in models]
    assert min(depths) == 2 and max(depths) == 16
    batches = [m.batch for m in models]
    assert min(batches) == 64 and max(batches) == 1024
    assert {m.shape for m in models} == {"balanced", "unbalanced"}
    for m in models:
        if m.shape == "unbalanced":
            assert max(m.hidden) >= 4 * min(m.hidden), m
        else:
            assert len(set(m.hidden)) == 1, m
        assert 6 * m.batch * m.params <= bp.STEP_FLOP_BUDGET, m
    points = bp.grid_points(models, seed, bp.parse_per_model(bp.PER_MODEL))
    assert len(points) >= 20
    assert {p.schedule for p in points} == set(bp.SCHEDULES)
    assert {p.p for p in points} == {2, 4}
    assert all(1 <= p.m <= 16 for p in points)
    assert max(p.m for p in points) > 8
    for p in points:
        assert bp.defined(p.schedule, p.p, p.m, p.model.layers), p.describe()
        assert (p.schedule == "naive") == (p.m == 1)


def test_oversubscribed_rows_are_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bp, "cores", lambda: 2)
    spec = bp.ModelSpec("t", 32, (32, 32, 32), 10, 64, "balanced")
    assert bp.Point(spec, 4, "1f1b", 4).oversubscribed
    assert not bp.Point(spec, 2, "1f1b", 4).oversubscribed


def test_error_statistics_count_a_failed_point_as_failed_not_as_zero() -> None:
    errors = [0.1, -0.2, 0.05, float("nan"), 0.3]
    st = bp.error_stats(errors)
    assert st["points"] == 5 and st["measured"] == 4 and st["failed"] == 1
    # |errors| of the finite ones: 0.05, 0.1, 0.2, 0.3 -> median 0.15, p90 0.27
    assert st["median_abs"] == pytest.approx(0.15)
    assert st["p90_abs"] == pytest.approx(0.27)
    assert st["max_abs"] == pytest.approx(0.3)
    # a NaN counted as zero error would give median 0.1
    assert bp.error_stats([float("nan")] * 3)["failed"] == 3
    assert math.isnan(bp.error_stats([float("nan")] * 3)["median_abs"])


def test_rel_error_and_noise_floor() -> None:
    assert bp.rel_error(1.1, 1.0) == pytest.approx(0.1)
    assert math.isnan(bp.rel_error(float("nan"), 1.0))
    assert math.isnan(bp.rel_error(1.0, 0.0))
    assert bp.noise_floor([1.0, 1.1, 1.05]) == pytest.approx(0.1)
    assert math.isnan(bp.noise_floor([1.0, float("nan")]))


def test_search_verdict_reads_the_noise_floor() -> None:
    assert bp.judge_search([1.0, 1.2, 1.1], 0.05) == {
        "hit": True,
        "exact": True,
        "best": 0,
        "regret": 1.0,
    }
    v = bp.judge_search([1.04, 1.0, 1.2], 0.05)
    assert v["hit"] and not v["exact"] and v["best"] == 1
    assert not bp.judge_search([1.2, 1.0], 0.05)["hit"]
    assert not bp.judge_search([float("nan"), 1.0], 0.05)["hit"]


def test_prediction_is_made_before_the_launch_from_no_run_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """predict_point runs before measure_point for each point and gets nothing the launch
    produced; a prediction that read the measurement would see `launched` non-empty."""
    calls: list[str] = []
    launched: list[str] = []

    def fake_predict(point: bp.Point, shared: Any, predictor: str) -> bp.Predicted:
        calls.append(f"predict {point.key()}")
        assert point.key() not in launched, "predicted after its launch"
        return bp.Predicted(0.01, 0.009, 0.001, 0.1, predictor)

    def fake_measure(
        point: bp.Point, shared: Any, workdir: Path, timeout: float, steps: int
    ) -> dict:
        calls.append(f"measure {point.key()} {steps} steps")
        launched.append(point.key())
        return {"step_s": 0.011, "wall_s": 0.0, "error": None}

    monkeypatch.setattr(bp, "predict_point", fake_predict)
    spec = bp.ModelSpec("t", 32, (32, 32, 32), 10, 64, "balanced")
    pts = [bp.Point(spec, 2, "1f1b", 4), bp.Point(spec, 2, "gpipe", 8)]
    rows = bp.run_points(pts, [], "calibrated", tmp_path, 10.0, "t", measure=fake_measure)
    n = bp.steps_for(0.01)  # the launch runs as many steps as its own prediction asks
    assert calls == [
        f"predict {pts[0].key()}",
        f"measure {pts[0].key()} {n} steps",
        f"predict {pts[1].key()}",
        f"measure {pts[1].key()} {n} steps",
    ]
    assert rows[0]["rel_error"] == pytest.approx(0.1)


def test_a_launch_runs_about_step_seconds_of_steps_within_bounds() -> None:
    """Fast points run more steps (their median is otherwise of few noisy samples), slow
    ones no fewer than STEPS, none more than STEPS_MAX; no prediction: STEPS."""
    assert bp.steps_for(0.01) == math.ceil(bp.STEP_SECONDS / 0.01)
    assert bp.STEPS < bp.steps_for(0.03) < bp.STEPS_MAX
    assert bp.steps_for(1e-5) == bp.STEPS_MAX
    assert bp.steps_for(10.0) == bp.STEPS
    assert bp.steps_for(float("nan")) == bp.STEPS


def test_predict_point_signature_takes_no_run_output() -> None:
    """The prediction's inputs: the point, the shared overrides, the predictor; nothing a
    launch wrote (no summary, no run directory)."""
    import inspect

    assert list(inspect.signature(bp.predict_point).parameters) == ["point", "shared", "predictor"]


def test_a_failed_launch_is_recorded_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        bp, "predict_point", lambda pt, sh, pr: bp.Predicted(0.01, 0.01, 0.0, 0.0, pr)
    )
    results = iter(
        [
            {"step_s": float("nan"), "wall_s": 0.0, "error": "exit 1: boom"},
            {"step_s": 0.01, "wall_s": 0.0, "error": None},
        ]
    )
    spec = bp.ModelSpec("t", 32, (32, 32, 32), 10, 64, "balanced")
    pts = [bp.Point(spec, 2, "1f1b", 4), bp.Point(spec, 2, "gpipe", 8)]
    rows = bp.run_points(
        pts, [], "calibrated", tmp_path, 10.0, "t", measure=lambda *a: next(results)
    )
    assert len(rows) == 2
    assert math.isnan(rows[0]["rel_error"]) and rows[0]["error"] == "exit 1: boom"
    assert rows[1]["rel_error"] == pytest.approx(0.0)
    st = bp.error_stats([r["rel_error"] for r in rows])
    assert st["failed"] == 1 and st["measured"] == 1


def test_predict_point_builds_the_step_term_by_term(tmp_path: Path) -> None:
    """The real prediction, deterministic (FLOP-priced layers, a given calibration): each
    term adds to the step, and nothing is launched."""
    from splitgraph.config import load_config
    from splitgraph.cost.calibrate import Calibration, store_calibration

    shared = [f"costs.cache_dir={tmp_path}", "costs.times=flops", "pipeline.bandwidth=1GB"]
    store_calibration(
        load_config(shared).costs, Calibration(2, 1e-4, 1e-3, "test", compute_factor=1.3)
    )
    spec = bp.ModelSpec("t", 32, (64, 256, 64), 10, 64, "unbalanced")
    pred = bp.predict_point(bp.Point(spec, 2, "1f1b", 4), shared, "calibrated")
    steps = list(pred.ablations.values())
    assert len(steps) == 6 and all(math.isfinite(s) and s > 0 for s in steps)
    # FLOP-priced layers have no contention profile; each other term adds time
    assert steps[1] == pytest.approx(steps[0])
    assert steps[1] < steps[2] < steps[3] < steps[4] < steps[5]
    assert pred.step_s == steps[-1]
    assert pred.step_s == pytest.approx(pred.span_s + pred.fixed_s)
    planner = bp.predict_point(bp.Point(spec, 2, "1f1b", 4), shared, "planner")
    assert planner.step_s == pytest.approx(steps[0])


def test_a_run_started_under_load_is_labelled_preliminary() -> None:
    assert bp.load_warning("0.40 0.90 1.20") == ""
    assert "PRELIMINARY" in bp.load_warning("6.85 6.36 6.17")


def test_calibration_is_fitted_to_the_calibration_launches_and_stored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ensure_calibration launches only the calibration model (faked here: steps made from
    known overheads on the simulator), recovers the overheads, stores them, and reads them
    back the second time without launching."""
    from splitgraph.config import Workload, load_config
    from splitgraph.cost.calibrate import (
        GRID,
        Calibration,
        fixed_costs,
        in_conditions,
        load_calibration,
        priced_step,
    )
    from splitgraph.cost.costs import link_from_config, model_costs
    from splitgraph.partition import make_plan

    shared = [f"costs.cache_dir={tmp_path}", "costs.times=flops", "pipeline.bandwidth=1GB"]
    truth = Calibration(2, GRID[20], GRID[12], transfer_s=GRID[10], compute_factor=1.4)
    launched: list[str] = []

    def fake_measure(pt: bp.Point, sh: Any, workdir: Path, timeout: float, steps: int) -> dict:
        assert pt.model in (bp.CAL_MODEL, bp.CAL_HEAVY)
        assert bp.STEPS <= steps <= bp.STEPS_MAX
        launched.append(f"{pt.model.name} {pt.schedule}")
        cfg = Workload.of(bp.point_config(pt, sh))
        costs = model_costs(cfg, 2 * pt.virtual, link=link_from_config(cfg.pipeline, cfg.costs))
        plan = make_plan(cfg, 2, costs)
        sched = costs.schedule(2 * pt.virtual)
        step = priced_step(cfg, in_conditions(cfg, costs, 2), plan.bounds, sched, 2, truth)
        return {"step_s": step.step_s, "wall_s": 0.0, "error": None}

    monkeypatch.setattr(bp, "measure_point", fake_measure)
    cal = bp.ensure_calibration(shared, 2, tmp_path, 10.0, log=lambda _: None)
    assert sorted(launched) == sorted(
        [f"{bp.CAL_MODEL.name} {s}" for s, _ in bp.CAL_POINTS]
        + [f"{bp.CAL_HEAVY.name} {s}" for s, _ in bp.CAL_HEAVY_POINTS]
    )
    assert cal.action_s == pytest.approx(truth.action_s)
    assert cal.transfer_s == pytest.approx(truth.transfer_s)
    assert cal.step_s == pytest.approx(truth.step_s, rel=1e-6)
    assert cal.compute_factor == pytest.approx(truth.compute_factor)
    assert load_calibration(load_config(shared).costs, 2) == cal
    fixed_costs(Workload.of(load_config(shared)))  # measured and cached by the calibration
    launched.clear()
    assert bp.ensure_calibration(shared, 2, tmp_path, 10.0, log=lambda _: None) == cal
    assert launched == []


def test_a_search_reuses_a_measurement_only_for_the_same_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        bp, "predict_point", lambda pt, sh, pr: bp.Predicted(0.01, 0.01, 0.0, 0.0, pr)
    )
    launched: list[str] = []

    def fake_measure(pt: bp.Point, *_: Any) -> dict:
        launched.append(pt.key())
        return {"step_s": 0.012, "wall_s": 1.0, "error": None}

    spec = bp.ModelSpec("t", 32, (32, 32, 32), 10, 64, "balanced")
    split = ("partition=manual", "partition.boundaries=[2]")
    free = bp.Point(spec, 2, "1f1b", 4, split)
    capped = bp.Point(spec, 2, "1f1b", 4, (*split, "pipeline.memory_cap=1000000"))
    other = bp.Point(spec, 2, "1f1b", 8, (*split, "pipeline.memory_cap=1000000"))
    memo: dict = {}
    bp.run_points([free], [], "calibrated", tmp_path, 10.0, "a", fake_measure, memo=memo)
    rows = bp.run_points(
        [capped, other], [], "calibrated", tmp_path, 10.0, "b", fake_measure, memo=memo
    )
    assert launched == [free.key(), other.key()]
    assert rows[0]["reused"] and not rows[1]["reused"]
    assert rows[0]["measured_step_s"] == 0.012


def test_the_searches_keep_their_share_of_the_budget() -> None:
    grid, end = bp.budget_deadlines(100.0, 800.0, 0.4, 8)
    assert end == 900.0 and grid == pytest.approx(580.0)
    assert bp.budget_deadlines(100.0, 800.0, 0.4, 0) == (900.0, 900.0)
    assert bp.budget_deadlines(100.0, None, 0.4, 8) == (math.inf, math.inf)
    # a grid that ran to its deadline leaves each of 8 searches 1/8 of the share; the first
    # running over its slice still leaves the last one a slice of its own
    assert bp.search_slice(580.0, 900.0, 8) == pytest.approx(620.0)
    assert bp.search_slice(700.0, 900.0, 1) == pytest.approx(900.0)
    assert bp.search_slice(700.0, 900.0, 4) == pytest.approx(750.0)
