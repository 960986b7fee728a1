"""The step priced in the conditions of the run: what the layer profile alone leaves out.

The profile (profiler.py) times each layer alone, on an idle machine. A run's step is longer:

    step = span of the schedule, simulated with
             F, B   the layer times profiled while `busy` processes run the same layers at
                    once (busy = min(ranks, cores): the other ranks compete for memory
                    bandwidth and caches), at the run's microbatch rows and thread count,
             I, W   zero bubble's halves of B, profiled the same way as the executor runs
                    them (WeightGradStore: input gradient, then dJ/dW = dz^T x),
             + o    per compute action (dispatch, the saved-tensor meter, the guard's
                    extremes, Python) - every F, B, I and W pays it,
             comm   the link (latency + bytes / bandwidth), as before,
             + t    per group of transfers a rank posts (the simulator's `post`)
         + max over ranks of the fixed costs:
             c                              per step: the step sum's collective, zeroing,
                                            the loop (measured: fitted, see below)
             + a * parameters + t * tensors the weight-decay term and its gradient, and the
                                            optimizer step, timed on stand-in modules of
                                            two sizes and fitted (microbenchmark)
    where ranks > cores, the span and the fixed costs are simulated with the ranks taking
    turns on the cores (processor sharing, cost/timeshare.py): each of n busy ranks runs
    at min(1, cores / n) of its speed.

and every compute action's layer times are multiplied by `k`, the compute factor: how much
longer layers take inside a training step than in the profile's loop.

`o`, `t` and `c` are fitted once per machine and rank count from launches of a *calibration
model* (tiny layers: the step is nearly all overhead), `k` from a compute-bound one, never
from the run being predicted;
bench/predict.py measures them (`ensure_calibration`) and stores them here. Everything is
cached beside the layer profile (profiler.py's cache), keyed by the machine.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from splitgraph.config import CostsConfig, Workload
from splitgraph.cost.costs import ModelCosts
from splitgraph.cost.profiler import _Cache, _layer_key, cache_dir, device_name, time_layer
from splitgraph.cost.timeshare import shared_tail, simulate_shared
from splitgraph.schedule import Costs, Schedule, simulate
from splitgraph.schedule.simulate import idle_share

log = logging.getLogger("splitgraph")

#: Bumped when what a calibration means changes: older entries are measured again.
VERSION = 4


def cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Calibration:
    """Per-machine, per-rank-count terms the profile does not hold (seconds)."""

    ranks: int
    action_s: float  # per compute action
    step_s: float  # per step, beside weight decay and the optimizer
    source: str = ""  # how and when it was measured
    transfer_s: float = 0.0  # per group of transfers posted (and waited on)
    #: the layers' time inside a training step over their profiled time (a compute-bound
    #: calibration model's launches): caches and memory shared with the rest of the step
    compute_factor: float = 1.0
    #: where ranks exceed cores: how much slower each rank's work runs while the cores are
    #: oversubscribed, beyond taking turns (cost/timeshare.py); 1 where ranks <= cores
    crowding: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FixedCosts:
    """Weight decay + optimizer per step: `per_param_s * params + per_tensor_s * tensors`."""

    per_param_s: float
    per_tensor_s: float

    def time(self, params: int, tensors: int) -> float:
        return max(self.per_param_s * params + self.per_tensor_s * tensors, 0.0)


def _machine(device: torch.device | str = "cpu") -> str:
    return device_name(torch.device(device))


def _cal_key(ranks: int) -> str:
    return f"calibration|v{VERSION}|{_machine()}|ranks={ranks}"


def load_calibration(costs: CostsConfig, ranks: int) -> Calibration:
    """The stored calibration for `ranks` on this machine; a clear error if there is none."""
    with _Cache(cache_dir(costs)).locked() as data:
        got = data.get(_cal_key(ranks))
    if got is None:
        raise LookupError(
            f"no calibration for {ranks} ranks on this machine in {cache_dir(costs)}: "
            "run `python -m splitgraph.bench.predict --calibrate-only` (or costs.times=flops)"
        )
    return Calibration(**got)


def store_calibration(costs: CostsConfig, cal: Calibration) -> None:
    with _Cache(cache_dir(costs)).locked() as data:
        data[_cal_key(cal.ranks)] = cal.to_dict()


def has_calibration(costs: CostsConfig, ranks: int) -> bool:
    with _Cache(cache_dir(costs)).locked() as data:
        return _cal_key(ranks) in data


# -- layer times under contention -----------------------------------------------------------


def _busy_worker(
    rank: int, world: int, work: Workload, n: int, dtype: str, indices: list[int]
) -> Any:
    """Every rank times the same layers in the same order, so each runs while the others do."""
    dt = getattr(torch, dtype)
    out = _in_step(
        indices, lambda i: time_layer(work.model, work.costs, i, n, dt, torch.device("cpu"))
    )
    return out if rank == 0 else None


def _in_step(indices: list[int], time_one: Any) -> dict[int, Any]:
    """`time_one(i)` for each layer, every rank starting each one together (a barrier)."""
    import torch.distributed as dist

    out = {}
    for i in indices:
        dist.barrier()
        out[i] = time_one(i)
    return out


def busy_profile(
    work: Workload, n: int, dtype: torch.dtype, busy: int, timeout: float = 600.0
) -> list[tuple[float, float]]:
    """(forward, backward) seconds per layer at `n` rows, timed while `busy` processes (this
    one included) run the same layers at once; cached per layer and `busy`. busy=1: the
    plain profile."""
    from splitgraph.cost.profiler import profile_layers

    if busy <= 1:
        return profile_layers(work.model, work.costs, n, dtype, torch.device("cpu"))
    dims = [work.model.in_features, *work.model.hidden, work.model.out_features]
    keys = [
        _layer_key(work.model, i, n, dtype, torch.device("cpu")) + f"|busy={busy}"
        for i in range(len(dims) - 1)
    ]
    suffix = "_min" if work.costs.statistic == "min" else ""
    with _Cache(cache_dir(work.costs)).locked() as data:
        missing = [i for i, k in enumerate(keys) if k not in data]
    if missing:
        from splitgraph.spawn import run_ranks

        got = run_ranks(
            _busy_worker,
            busy,
            work,
            n,
            str(dtype).removeprefix("torch."),
            missing,
            timeout=timeout,
        )[0]
        with _Cache(cache_dir(work.costs)).locked() as data:
            for i in missing:
                data[keys[i]] = got[i]
    with _Cache(cache_dir(work.costs)).locked() as data:
        return [
            (float(data[k][f"forward{suffix}"]), float(data[k][f"backward{suffix}"])) for k in keys
        ]


def time_split(
    model: Any, costs: CostsConfig, index: int, n: int, dtype: torch.dtype
) -> dict[str, float]:
    """Median seconds of layer `index`'s backward cut in two, as the executor runs a
    zero-bubble stage: the forward by hand into a `WeightGradStore`, then its I (input
    gradient, every dz kept) and its W (dJ/dW = dz^T x). The profile's B does not say how
    the two halves split, nor what the cut costs on its own (`python -m splitgraph.bench.split`
    times both paths against B)."""
    from splitgraph.config import Task
    from splitgraph.model import WeightGradStore, build_mlp, loss_sum

    module = build_mlp(model, index, index + 1, dtype, torch.device("cpu"))
    last, task = module.is_last, Task(model.task)
    gen = torch.Generator().manual_seed(index)
    x = torch.randn(n, module.in_features, generator=gen).to(dtype=dtype)
    x.requires_grad_(index > 0)
    out_f = module.out_features
    if last and task == Task.classification:
        target = torch.randint(0, out_f, (n,), generator=gen)
    else:
        target = torch.randn(n, out_f, generator=gen).to(dtype=dtype)
    grad = None if last else torch.randn(n, out_f, generator=gen).to(dtype=dtype)
    i_s, w_s = [], []
    for r in range(costs.warmup + costs.repeats):
        for p in module.parameters():
            p.grad = None
        store = WeightGradStore()
        out = store.forward(module, x)  # by hand, as the executor's split stages run
        if last:
            out = loss_sum(out, target, task) / n
        t0 = time.perf_counter()
        store.input_grad(out, grad, x if index > 0 else None)
        t1 = time.perf_counter()
        store.run()
        t2 = time.perf_counter()
        if r >= costs.warmup:
            i_s.append(t1 - t0)
            w_s.append(t2 - t1)
    return {"input": statistics.median(i_s), "weight": statistics.median(w_s)}


def _split_worker(
    rank: int, world: int, work: Workload, n: int, dtype: str, indices: list[int]
) -> Any:
    """As `_busy_worker`, for the split backward: every rank times the same layer at once."""
    dt = getattr(torch, dtype)
    out = _in_step(indices, lambda i: time_split(work.model, work.costs, i, n, dt))
    return out if rank == 0 else None


def split_profile(
    work: Workload, n: int, dtype: torch.dtype, busy: int, timeout: float = 600.0
) -> list[tuple[float, float]]:
    """(I, W) seconds per layer at `n` rows under `busy` processes, as `busy_profile`;
    cached per layer and busy count."""
    dims = [work.model.in_features, *work.model.hidden, work.model.out_features]
    keys = [
        _layer_key(work.model, i, n, dtype, torch.device("cpu")) + f"|split|busy={busy}"
        for i in range(len(dims) - 1)
    ]
    with _Cache(cache_dir(work.costs)).locked() as data:
        missing = [i for i, k in enumerate(keys) if k not in data]
    if missing:
        name = str(dtype).removeprefix("torch.")
        if busy <= 1:
            got = {i: time_split(work.model, work.costs, i, n, dtype) for i in missing}
        else:
            from splitgraph.spawn import run_ranks

            got = run_ranks(_split_worker, busy, work, n, name, missing, timeout=timeout)[0]
        with _Cache(cache_dir(work.costs)).locked() as data:
            for i in missing:
                data[keys[i]] = got[i]
    with _Cache(cache_dir(work.costs)).locked() as data:
        return [(float(data[k]["input"]), float(data[k]["weight"])) for k in keys]


# -- the step's fixed costs, from the model's sizes --------------------------------------------


def _time_fixed(work: Workload, shape: tuple[int, int], layers: int, repeats: int = 7) -> float:
    """Median seconds of the guard's end-of-step check (`_extremes_finite`), weight decay
    (term + gradient) and the optimizer step on `layers` stand-in layers of `shape`, as
    the engine runs them after the schedule."""
    from omegaconf import OmegaConf, open_dict

    from splitgraph.model import StageModule, add_l2_grad_, l2_term
    from splitgraph.optim import make_optimizer

    model = OmegaConf.create(OmegaConf.to_container(work.model, resolve=True))
    with open_dict(model):
        model.in_features, model.out_features = shape[1], shape[0]
        model.hidden = [shape[0]] * (layers - 1)
        model.out_features = shape[0]
    module = StageModule(model, 0, layers)
    params = list(module.parameters())
    opt = make_optimizer(work.optim, params)
    wd = float(work.optim.weight_decay)
    times = []
    for r in range(repeats + 2):
        for p in params:
            p.grad = torch.ones_like(p)
        t0 = time.perf_counter()
        _extremes_finite(params)
        float(l2_term(module, wd))
        add_l2_grad_(module, wd)
        opt.step()
        for p in params:
            p.grad = None
        if r >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _extremes_finite(params: Sequence[torch.Tensor]) -> bool:
    """The guard's end-of-step check of the parameter gradients, as runtime/guard.py's
    `finish` runs it (one aminmax per gradient, one isfinite over them all); written out
    here because cost/ may not import runtime/ (tests/test_layering.py)."""
    values = [v for p in params if p.grad is not None for v in torch.aminmax(p.grad.detach())]
    return bool(torch.isfinite(torch.stack(values)).all()) if values else True


def fixed_costs(work: Workload) -> FixedCosts:
    """Weight decay + optimizer per step, fitted over stand-in modules (per parameter, per
    tensor); cached per machine, optimizer and weight decay."""
    o = work.optim
    key = (
        f"fixed|v{VERSION}|{_machine()}|optim={o.name}|momentum={float(o.momentum)}|"
        f"wd={float(o.weight_decay) > 0}|bias={bool(work.model.bias)}|dtype={work.runtime.dtype}"
    )
    with _Cache(cache_dir(work.costs)).locked() as data:
        got = data.get(key)
    if got is None:
        # many small tensors (the per-tensor cost), few large ones (the per-parameter cost)
        small = _time_fixed(work, (32, 32), 16)
        large = _time_fixed(work, (1024, 1024), 2)
        t_small = 16 * (1 + int(bool(work.model.bias)))
        t_large = 2 * (1 + int(bool(work.model.bias)))
        p_small, p_large = 16 * 32 * 32, 2 * 1024 * 1024
        # solve  small = a p_small + t t_small,  large = a p_large + t t_large
        det = p_small * t_large - p_large * t_small
        a = (small * t_large - large * t_small) / det
        t = (p_small * large - p_large * small) / det
        got = {"per_param_s": max(a, 0.0), "per_tensor_s": max(t, 0.0)}
        with _Cache(cache_dir(work.costs)).locked() as data:
            data[key] = got
    return FixedCosts(float(got["per_param_s"]), float(got["per_tensor_s"]))


# -- the priced step ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PricedStep:
    step_s: float
    span_s: float
    fixed_s: float  # the largest rank's fixed costs
    bubble: float
    busy_s: tuple[float, ...]
    bound: str  # "schedule", or "timeshared" where ranks > cores (cost/timeshare.py)


def in_conditions(work: Workload, costs: ModelCosts, ranks: int) -> ModelCosts:
    """`costs` with its layer times profiled under the run's contention (min(ranks, cores)
    busy processes); `costs.times=flops` stays as it is (deterministic)."""
    if costs.time_source != "measured":
        return costs
    from splitgraph.model import torch_dtype

    busy = min(ranks, cores())
    times = busy_profile(work, costs.n, torch_dtype(work.runtime.dtype), busy)
    return replace(
        costs,
        forward=tuple(t[0] for t in times),
        backward=tuple(t[1] for t in times),
        time_source=f"measured, {busy} busy",
        _memo={},
    )


def split_times(work: Workload, costs: ModelCosts, ranks: int) -> list[tuple[float, float]] | None:
    """(I, W) seconds per layer at the run's rows under its contention (`split_profile`);
    None where the layer times are not measured (costs.times=flops: I = W = B/2)."""
    if not costs.time_source.startswith("measured"):
        return None
    from splitgraph.model import torch_dtype

    busy = min(ranks, cores())
    return split_profile(work, costs.n, torch_dtype(work.runtime.dtype), busy)


def sim_with_overhead(
    mc: ModelCosts,
    bounds: Sequence[int],
    action_s: float,
    transfer_s: float = 0.0,
    split: Sequence[tuple[float, float]] | None = None,
    compute_factor: float = 1.0,
) -> Costs:
    """The simulator's costs: every compute action's layers times `compute_factor`, plus
    `action_s`; `transfer_s` on every group of transfers a rank posts (the simulator's
    `post`). I and W: the stage's layers' measured halves (`split`, per layer), else B/2
    each."""
    base = mc.sim_costs(bounds)
    k = compute_factor
    f = [k * x + action_s for x in base.forward]
    b = [k * x + action_s for x in base.backward]
    if split is None:
        i_s = w_s = [k * x / 2 + action_s for x in base.backward]
    else:
        i_s, w_s = [], []
        for s in range(len(bounds) - 1):
            lo, hi, speed = bounds[s], bounds[s + 1], mc.devices[s].speed
            again = base.forward[s] if s in mc.recompute else 0.0  # recomputed: F in I
            i_s.append(k * (sum(x for x, _ in split[lo:hi]) / speed + again) + action_s)
            w_s.append(k * sum(y for _, y in split[lo:hi]) / speed + action_s)
    return Costs(f, b, i_s, w_s, base.comm, base.mb_scale, post=transfer_s)


def span(
    sched: Schedule, costs: Costs, ranks: int, crowding: float = 1.0
) -> tuple[float, tuple[float, ...]]:
    """(step time, busy per rank) of the schedule: the simulator's, or where `ranks` exceed
    this machine's cores, the ranks taking turns on them, `crowding` times slower while
    more of them have work than there are cores (cost/timeshare.py)."""
    n = cores()
    if ranks > n:
        shared = simulate_shared(sched, costs, n, crowding)
        return shared.step_time, shared.busy
    sim = simulate(sched, costs)
    return sim.step_time, tuple(sim.busy)


def priced_step(
    work: Workload,
    costs: ModelCosts,
    bounds: Sequence[int],
    sched: Schedule,
    ranks: int,
    cal: Calibration,
    fixed: FixedCosts | None = None,
) -> PricedStep:
    """The step of `bounds` under `sched` on `ranks` ranks, priced a priori (module doc)."""
    mc = in_conditions(work, costs, ranks)
    fixed = fixed if fixed is not None else fixed_costs(work)
    split = split_times(work, mc, ranks) if sched.split_backward else None
    step_span, busy = span(
        sched,
        sim_with_overhead(mc, bounds, cal.action_s, cal.transfer_s, split, cal.compute_factor),
        ranks,
        cal.crowding,
    )
    per_rank = []
    for r in range(ranks):
        ss = sched.stages_of(r)
        params = sum(mc.param_bytes(bounds[s], bounds[s + 1]) for s in ss) // max(
            mc.shape.element_size, 1
        )
        tensors = sum(mc.param_tensors(bounds[s], bounds[s + 1]) for s in ss)
        per_rank.append(fixed.time(params, tensors))
    n = cores()
    # every rank's weight decay and optimizer at once: they take turns where ranks > cores
    tail = shared_tail(per_rank, n, cal.crowding)
    step = step_span + cal.step_s + tail
    return PricedStep(
        step,
        step_span,
        cal.step_s + tail,
        idle_share(busy, step_span),
        busy,
        "timeshared" if ranks > n else "schedule",
    )


#: The compute factors tried by the fit: 0.5 to 2.5 in steps of 0.02.
FACTORS: tuple[float, ...] = tuple(round(0.5 + 0.02 * k, 2) for k in range(101))


def fit_compute_factor(
    span_of: Callable[[float], list[float]],
    rest: Sequence[float],
    measured: Sequence[float],
    grid: Sequence[float] = FACTORS,
) -> tuple[float, float]:
    """(factor, rms relative error): the compute factor whose simulated spans (`span_of`,
    the overheads already in) plus `rest` (the fixed costs and the per-step constant) best
    explain the `measured` steps of the compute-bound calibration launches."""
    best = (1.0, float("inf"))
    for k in grid:
        spans = span_of(k)
        err = sum(((s + r) / m - 1) ** 2 for s, r, m in zip(spans, rest, measured))
        rms = (err / len(measured)) ** 0.5
        if rms < best[1]:
            best = (k, rms)
    return best


#: The overheads tried by the fit: 0, then 1 us to ~6 ms in steps of 25%.
GRID: tuple[float, ...] = (0.0, *(1e-6 * 1.25**k for k in range(40)))


def fit_overheads(
    span_of: Callable[[float, float], list[float]],
    fixed: Sequence[float],
    measured: Sequence[float],
    grid: Sequence[float] = GRID,
    transfer_grid: Sequence[float] = GRID[::2],
) -> tuple[float, float, float, float]:
    """(action_s, transfer_s, step_s, rms relative error) that best explain the `measured`
    steps of the calibration launches: for each candidate pair, `span_of(action_s,
    transfer_s)` gives their simulated spans; `step_s` is the median residual after the spans
    and the fixed costs (never negative)."""
    best = (0.0, 0.0, 0.0, float("inf"))
    for o in grid:
        for t in transfer_grid:
            spans = span_of(o, t)
            resid = [m - s - f for m, s, f in zip(measured, spans, fixed)]
            c = max(statistics.median(resid), 0.0)
            err = sum(((s + f + c) / m - 1) ** 2 for s, f, m in zip(spans, fixed, measured))
            rms = (err / len(measured)) ** 0.5
            if rms < best[3]:
                best = (o, t, c, rms)
    return best


def _near(grid: Sequence[float], x: float, steps: int = 3) -> Sequence[float]:
    """The grid values within `steps` of `x`'s place in it."""
    i = min(range(len(grid)), key=lambda j: abs(grid[j] - x))
    return grid[max(i - steps, 0) : i + steps + 1]


