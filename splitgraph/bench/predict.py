"""The planner's a-priori step time against real runs, on models it has never seen (issue 17).

    python -m splitgraph.bench.predict --out results/prediction   # the whole grid
    python -m splitgraph.bench.predict --quick                    # a smoke grid (outputs/)

What it does, in order:

1. A grid of held-out MLPs drawn from `--seed` (`grid_models`): widths 32-2048, 2-16
   layers, balanced (one width) and deliberately unbalanced (one or two layers much wider
   than the rest), batch 64-1024, scaled down where a step would take too long to measure
   many. Each model gets points (`grid_points`): p=2 and p=4 ranks (p=4 oversubscribes a
   2-core machine: those rows are marked), schedules naive/gpipe/1f1b/interleaved/zb1
   cycled over the grid, m in 1..16 where the schedule defines it.
2. For every point, the prediction is made and recorded **before** its launch, from what
   the planner knows a priori: the layer profile, the link, the model's sizes and (with
   `--predictor calibrated`, the default) the machine's calibration (cost/calibrate.py),
   never from the run it predicts (`predict_point` takes no run output).
3. Then a real launch of `splitgraph.train` (`--nproc N`: the fork launcher, `bench/launch.py`)
   with a deadline;
   the measured number is the run's `step_time_median_s` (every step but the first), as a
   user's training run reports it, with tracing off, over about STEP_SECONDS of steps at
   the point's predicted step time (`steps_for`: 20 to 150 steps). A failed launch is
   recorded (NaN) and the run goes on.
4. The noise floor: one configuration launched `--noise` times; its spread (max/min - 1).
5. `--searches` searches (`planner.search`, with and without a memory cap): the top 5
   candidates each launched; is the predicted best the measured best, or within the noise
   floor of it? The regret: measured time of the pick / measured best.

It writes results.json, table.md and scatter.png (predicted vs measured, y = x) under
`--out`; the machine and `uptime`'s load before and after are in both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

#: The schedules of the grid, cycled over its points.
SCHEDULES: tuple[str, ...] = ("naive", "gpipe", "1f1b", "interleaved", "zb1")
#: Microbatch counts drawn for the schedules that take several.
MICROBATCHES: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16)
#: Width range and the layer counts (depth) of the grid.
WIDTHS: tuple[int, int] = (32, 2048)
DEPTHS: tuple[int, int] = (2, 16)
BATCHES: tuple[int, ...] = (64, 128, 256, 512, 1024)
#: FLOPs of one step (forward + backward, ~3x 2 * rows * params) a grid model may take:
#: ~0.1-0.2 s on one core, so that ~60 launches fit the 15-minute budget.
STEP_FLOP_BUDGET = 2.5e9
#: Steps per launch: about STEP_SECONDS of steps by the point's own prediction (made before
#: its launch), at least STEPS and at most STEPS_MAX; the median skips the first
#: (summary.json's step_time_median_s). A launch's start-up is ~5 s whatever its steps, so
#: a fast configuration measured over 20 steps (0.2 s) had a median of few, noisy samples.
STEPS = 20
STEPS_MAX = 150
STEP_SECONDS = 1.5
#: Every launch: no checkpoint, no trace, no in-run report (the run's own link measurement).
COMMON = (
    "train.progress=false",
    "checkpoint.save=false",
    "checkpoint.every=null",
    "trace.enabled=false",
    "costs.report=false",
    "data.samples=4096",
)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- the grid -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One held-out model: `in_features -> hidden... -> out_features`, at `batch` rows."""

    name: str
    in_features: int
    hidden: tuple[int, ...]
    out_features: int
    batch: int
    shape: str  # "balanced" or "unbalanced"

    @property
    def dims(self) -> list[int]:
        return [self.in_features, *self.hidden, self.out_features]

    @property
    def layers(self) -> int:
        return len(self.hidden) + 1

    @property
    def params(self) -> int:
        d = self.dims
        return sum(a * b for a, b in zip(d[:-1], d[1:]))

    def overrides(self) -> list[str]:
        return [
            f"model.hidden=[{','.join(map(str, self.hidden))}]",
            f"data.features={self.in_features}",
            f"data.outputs={self.out_features}",
            f"train.batch_size={self.batch}",
        ]


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def grid_models(seed: int, count: int = 12) -> list[ModelSpec]:
    """`count` models drawn from `seed` (deterministic). The first six pin the ends of the
    ranges (the widest and narrowest layer, the deepest and shallowest model, the largest and
    smallest batch); the rest are drawn. Even-numbered models are balanced, odd ones not.
    A model whose step would exceed STEP_FLOP_BUDGET gets a smaller batch (down to 64),
    then narrower layers (never the pinned extreme)."""
    rng = random.Random(seed)
    pins: list[dict[str, int]] = [  # even: balanced (a flat model of width 32, of 2 layers)
        {"width": WIDTHS[1]},
        {"depth": DEPTHS[1]},
        {"width": WIDTHS[0]},
        {"batch": BATCHES[-1]},
        {"depth": DEPTHS[0]},
        {"batch": BATCHES[0]},
    ]
    out = []
    for i in range(count):
        pin = pins[i] if i < len(pins) else {}
        depth = pin.get("depth", rng.randint(3, DEPTHS[1]))
        width = pin.get("width", _log_uniform(rng, 64, 1024))
        batch = pin.get("batch", rng.choice(BATCHES))
        in_f = rng.choice((32, 64, 128, 256))
        out_f = rng.choice((10, 32, 100))
        balanced = i % 2 == 0
        if balanced:
            hidden = [width] * (depth - 1)
        else:  # one or two wide layers among narrow ones
            narrow = max(WIDTHS[0], width // 8)
            hidden = [narrow] * (depth - 1)
            wide = sorted(rng.sample(range(len(hidden)), min(2, len(hidden))))
            for j in wide[: 1 + (depth > 6)]:
                hidden[j] = max(width, 4 * narrow)
        spec = _fit_budget(
            ModelSpec(
                f"m{i:02d}",
                in_f,
                tuple(hidden),
                out_f,
                batch,
                "balanced" if balanced else "unbalanced",
            ),
            keep_width="width" in pin,
            keep_batch="batch" in pin,
        )
        out.append(spec)
    return out


def _step_flops(spec: ModelSpec) -> float:
    return 6.0 * spec.batch * spec.params


def _fit_budget(spec: ModelSpec, keep_width: bool, keep_batch: bool) -> ModelSpec:
    while _step_flops(spec) > STEP_FLOP_BUDGET and not keep_batch and spec.batch > BATCHES[0]:
        spec = ModelSpec(**{**asdict(spec), "batch": spec.batch // 2})
    while _step_flops(spec) > STEP_FLOP_BUDGET:
        top = max(spec.hidden)
        if keep_width and top >= WIDTHS[1]:  # the pinned widest: shrink the others, then depth
            rest = [h for h in spec.hidden if h < top]
            if rest and max(rest) > WIDTHS[0]:
                hidden = tuple(max(WIDTHS[0], h // 2) if h < top else h for h in spec.hidden)
            elif len(spec.hidden) > 1:  # fewer layers, the widest kept
                hidden = spec.hidden[:-1]
            else:
                break
        else:
            hidden = tuple(max(WIDTHS[0], h // 2) if h == top else h for h in spec.hidden)
            if hidden == spec.hidden:
                break
        spec = ModelSpec(**{**asdict(spec), "hidden": hidden})
    return spec


@dataclass(frozen=True)
class Point:
    """One configuration to predict and measure: a model on `p` ranks under a schedule."""

    model: ModelSpec
    p: int
    schedule: str
    m: int
    extra: tuple[str, ...] = ()  # e.g. a searched candidate's split, recompute, memory cap
    label: str = ""

    @property
    def virtual(self) -> int:
        return 2 if self.schedule == "interleaved" else 1

    @property
    def oversubscribed(self) -> bool:
        return self.p > cores()

    def overrides(self) -> list[str]:
        out = [
            *self.model.overrides(),
            f"schedule={self.schedule}",
            f"pipeline.microbatches={self.m}",
        ]
        if self.virtual > 1:
            out.append(f"schedule.virtual_stages={self.virtual}")
        return [*out, *self.extra]

    def key(self) -> str:
        return " ".join([f"p={self.p}", *self.overrides()])

    def describe(self) -> str:
        m = self.model
        return (
            f"{m.name} {m.shape} {'x'.join(map(str, m.dims))} B={m.batch} p={self.p} "
            f"{self.schedule} m={self.m}{' ' + ' '.join(self.extra) if self.extra else ''}"
        )


def defined(schedule: str, p: int, m: int, layers: int) -> bool:
    """The schedule takes (p ranks, m microbatches) and the model has a layer per stage."""
    from splitgraph.schedule import SCHEDULES as REGISTRY

    v = 2 if schedule == "interleaved" else 1
    if layers < p * v:
        return False
    return not REGISTRY[schedule].problems(p, v, m)


#: Points per model at each rank count (p:count): 22 points at seed 17.
PER_MODEL = "2:1,4:1"


def parse_per_model(text: str) -> dict[int, int]:
    """ "2:1,4:1" -> {2: 1, 4: 1}."""
    return {int(k): int(v) for k, v in (x.split(":") for x in text.split(","))}


def grid_points(models: Sequence[ModelSpec], seed: int, per_model: dict[int, int]) -> list[Point]:
    """`per_model[p]` points per model at each p, schedules cycled over the whole grid so each
    appears about equally often, m drawn from MICROBATCHES (1 for naive) among the counts the
    schedule defines at p; a model too shallow for p (or for the schedule) is skipped there."""
    rng = random.Random(seed + 1)
    out: list[Point] = []
    turn = 0
    for model in models:
        for p, count in sorted(per_model.items()):
            if model.layers < p:
                continue
            for _ in range(count):
                for k in range(len(SCHEDULES)):
                    schedule = SCHEDULES[(turn + k) % len(SCHEDULES)]
                    ms = [1] if schedule == "naive" else list(MICROBATCHES)
                    ms = [m for m in ms if defined(schedule, p, m, model.layers)]
                    if ms:
                        out.append(Point(model, p, schedule, rng.choice(ms)))
                        turn += k + 1
                        break
    return out


# -- the prediction (a priori) --------------------------------------------------------------


@dataclass
class Predicted:
    step_s: float
    span_s: float
    fixed_s: float
    bubble: float
    source: str
    bounds: list[int] = field(default_factory=list)
    #: the same step priced with fewer terms (all a priori): which term buys what
    ablations: dict[str, float] = field(default_factory=dict)


def point_config(point: Point, shared: Sequence[str]) -> Any:
    from splitgraph.config import load_config, validate

    cfg = load_config([*point.overrides(), *shared])
    validate(cfg, point.p)
    return cfg


def predict_point(point: Point, shared: Sequence[str], predictor: str) -> Predicted:
    """The step predicted for `point` from the profile, the link, the sizes and (calibrated)
    the machine's calibration: nothing of the run it predicts (it has not run yet)."""
    from splitgraph.config import Workload
    from splitgraph.cost.costs import link_from_config, model_costs
    from splitgraph.partition import make_plan
    from splitgraph.planner.predict import predict

    cfg = point_config(point, shared)
    work = Workload.of(cfg)
    stages = point.p * point.virtual
    link = link_from_config(cfg.pipeline, cfg.costs)
    costs = model_costs(work, stages, link=link)
    plan = make_plan(work, point.p, costs)
    if predictor == "planner":
        pred = predict(plan, costs)
        return Predicted(
            pred.step_time, pred.step_time, 0.0, pred.bubble, "planner", list(plan.bounds)
        )
    from splitgraph.cost.calibrate import (
        Calibration,
        FixedCosts,
        fixed_costs,
        load_calibration,
        priced_step,
    )

    cal = load_calibration(cfg.costs, point.p)
    sched = costs.schedule(stages)
    priced = priced_step(work, costs, plan.bounds, sched, point.p, cal)
    none = FixedCosts(0.0, 0.0)
    b, p = plan.bounds, point.p
    ablations = {
        "profile only (planner)": predict(plan, costs).step_time,
        "+ contention": priced_step(work, costs, b, sched, p, Calibration(p, 0, 0), none).step_s,
        "+ per-action overhead": priced_step(
            work, costs, b, sched, p, Calibration(p, cal.action_s, 0.0), none
        ).step_s,
        "+ weight decay and optimizer": priced_step(
            work, costs, b, sched, p, Calibration(p, cal.action_s, 0.0), fixed_costs(work)
        ).step_s,
        "+ per-step constant and transfers": priced_step(
            work, costs, b, sched, p, replace(cal, compute_factor=1.0), fixed_costs(work)
        ).step_s,
        "+ compute factor (all)": priced.step_s,
    }
    return Predicted(
        priced.step_s,
        priced.span_s,
        priced.fixed_s,
        priced.bubble,
        "calibrated",
        list(plan.bounds),
        ablations,
    )


# -- the measurement ------------------------------------------------------------------------


def steps_for(predicted_s: float) -> int:
    """Steps a launch runs: about STEP_SECONDS of them at the predicted step time, within
    [STEPS, STEPS_MAX]; STEPS where there is no prediction."""
    if not (math.isfinite(predicted_s) and predicted_s > 0):
        return STEPS
    return max(STEPS, min(STEPS_MAX, math.ceil(STEP_SECONDS / predicted_s)))


def measure_point(
    point: Point, shared: Sequence[str], workdir: Path, timeout: float, steps: int = STEPS
) -> dict[str, Any]:
    """One real launch of `steps` steps; {"step_s": median step (the first skipped), or NaN
    and "error" when it failed}."""
    from splitgraph.bench.launch import RunFailed, run_training

    run_dir = workdir / f"run{len(list(workdir.glob('run*'))):04d}"
    t0 = time.monotonic()
    try:
        summary = run_training(
            point.p,
            [*point.overrides(), *shared, *COMMON, f"train.steps={steps}"],
            run_dir,
            timeout=timeout,
        )
        step = float(summary["step_time_median_s"])
        return {"step_s": step, "wall_s": time.monotonic() - t0, "error": None, "steps": steps}
    except RunFailed as e:
        tail = e.tail.strip().splitlines()
        return {
            "step_s": float("nan"),
            "wall_s": time.monotonic() - t0,
            "error": f"exit {e.code}: {tail[-1] if tail else ''}",
        }
    except Exception as e:  # a deadline (TimeoutExpired), a missing summary: recorded, go on
        return {
            "step_s": float("nan"),
            "wall_s": time.monotonic() - t0,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        }


# -- statistics -----------------------------------------------------------------------------


def rel_error(measured: float, predicted: float) -> float:
    """measured / predicted - 1; NaN where either is missing or the prediction is not > 0."""
    if not (math.isfinite(measured) and math.isfinite(predicted)) or predicted <= 0:
        return float("nan")
    return measured / predicted - 1.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def error_stats(errors: Sequence[float]) -> dict[str, Any]:
    """median and p90 of |error| over the finite errors; a failed point (NaN) is counted as
    failed, never as zero error."""
    finite = [abs(e) for e in errors if math.isfinite(e)]
    return {
        "points": len(errors),
        "measured": len(finite),
        "failed": len(errors) - len(finite),
        "median_abs": percentile(finite, 0.5),
        "p90_abs": percentile(finite, 0.9),
        "max_abs": max(finite) if finite else float("nan"),
        "median_signed": percentile([e for e in errors if math.isfinite(e)], 0.5),
    }


def noise_floor(steps: Sequence[float]) -> float:
    """Spread of one configuration launched several times: max/min - 1 (NaN if < 2 ran)."""
    ok = [s for s in steps if math.isfinite(s) and s > 0]
    if len(ok) < 2:
        return float("nan")
    return max(ok) / min(ok) - 1.0


# -- the run --------------------------------------------------------------------------------


def prepare(out: Path | None) -> list[str]:
    """The shared cache (`<out>/cache`: layer profiles, calibration, link; not committed, so a
    fresh clone measures its own machine) and the link, measured once (1 thread, as the ranks
    run): every prediction and every launch reads the same numbers."""
    import torch

    from splitgraph.config import load_config
    from splitgraph.cost.costs import link_from_config

    torch.set_num_threads(1)
    cache = [f"costs.cache_dir={out / 'cache'}"] if out is not None else []
    base = load_config(cache)
    link = link_from_config(base.pipeline, base.costs)
    return [
        *cache,
        f"pipeline.bandwidth={link.bandwidth:.0f}",
        f"pipeline.latency={link.latency:.3g}",
    ]


def run_points(
    points: Sequence[Point],
    shared: Sequence[str],
    predictor: str,
    workdir: Path,
    timeout: float,
    tag: str,
    measure: Callable[..., dict[str, Any]] = measure_point,
    deadline: float = math.inf,
    memo: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Predict each point (recorded first), then launch it; print progress. Past `deadline`
    (time.monotonic()) a point is predicted but not launched: recorded as skipped. `memo`
    (the searches): a configuration already measured in this run, differing at most by the
    memory cap (an accounting on CPU: the same work), is read from it, marked "reused"."""
    rows = []
    for i, pt in enumerate(points):
        t0 = time.monotonic()
        try:
            pred = predict_point(pt, shared, predictor)
            prediction: dict[str, Any] = asdict(pred)
            perr = None
        except Exception as e:  # an invalid point: recorded, not launched
            prediction, perr = {"step_s": float("nan")}, f"{type(e).__name__}: {e}"
        row: dict[str, Any] = {
            "point": pt.describe(),
            "model": pt.model.name,
            "shape": pt.model.shape,
            "p": pt.p,
            "schedule": pt.schedule,
            "m": pt.m,
            "extra": list(pt.extra),
            "oversubscribed": pt.oversubscribed,
            "predicted": prediction,
            "predicted_at": time.time(),
            "predict_s": time.monotonic() - t0,
        }
        if perr is None and time.monotonic() > deadline:
            got = {"step_s": float("nan"), "wall_s": 0.0, "error": "skipped: past --budget"}
        elif perr is None and memo is not None and same_work(pt) in memo:
            got = {**memo[same_work(pt)], "wall_s": 0.0, "reused": True}
        elif perr is None:
            got = measure(pt, shared, workdir, timeout, steps_for(prediction["step_s"]))
            if memo is not None and math.isfinite(got["step_s"]):
                memo[same_work(pt)] = got
        else:
            got = {"step_s": float("nan"), "wall_s": 0.0, "error": perr}
        row["measured_step_s"] = got["step_s"]
        row["launch_s"] = got["wall_s"]
        row["steps"] = got.get("steps")
        row["error"] = got["error"]
        row["reused"] = bool(got.get("reused"))
        row["rel_error"] = rel_error(got["step_s"], prediction["step_s"])
        rows.append(row)
        e = row["rel_error"]
        print(
            f"[{tag} {i + 1}/{len(points)}] {pt.describe()}: predicted "
            f"{prediction['step_s'] * 1e3:.2f} ms, measured {got['step_s'] * 1e3:.2f} ms "
            f"({'FAILED ' + str(got['error']) if not math.isfinite(e) else f'{e:+.1%}'}) "
            f"[{got['wall_s']:.0f} s, load {_load()}]",
            flush=True,
        )
    return rows


#: The calibration model: layers so small that a step is nearly all overhead, at the
#: schedules and microbatch counts that vary how many actions a step has.
CAL_MODEL = ModelSpec("calibration", 32, (32,) * 7, 10, 64, "balanced")
CAL_POINTS = (("naive", 1), ("1f1b", 4), ("gpipe", 16), ("zb1", 8), ("interleaved", 8))
#: The compute-bound calibration model (not a grid model): its layers are most of a step,
#: so its launches measure how much longer they take inside a step than in the profile.
CAL_HEAVY = ModelSpec("calibration-heavy", 128, (512,) * 4, 10, 256, "balanced")
CAL_HEAVY_POINTS = (("naive", 1), ("1f1b", 4))


def ensure_calibration(
    shared: Sequence[str],
    p: int,
    workdir: Path,
    timeout: float,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> Any:
    """The machine's calibration for `p` ranks (cost/calibrate.py), measured if not cached:
    the calibration model launched at CAL_POINTS; per-action overhead and the per-step
    constant fitted to those launches (never to a grid point)."""
    from splitgraph.config import Workload, load_config
    from splitgraph.cost.calibrate import (
        Calibration,
        fit_calibration,
        fixed_costs,
        has_calibration,
        load_calibration,
        store_calibration,
    )

    cfg0 = load_config([*CAL_MODEL.overrides(), *shared])
    work0 = Workload.of(cfg0)
    if has_calibration(cfg0.costs, p) and not force:
        cal = load_calibration(cfg0.costs, p)
        log(f"calibration p={p} (cached): {cal}")
        return cal
    points = [
        Point(model, p, s, m)
        for model, pts in ((CAL_MODEL, CAL_POINTS), (CAL_HEAVY, CAL_HEAVY_POINTS))
        for s, m in pts
        if defined(s, p, m, model.layers)
    ]
    load = _load()
    measured, priced = _calibration_launches(points, shared, p, workdir, timeout, log)
    light, heavy = priced[CAL_MODEL.name], priced[CAL_HEAVY.name]
    if len(light) < 2 or not heavy:
        raise RuntimeError(
            f"calibration for p={p}: {len(light)} launches of the overhead model and "
            f"{len(heavy)} of the compute-bound one ran (need 2 and 1)"
        )

    o, t, c, rms, k, krms, g = fit_calibration(
        _spans(light, p),
        [f for *_, f, _ in light],
        measured[CAL_MODEL.name],
        _spans(heavy, p),
        [f for *_, f, _ in heavy],
        measured[CAL_HEAVY.name],
        crowded=p > cores(),
    )
    fixed_costs(work0)  # measured now too, so grid predictions only read the cache
    cal = Calibration(
        p,
        o,
        c,
        f"fitted to {len(light)} launches of the calibration model "
        f"{'x'.join(map(str, CAL_MODEL.dims))} B={CAL_MODEL.batch} (rms {rms:.1%}) and "
        f"{len(heavy)} of {'x'.join(map(str, CAL_HEAVY.dims))} B={CAL_HEAVY.batch} "
        f"(rms {krms:.1%}), {time.strftime('%Y-%m-%d %H:%M')}, load {load}",
        transfer_s=t,
        compute_factor=k,
        crowding=g,
    )
    store_calibration(cfg0.costs, cal)
    log(
        f"calibration p={p}: action {o * 1e6:.0f} us, transfers {t * 1e6:.0f} us, step "
        f"{c * 1e6:.0f} us (rms {rms:.1%}); compute factor {k:.2f} (rms {krms:.1%}), crowding "
        f"{g:.2f}"
    )
    return cal


def _calibration_launches(
    points: Sequence[Point],
    shared: Sequence[str],
    p: int,
    workdir: Path,
    timeout: float,
    log: Callable[[str], None],
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Launch each calibration point: its measured step and what the fit prices it with
    (costs in the run's conditions, bounds, schedule, fixed costs, zb's I/W split)."""
    from splitgraph.config import Workload
    from splitgraph.cost.calibrate import Calibration, in_conditions, priced_step, split_times
    from splitgraph.cost.costs import link_from_config, model_costs
    from splitgraph.partition import make_plan

    measured: dict[str, list[float]] = {CAL_MODEL.name: [], CAL_HEAVY.name: []}
    priced: dict[str, list[Any]] = {CAL_MODEL.name: [], CAL_HEAVY.name: []}
    for pt in points:
        cfg = point_config(pt, shared)
        work = Workload.of(cfg)
        costs = model_costs(work, p * pt.virtual, link=link_from_config(cfg.pipeline, cfg.costs))
        plan = make_plan(work, p, costs)
        mc = in_conditions(work, costs, p)
        sched = costs.schedule(p * pt.virtual)
        bare = priced_step(work, costs, plan.bounds, sched, p, Calibration(p, 0, 0))
        got = measure_point(pt, shared, workdir, timeout, steps_for(bare.step_s))
        log(
            f"[calibration p={p}] {pt.describe()}: {got['step_s'] * 1e3:.2f} ms "
            f"{got['error'] or ''} [{got['wall_s']:.0f} s, load {_load()}]"
        )
        if math.isfinite(got["step_s"]):
            fixed = bare.fixed_s
            measured[pt.model.name].append(got["step_s"])
            split = split_times(work, mc, p) if sched.split_backward else None
            priced[pt.model.name].append((mc, plan.bounds, sched, fixed, split))
    return measured, priced


def _spans(rows: list[Any], p: int) -> Callable[[float, float, float, float], list[float]]:
    """The fit's model of each calibration launch's span, given overhead, transfer, factor
    and crowding."""
    from splitgraph.cost.calibrate import sim_with_overhead, span

    def of(o: float, t: float, k: float, g: float) -> list[float]:
        return [span(s, sim_with_overhead(mc, b, o, t, sp, k), p, g)[0] for mc, b, s, _, sp in rows]

    return of


def same_work(pt: Point) -> str:
    """A point's configuration less its memory cap (on CPU the cap is an accounting)."""
    return " ".join(x for x in pt.key().split(" ") if not x.startswith("pipeline.memory_cap="))


def search_candidates(
    model: ModelSpec, p: int, cap: str | None, shared: Sequence[str], predictor: str, top: int
) -> list[tuple[Point, float]]:
    """planner.search's ranking (calibrated: `search(price=calibrate.pricer(...))`), its first
    `top` candidates that fit, as points that pin the split (partition=manual) and the
    recomputation."""
    from splitgraph.config import Workload, load_config
    from splitgraph.cost.costs import link_from_config
    from splitgraph.planner.search import search

    base = [*model.overrides(), *shared]
    if cap is not None:
        base.append(f"pipeline.memory_cap={cap}")
    cfg = load_config(base)
    work = Workload.of(cfg)
    price = None
    if predictor == "calibrated":
        from splitgraph.cost.calibrate import pricer

        price = pricer(work, p)
    ranked = search(work, p, link_from_config(cfg.pipeline, cfg.costs), price=price)
    seen: set[str] = set()
    out: list[tuple[Point, float]] = []
    for c in ranked:
        if c.prediction is None or not c.fits:
            continue
        bounds = c.prediction.plan.bounds
        extra = ["partition=manual", f"partition.boundaries=[{','.join(map(str, bounds[1:-1]))}]"]
        if c.recompute:
            extra.append("schedule.recompute=true")
        if cap is not None:
            extra.append(f"pipeline.memory_cap={cap}")
        pt = Point(model, p, c.schedule, c.microbatches, tuple(extra))
        if pt.key() in seen:
            continue
        seen.add(pt.key())
        out.append((pt, c.step_s))
    out.sort(key=lambda t: t[1])
    return out[:top]


def search_cap(model: ModelSpec, p: int, shared: Sequence[str]) -> str:
    """A cap that rules out the hungrier half of the candidates: the median peak memory of
    the searched candidates (computed from the model's sizes, before any run)."""
    from splitgraph.config import Workload, load_config
    from splitgraph.cost.costs import link_from_config
    from splitgraph.planner.search import search

    cfg = load_config([*model.overrides(), *shared])
    peaks = [
        c.prediction.peak_memory
        for c in search(Workload.of(cfg), p, link_from_config(cfg.pipeline, cfg.costs))
        if c.prediction
    ]
    return str(int(statistics.median(peaks)))


def judge_search(steps: Sequence[float], noise: float) -> dict[str, Any]:
    """The pick is candidate 0 (the predicted best). Hit: its measured step is the measured
    best, or within `noise` of it. Regret: measured pick / measured best."""
    finite = [s for s in steps if math.isfinite(s)]
    if not finite or not math.isfinite(steps[0]):
        return {"hit": False, "best": None, "regret": float("nan"), "exact": False}
    best = min(finite)
    regret = steps[0] / best
    tol = noise if math.isfinite(noise) else 0.0
    return {
        "hit": bool(regret <= 1.0 + tol),
        "exact": steps[0] == best,
        "best": steps.index(best),
        "regret": regret,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m splitgraph.bench.predict",
        description="The planner's a-priori step time against real launches, on a "
        "seeded grid of held-out models; the noise floor; the search judged by measurement.",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/prediction"),
        help="where results.json, table.md and scatter.png go (outputs/prediction; "
        "results/prediction only when given explicitly)",
    )
    ap.add_argument("--seed", type=int, default=17, help="the grid's seed (17)")
    ap.add_argument("--models", type=int, default=12, help="held-out models (12)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke grid: 2 tiny models, p=2, one search, noise from 2 launches",
    )
    ap.add_argument(
        "--predictor",
        choices=("calibrated", "planner"),
        default="calibrated",
        help="calibrated: cost/calibrate.py (default); planner: the profile-only "
        "prediction splitgraph-plan printed before issue 17",
    )
    ap.add_argument(
        "--per-model",
        default=PER_MODEL,
        help="points per model at each rank count, p:count,... (2:1,4:1: 22 points at seed 17)",
    )
    ap.add_argument("--noise", type=int, default=3, help="launches of the noise configuration")
    ap.add_argument("--searches", type=int, default=8, help="searches judged (8; half capped)")
    ap.add_argument("--top", type=int, default=5, help="candidates measured per search (5)")
    ap.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole run: points not yet launched by then are predicted and "
        "recorded as skipped (counted as failed), so the command ends on time (default: none)",
    )
    ap.add_argument(
        "--search-share",
        type=float,
        default=0.4,
        help="with --budget: the share of it kept for the searches (0.4); the grid and the "
        "noise stop launching before it, and each search gets an equal slice of what is left",
    )
    ap.add_argument(
        "--filter",
        help="only the grid points whose description matches this regular expression "
        "(e.g. 'p=4', 'zb1', 'm0[0-3] '): a subset while developing; table.md shows it",
    )
    ap.add_argument(
        "--recalibrate",
        action="store_true",
        help="measure the machine's calibration again even if <out>/cache has one",
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline per launch, seconds")
    ap.add_argument(
        "--calibrate-only",
        action="store_true",
        help="measure this machine's calibration for 2 and 4 ranks into the user's cache "
        "(costs.cache_dir, $SPLITGRAPH_CACHE or ~/.cache/splitgraph: where splitgraph-plan "
        "reads it) and stop",
    )
    ns = ap.parse_args(argv)
    if ns.calibrate_only:
        workdir = Path(tempfile.mkdtemp(prefix="splitgraph-calibrate-"))
        shared = [o for o in prepare(None) if not o.startswith("pipeline.")]
        for p in (2, 4):
            ensure_calibration(shared, p, workdir, ns.timeout, print, ns.recalibrate)
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    return run(ns)


def budget_deadlines(
    started: float, budget: float | None, share: float, searches: int
) -> tuple[float, float]:
    """(when the grid and the noise stop launching, when everything stops): the searches
    keep `share` of the budget for themselves, so a long grid cannot crowd them out."""
    if not budget:
        return math.inf, math.inf
    end = started + budget
    return (end - budget * share if searches else end), end


def search_slice(now: float, end: float, left: int) -> float:
    """Until when the next of `left` searches may launch: an equal slice of what is left,
    so a slow search cannot starve the ones after it."""
    if not math.isfinite(end):
        return math.inf
    return now + max(end - now, 0.0) / max(left, 1)


def _quick_models() -> list[ModelSpec]:
    return [
        ModelSpec("q0", 32, (64, 64, 64), 10, 64, "balanced"),
        ModelSpec("q1", 32, (32, 256, 32), 10, 128, "unbalanced"),
    ]


def run(ns: argparse.Namespace) -> int:
    from splitgraph.bench.launch import machine

    out: Path = ns.out
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="splitgraph-predict-"))  # run dirs: not kept
    started = time.monotonic()
    load_before = _load()
    print(f"machine: {machine()}; load {load_before}", flush=True)
    shared = prepare(out)
    calibrations = {}
    if ns.predictor == "calibrated":
        for p in (2,) if ns.quick else (2, 4):
            cal = ensure_calibration(shared, p, workdir, ns.timeout, print, ns.recalibrate)
            calibrations[str(p)] = cal.to_dict()
    if ns.quick:
        models = _quick_models()
        points = grid_points(models, ns.seed, {2: 1})
        noise_point, noise_n, n_search = points[0], 2, min(ns.searches, 1)
    else:
        models = grid_models(ns.seed, ns.models)
        points = grid_points(models, ns.seed, parse_per_model(ns.per_model))
        noise_point, noise_n, n_search = points[1], ns.noise, ns.searches
    print(f"grid: {len(models)} models, {len(points)} points", flush=True)
    for m in models:
        print(f"  {m.name} {m.shape}: {'x'.join(map(str, m.dims))}, batch {m.batch}", flush=True)

    deadline, end = budget_deadlines(started, ns.budget, ns.search_share, n_search)
    if ns.filter:
        points = [pt for pt in points if re.search(ns.filter, pt.describe())]
        print(f"--filter {ns.filter!r}: {len(points)} points", flush=True)
    phases = {"setup and calibration": time.monotonic() - started}
    noise_rows = run_points(
        [noise_point] * noise_n,
        shared,
        ns.predictor,
        workdir,
        ns.timeout,
        "noise",
        deadline=deadline,
    )
    noise = noise_floor([r["measured_step_s"] for r in noise_rows])
    print(f"noise floor: {noise:.1%}", flush=True)
    phases["noise"] = time.monotonic() - started - sum(phases.values())
    rows = run_points(points, shared, ns.predictor, workdir, ns.timeout, "grid", deadline=deadline)
    phases["grid"] = time.monotonic() - started - sum(phases.values())

    searches = run_searches(models, shared, ns, workdir, noise, end, n_search)
    result = summarize(rows, noise_rows, noise, searches, ns, load_before, started)
    result["calibration"] = calibrations
    phases["searches"] = time.monotonic() - started - sum(phases.values())
    result["phases_s"] = phases
    shutil.rmtree(workdir, ignore_errors=True)
    write(out, result)
    print(table(result), flush=True)
    print(
        f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'scatter.png'} in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    return 0


def run_searches(
    models: Sequence[Any],
    shared: Sequence[str],
    ns: argparse.Namespace,
    workdir: Path,
    noise: float,
    end: float,
    n_search: int,
) -> list[dict[str, Any]]:
    """The searches judged by measurement: each launches its top candidates within its own
    slice of the budget (ending at `end`), and a hit is a pick within `noise` of the best."""
    searches = []
    memo: dict[str, dict[str, Any]] = {}
    pool = [m for m in (models if ns.quick else models[2:]) if m.layers >= 3][: (n_search + 1) // 2]
    for k in range(n_search):
        slice_end = search_slice(time.monotonic(), end, n_search - k)
        model = pool[(k // 2) % len(pool)] if pool else models[0]
        cap = search_cap(model, 2, shared) if k % 2 else None
        cands = search_candidates(model, 2, cap, shared, ns.predictor, ns.top)
        srows = run_points(
            [c for c, _ in cands],
            shared,
            ns.predictor,
            workdir,
            ns.timeout,
            f"search {k + 1}/{n_search}",
            deadline=slice_end,
            memo=memo,
        )
        verdict = judge_search([r["measured_step_s"] for r in srows], noise)
        searches.append({"model": model.name, "cap_bytes": cap, "candidates": srows, **verdict})
        print(
            f"search {k + 1}: pick {'HIT' if verdict['hit'] else 'MISS'}, regret "
            f"{verdict['regret']:.3f}",
            flush=True,
        )
    return searches


def summarize(
    rows: list[dict[str, Any]],
    noise_rows: list[dict[str, Any]],
    noise: float,
    searches: list[dict[str, Any]],
    ns: argparse.Namespace,
    load_before: str,
    started: float,
) -> dict[str, Any]:
    from splitgraph.bench.launch import machine

    by_schedule = {
        s: error_stats([r["rel_error"] for r in rows if r["schedule"] == s]) for s in SCHEDULES
    }
    by_p = {
        str(p): error_stats([r["rel_error"] for r in rows if r["p"] == p])
        for p in sorted({r["p"] for r in rows})
    }
    names = list(rows[0]["predicted"].get("ablations", {})) if rows else []
    ablations = {
        name: error_stats(
            [
                rel_error(
                    r["measured_step_s"], r["predicted"].get("ablations", {}).get(name, math.nan)
                )
                for r in rows
            ]
        )
        for name in names
    }
    finite = [r for r in rows if math.isfinite(r["rel_error"])]
    worst = sorted(finite, key=lambda r: -abs(r["rel_error"]))[:5]
    hits = sum(1 for s in searches if s["hit"])
    regrets = [s["regret"] for s in searches if math.isfinite(s["regret"])]
    return {
        "command": "python -m splitgraph.bench.predict " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "cores": cores(),
        "load_before": load_before,
        "load_after": _load(),
        "wall_s": time.monotonic() - started,
        "seed": ns.seed,
        "predictor": ns.predictor,
        "noise_floor": noise,
        "noise_runs": noise_rows,
        "overall": error_stats([r["rel_error"] for r in rows]),
        "within_noise": sum(1 for r in finite if abs(r["rel_error"]) <= noise),
        "by_schedule": by_schedule,
        "by_p": by_p,
        "ablations": ablations,
        "worst": [
            {"point": r["point"], "rel_error": r["rel_error"], "why": why(r, noise)} for r in worst
        ],
        "rows": rows,
        "searches": searches,
        "search_hits": hits,
        "search_regret_median": percentile(regrets, 0.5),
        "search_regret_max": max(regrets) if regrets else float("nan"),
    }


def why(row: dict[str, Any], noise: float) -> str:
    """A reading of a large error from what the row holds."""
    parts = []
    e = row["rel_error"]
    if abs(e) <= noise:
        parts.append(f"within the noise floor ({noise:.0%})")
    if row["oversubscribed"]:
        parts.append(
            f"{row['p']} ranks on {cores()} cores: time-shared, the simulator's "
            "ranks run in parallel"
        )
    pred = row["predicted"]
    if pred.get("fixed_s") and pred.get("step_s") and pred["fixed_s"] > 0.3 * pred["step_s"]:
        parts.append(f"fixed costs are {pred['fixed_s'] / pred['step_s']:.0%} of the prediction")
    if pred.get("step_s", 1.0) < 0.01:
        parts.append("a step under 10 ms: per-action overhead dominates")
    if pred.get("bubble", 0.0) > 0.4:
        parts.append(f"bubble {pred['bubble']:.0%}: waits dominate")
    if row["m"] >= 12:
        parts.append(f"m={row['m']}: many small microbatches")
    if not parts:
        parts.append("compute-bound; the layer profile is " + ("short" if e > 0 else "long"))
    return "; ".join(parts)


def load_warning(load: str) -> str:
    """A line for a run that started while other jobs held the cores (1-minute load > 1)."""
    first = float(load.split()[0])
    if first <= 1.0:
        return ""
    return (
        f"PRELIMINARY: the 1-minute load was {first:.1f} on {cores()} cores when this run "
        "started (other jobs shared the machine); rerun on an idle machine for numbers to quote."
    )


def _fmt(x: float, pct: bool = True) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.1%}" if pct else f"{x:.2f}"


def table(result: dict[str, Any]) -> str:
    o = result["overall"]
    lines = [
        "# The a-priori step prediction against real runs",
        "",
        f"    {result['command']}",
        "",
        *([f"**{busy}**", ""] if (busy := load_warning(result["load_before"])) else []),
        f"Machine: {result['machine']}; load before {result['load_before']}, after "
        f"{result['load_after']}; {result['wall_s']:.0f} s; predictor {result['predictor']}; "
        f"seed {result['seed']}."
        + (
            " Wall time by phase: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in result["phases_s"].items())
            + "."
            if result.get("phases_s")
            else ""
        ),
        "",
        f"Noise floor (one configuration, {len(result['noise_runs'])} launches, max/min - 1): "
        f"{_fmt(result['noise_floor'])}.",
        "",
        "| | points | measured | failed | median abs(measured/predicted - 1) | p90 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| all | {o['points']} | {o['measured']} | {o['failed']} | {_fmt(o['median_abs'])} | "
        f"{_fmt(o['p90_abs'])} | {_fmt(o['max_abs'])} |",
    ]
    for name, st in [
        *result["by_schedule"].items(),
        *((f"p={p}", st) for p, st in result["by_p"].items()),
    ]:
        lines.append(
            f"| {name} | {st['points']} | {st['measured']} | {st['failed']} | "
            f"{_fmt(st['median_abs'])} | {_fmt(st['p90_abs'])} | {_fmt(st['max_abs'])} |"
        )
    if result.get("ablations"):
        lines += [
            "",
            "The same points, the prediction built up term by term (every column a priori):",
            "",
            "| prediction | median abs error | p90 | median signed |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, st in result["ablations"].items():
            lines.append(
                f"| {name} | {_fmt(st['median_abs'])} | {_fmt(st['p90_abs'])} | "
                f"{_fmt(st.get('median_signed', math.nan))} |"
            )
    lines += [
        "",
        f"Within the noise floor: {result['within_noise']} of {o['measured']}.",
        "",
        "Worst five:",
        "",
    ]
    lines += [f"- {w['point']}: {w['rel_error']:+.1%}: {w['why']}" for w in result["worst"]]
    lines += [
        "",
        "| point | oversubscribed | predicted ms | measured ms | error |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        failed = f"FAILED: {r['error']}"
        lines.append(
            f"| {r['point']} | {'yes' if r['oversubscribed'] else ''} | "
            f"{r['predicted']['step_s'] * 1e3:.2f} | {r['measured_step_s'] * 1e3:.2f} | "
            f"{_fmt(r['rel_error']) if math.isfinite(r['rel_error']) else failed} |"
        )
    return "\n".join(lines + _search_lines(result)) + "\n"


def _search_lines(result: dict[str, Any]) -> list[str]:
    """The searches' part of table.md: hits, regret, one row per search."""
    lines = [
        "",
        f"Searches: the pick within the noise floor of the measured best in "
        f"{result['search_hits']} of {len(result['searches'])}; regret median "
        f"{_fmt(result['search_regret_median'], False)}, max "
        f"{_fmt(result['search_regret_max'], False)}.",
        "",
        "| search | model | cap bytes | candidates measured | pick, measured ms | "
        "best, measured ms (#) | regret | hit |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for k, s in enumerate(result["searches"], 1):
        steps = [c["measured_step_s"] for c in s["candidates"]]
        best = s["best"]
        ran = sum(1 for x in steps if math.isfinite(x))
        lines.append(
            f"| {k} | {s['model']} | {s['cap_bytes'] or '-'} | {ran} of {len(steps)} | "
            f"{steps[0] * 1e3 if steps else float('nan'):.2f} | "
            f"{steps[best] * 1e3 if best is not None else float('nan'):.2f} "
            f"(#{(best or 0) + 1}) | {_fmt(s['regret'], False)} | {'yes' if s['hit'] else 'no'} |"
        )
    return lines


def write(out: Path, result: dict[str, Any]) -> None:
    """results.json, table.md, scatter.png; each written whole (tmp + rename)."""

    def atomic(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    atomic(out / "results.json", json.dumps(result, indent=1, default=str) + "\n")
    atomic(out / "table.md", table(result))
    scatter(result, out / "scatter.png")


def scatter(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    pts = [r for r in result["rows"] if math.isfinite(r["rel_error"])]
    for i, s in enumerate(SCHEDULES):
        for over, marker in ((False, "o"), (True, "^")):
            sel = [r for r in pts if r["schedule"] == s and r["oversubscribed"] == over]
            if sel:
                ax.scatter(
                    [r["predicted"]["step_s"] * 1e3 for r in sel],
                    [r["measured_step_s"] * 1e3 for r in sel],
                    marker=marker,
                    color=f"C{i}",
                    label=f"{s}{' (p > cores)' if over else ''}",
                    alpha=0.8,
                )
    if pts:
        lo = min(min(r["predicted"]["step_s"], r["measured_step_s"]) for r in pts) * 1e3 * 0.8
        hi = max(max(r["predicted"]["step_s"], r["measured_step_s"]) for r in pts) * 1e3 * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
        ax.fill_between(
            [lo, hi],
            [lo * 0.85, hi * 0.85],
            [lo * 1.15, hi * 1.15],
            color="grey",
            alpha=0.15,
            label="+-15%",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("predicted step, ms (before the run)")
    ax.set_ylabel("measured median step, ms")
    o = result["overall"]
    ax.set_title(
        f"{'PRELIMINARY (loaded machine): ' if load_warning(result['load_before']) else ''}"
        f"median |error| {_fmt(o['median_abs'])}, p90 {_fmt(o['p90_abs'])}\n"
        f"load before {result['load_before']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