#: The crowding factors tried where ranks exceed cores: 1 to 3 in steps of 0.05.
CROWDING: tuple[float, ...] = tuple(round(1.0 + 0.05 * k, 2) for k in range(41))

#: (o, t, k, crowding) -> the simulated spans of a calibration model's launches
Spans = Callable[[float, float, float, float], list[float]]


def fit_calibration(
    light_spans: Spans,
    light_fixed: Sequence[float],
    light_measured: Sequence[float],
    heavy_spans: Spans,
    heavy_fixed: Sequence[float],
    heavy_measured: Sequence[float],
    crowded: bool = False,
) -> tuple[float, float, float, float, float, float, float]:
    """(action_s, transfer_s, step_s, rms, compute_factor, its rms, crowding) from the two
    calibration models' launches: the overheads from the overhead-bound model (`light_*`),
    the compute factor from the compute-bound one (`heavy_*`), then the overheads again near
    the first fit with that factor, and the factor again: the light model's layers are small
    but not free, so each fit reads the other. `crowded` (ranks > cores): the launches also
    give the crowding (the compute-bound model's naive m=1 never has two ranks at work, its
    1F1B and most of the overhead model's launches have all of them: the factor and the
    crowding are told apart by them), fitted in turn with the factor; else crowding is 1."""
    g = 1.0
    heavy = (heavy_spans, heavy_fixed, heavy_measured)
    light = (light_spans, light_fixed, light_measured)
    o, t, c, rms = fit_overheads(
        lambda o, t: light_spans(o, t, 1.0, g), light_fixed, light_measured
    )
    k = 1.0
    for _ in range(2):
        k, g, krms = _fit_heavy(heavy, light, o, t, c, k, g, crowded)
        o, t, c, rms = fit_overheads(
            lambda o, t, k=k, g=g: light_spans(o, t, k, g),
            light_fixed,
            light_measured,
            _near(GRID, o),
            _near(GRID[::2], t),
        )
    k, g, krms = _fit_heavy(heavy, light, o, t, c, k, g, crowded)
    clipped = [
        f"{name} {value:g} (the grid ends at {end:g})"
        for name, value, end in (
            ("compute factor", k, FACTORS[0]),
            ("compute factor", k, FACTORS[-1]),
            ("per-action overhead", o, GRID[-1]),
            ("transfer overhead", t, GRID[::2][-1]),
            ("crowding", g, CROWDING[-1]),
        )
        if value == end
    ]
    if clipped:  # the best fit lies past the grid: the prices built on it are off by that much
        log.warning("calibration fit at the edge of its grid: %s", "; ".join(clipped))
    return o, t, c, rms, k, krms, g


def _fit_heavy(
    heavy: tuple[Spans, Sequence[float], Sequence[float]],
    light: tuple[Spans, Sequence[float], Sequence[float]],
    o: float,
    t: float,
    c: float,
    k: float,
    g: float,
    crowded: bool,
) -> tuple[float, float, float]:
    """(compute factor, crowding, the factor's rms) from (spans, fixed costs, measured) of
    each model's launches: the factor on the compute-bound model, then (`crowded`) the
    crowding on every launch of both models (one launch of a time-shared pipeline varies
    by tens of percent: seven launches outvote one), then the factor again."""
    spans, fixed, measured = heavy
    rest = [f + c for f in fixed]
    k, rms = fit_compute_factor(lambda k: spans(o, t, k, g), rest, measured)
    if crowded:
        lspans, lfixed, lmeasured = light
        g, _ = fit_compute_factor(
            lambda g: lspans(o, t, k, g) + spans(o, t, k, g),
            [f + c for f in lfixed] + rest,
            [*lmeasured, *measured],
            CROWDING,
        )
        k, rms = fit_compute_factor(lambda k: spans(o, t, k, g), rest, measured)
    return k, g, rms


def pricer(
    work: Workload, ranks: int, cal: Calibration | None = None, fixed: FixedCosts | None = None
) -> Callable[[Any], float]:
    """`planner.search`'s `price`: a candidate's prediction -> its step priced here, under
    this machine's calibration for `ranks` (LookupError if none is stored)."""
    cal = cal if cal is not None else load_calibration(work.costs, ranks)
    fixed = fixed if fixed is not None else fixed_costs(work)

    def price(pred: Any) -> float:
        mc, bounds = pred.costs, pred.plan.bounds
        return priced_step(work, mc, bounds, mc.schedule(len(bounds) - 1), ranks, cal, fixed).step_s

    return price
