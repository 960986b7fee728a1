"""The cost model and the strategies that read it: time, memory, optimal (exact search)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from splitgraph.config import Activation, Task, Workload, load_config, validate
from splitgraph.cost.costs import Device, ModelCosts, flops, model_costs, optimizer_slots
from splitgraph.cost.link import Link
from splitgraph.cost.memory_model import ModelShape
from splitgraph.data import microbatch_sizes
from splitgraph.errors import ConfigError, PartitionError
from splitgraph.partition import make_plan
from splitgraph.partition.costed import (
    fits,
    memory_bounds,
    optimal_bounds,
    smallest_cap,
    time_bounds,
)
from splitgraph.partition.steptime import StepTimer
from splitgraph.plan import LayerSpec
from splitgraph.schedule import Costs, build_schedule, simulate

FLOPS = ["costs.times=flops", "pipeline.bandwidth=1GB"]
UNBALANCED = ["model.hidden=[4096,256,256,256,2048]", *FLOPS]


def random_costs(rng: random.Random, n: int, k: int, schedule: str, m: int) -> ModelCosts:
    """A random model on random devices: widths, bias, activation, task, per-layer times,
    link, speeds, optimizer, uneven microbatches; half the time a memory cap that binds."""
    dims = [rng.choice([2, 8, 32, 128]) for _ in range(n + 1)]
    layers = tuple(LayerSpec(i, dims[i], dims[i + 1], rng.random() < 0.5) for i in range(n))
    shape = ModelShape(tuple(dims), rng.choice(list(Activation)), rng.choice(list(Task)), 4)
    costs = ModelCosts(
        layers=layers,
        shape=shape,
        sizes=tuple(microbatch_sizes(rng.randint(m, 3 * m), m)),
        forward=tuple(rng.random() for _ in range(n)),
        backward=tuple(2 * rng.random() for _ in range(n)),
        link=Link(rng.choice([1e3, 1e5, 1e9]), 0.1 * rng.random()),
        devices=tuple(Device(rng.choice([0.5, 1.0, 2.0])) for _ in range(k)),
        optimizer_slots=rng.randint(0, 2),
        time_source="flops",
        schedule_name=schedule,
    )
    if rng.random() < 0.5:
        needs = sorted(
            costs.stage_memory(s, i, j)
            for s in range(k)
            for i in range(n)
            for j in range(i + 1, n + 1)
        )
        cap = needs[rng.randint(len(needs) // 2, len(needs) - 1)]
        devices = tuple(Device(d.speed, cap) for d in costs.devices)
        costs = ModelCosts(**{**costs.__dict__, "devices": devices, "_memo": {}})
    return costs


def splits(n: int, k: int) -> list[tuple[int, ...]]:
    return [(0, *c, n) for c in itertools.combinations(range(1, n), k - 1)]


def instances(count: int, seed: int) -> list[tuple[ModelCosts, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(1, 8)
        k = rng.randint(1, min(n, 5))
        schedule = rng.choice(["naive", "gpipe", "1f1b"])
        m = 1 if schedule == "naive" else rng.randint(1, 6)
        out.append((random_costs(rng, n, k, schedule, m), k))
    return out


# -- the step-time model -------------------------------------------------------------------


def test_step_timer_equals_the_simulator() -> None:
    rng = random.Random(3)
    for _ in range(300):
        name = rng.choice(["naive", "gpipe", "1f1b"])
        p, m = rng.randint(1, 6), 1 if name == "naive" else rng.randint(1, 9)
        sched = build_schedule(name, p, m)
        costs = Costs(
            forward=[rng.random() for _ in range(p)],
            backward=[2 * rng.random() for _ in range(p)],
            comm=[rng.random() for _ in range(p - 1)],
            mb_scale=[rng.choice([1.0, 0.5]) for _ in range(m)],
        )
        assert StepTimer(sched)(costs) == simulate(sched, costs).step_time


def test_gpipe_has_a_closed_form_1f1b_does_not() -> None:
    """What steptime.py's docstring claims: GPipe's step time is sum + 2 comm + (m-1)(max f +
    max b) exactly; 1F1B's differs from sum + (m-1) max(f + b) on unbalanced stages."""
    rng = random.Random(4)
    for _ in range(200):
        p, m = rng.randint(1, 5), rng.randint(1, 8)
        f = [rng.random() for _ in range(p)]
        b = [2 * rng.random() for _ in range(p)]
        c = [rng.random() for _ in range(p - 1)]
        t = simulate(build_schedule("gpipe", p, m), Costs(f, b, comm=c)).step_time
        closed = sum(f) + sum(b) + 2 * sum(c) + (m - 1) * (max(f) + max(b))
        assert t == pytest.approx(closed, rel=1e-12)
    f, b = [0.96, 0.5, 0.19, 0.47, 0.33], [1.92, 1.0, 0.38, 0.94, 0.66]
    t = simulate(build_schedule("1f1b", 5, 5), Costs(f, b)).step_time
    estimate = sum(f) + sum(b) + 4 * max(x + y for x, y in zip(f, b))
    assert t < 0.85 * estimate


# -- strategies against brute force ----------------------------------------------------------


def test_optimal_is_the_best_split_that_fits() -> None:
    """Against brute force over every contiguous split, with caps, devices of different
    speeds, link costs, uneven microbatches and every schedule."""
    infeasible = 0
    for costs, k in instances(250, seed=0):
        n = costs.num_layers
        timer = StepTimer(costs.schedule(k))
        feasible = [
            b for b in splits(n, k) if all(fits(costs, s, b[s], b[s + 1]) for s in range(k))
        ]
        if not feasible:
            infeasible += 1
            with pytest.raises(PartitionError, match="smallest cap that fits"):
                optimal_bounds(costs, k)
            continue
        best = min(timer(costs.sim_costs(b)) for b in feasible)
        got = optimal_bounds(costs, k)
        assert got in feasible
        assert timer(costs.sim_costs(got)) == pytest.approx(best, rel=1e-12)
    assert 10 < infeasible < 150  # both kinds of instance were exercised


def test_time_and_memory_strategies_minimise_their_largest_stage() -> None:
    def slowest(costs: ModelCosts, b: tuple[int, ...]) -> float:
        return max(sum(costs.stage_time(s, b[s], b[s + 1])) for s in range(len(b) - 1))

    def heaviest(costs: ModelCosts, b: tuple[int, ...]) -> float:
        return max(costs.stage_memory(s, b[s], b[s + 1]) for s in range(len(b) - 1))

    for costs, k in instances(150, seed=1):
        all_splits = splits(costs.num_layers, k)
        fastest = min(slowest(costs, b) for b in all_splits)
        assert slowest(costs, time_bounds(costs, k)) == pytest.approx(fastest)
        if len({d.memory for d in costs.devices}) == 1:
            lightest = min(heaviest(costs, b) for b in all_splits)
            assert heaviest(costs, memory_bounds(costs, k)) == lightest
            assert smallest_cap(costs, k)[0] == lightest


def test_optimal_prunes_most_of_a_deep_model() -> None:
    """24 layers on 8 stages: 245,157 contiguous splits; with the bounds the search prices
    (prefixes included) about 6% of that."""
    costs = random_costs(random.Random(24), 24, 8, "1f1b", 16)
    stats: dict[str, int] = {}
    optimal_bounds(costs, 8, stats)
    assert stats["evaluated"] < 0.1 * math.comb(23, 7), stats


# -- through the config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "extra", "bounds"),
    [
        ("uniform", [], (0, 2, 4, 6)),
        ("params", [], (0, 1, 2, 6)),
        ("manual", ["partition.boundaries=[3,5]"], (0, 3, 5, 6)),
        ("time", [], (0, 1, 2, 6)),
        ("memory", [], (0, 1, 2, 6)),
        ("optimal", [], (0, 1, 2, 6)),
    ],
)
def test_every_strategy_is_selectable_by_override(
    strategy: str, extra: list[str], bounds: tuple[int, ...]
) -> None:
    cfg = load_config([*UNBALANCED, f"partition={strategy}", *extra])
    validate(cfg, 3)
    plan = make_plan(Workload.of(cfg), 3)
    assert plan.strategy == strategy and plan.bounds == bounds


def test_memory_strategy_knows_1f1b_keeps_more_on_early_stages() -> None:
    """Equal layers, no parameters to speak of: under GPipe every stage holds all m
    microbatches, so the split is even; under 1F1B stage 0 holds p of them and stage p-1
    one, so memory balance gives the early stages fewer layers."""
    over = ["model.hidden=[512,512,512,512,512,512,512]", "data.features=512", *FLOPS]
    over += ["pipeline.microbatches=8", "train.batch_size=64", "partition=memory"]
    gpipe = make_plan(Workload.of(load_config([*over, "schedule=gpipe"])), 4)
    f1b = make_plan(Workload.of(load_config([*over, "schedule=1f1b"])), 4)
    sizes = lambda b: [y - x for x, y in zip(b, b[1:])]  # noqa: E731
    assert sizes(gpipe.bounds) == [2, 2, 2, 2]
    assert sizes(f1b.bounds)[0] < sizes(f1b.bounds)[-1]


def test_a_faster_device_gets_more_layers() -> None:
    over = ["model.hidden=[256,256,256,256,256,256,256]", "partition=time", *FLOPS]
    same = make_plan(Workload.of(load_config(over)), 2)
    fast_last = make_plan(
        Workload.of(load_config([*over, "pipeline.devices=[{speed:1},{speed:3}]"])), 2
    )
    assert same.bounds == (0, 4, 8)
    assert fast_last.bounds[1] < same.bounds[1]


def test_nothing_fits_names_the_smallest_cap_and_it_does_fit() -> None:
    over = [*UNBALANCED, "partition=optimal"]
    with pytest.raises(PartitionError) as info:
        make_plan(Workload.of(load_config([*over, "pipeline.memory_cap=5MiB"])), 3)
    text = str(info.value)
    for needle in (
        "smallest cap that fits",
        "No split needs less than",
        "4 stages",
        "pipeline.microbatches=8",
        "schedule.recompute=true",
    ):
        assert needle in text, text
    need = int(text.split("(")[2].split(" bytes")[0])
    assert make_plan(Workload.of(load_config([*over, f"pipeline.memory_cap={need}"])), 3).bounds
    with pytest.raises(PartitionError):
        make_plan(Workload.of(load_config([*over, f"pipeline.memory_cap={need - 1}"])), 3)
    for strategy in ("time", "memory"):
        with pytest.raises(PartitionError, match="smallest cap that fits"):
            make_plan(
                Workload.of(
                    load_config([*UNBALANCED, f"partition={strategy}", "pipeline.memory_cap=5MiB"])
                ),
                3,
            )


def test_cost_model_numbers() -> None:
    cfg = load_config(["model.hidden=[8]", "data.features=4", "data.outputs=3", *FLOPS])
    assert optimizer_slots(cfg.optim) == 1  # the default SGD has momentum 0.9
    assert optimizer_slots(load_config(["optim.momentum=0"]).optim) == 0
    assert optimizer_slots(load_config(["optim=adam"]).optim) == 2
    costs = model_costs(Workload.of(cfg), 2)
    first, last = costs.layers
    assert flops(first, 10, False) == (2 * 10 * 4 * 8 + 10 * 8, 2 * 10 * 4 * 8 + 10 * 8)
    assert flops(last, 10, True) == (2 * 10 * 8 * 3, 2 * 2 * 10 * 8 * 3)
    assert costs.static_bytes(0, 1) == 4 * 8 * 4 * 3  # fp32 params, grads, momentum
    assert costs.boundary_bytes(1) == costs.n * 8 * 4
    assert costs.comm(1) == pytest.approx(costs.n * 8 * 4 / 1e9)
    assert costs.forward[0] == pytest.approx(flops(first, costs.n, False)[0] / 1e10)


def test_device_and_link_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        validate(
            load_config(
                [
                    "pipeline.devices=[{speed:0}]",
                    "pipeline.bandwidth=fast",
                    "pipeline.latency=-1",
                    "costs.repeats=0",
                ]
            ),
            2,
        )
    text = str(info.value)
    for needle in (
        "pipeline.devices has 1 entries but there are 2 ranks",
        "pipeline.devices[0].speed=0.0",
        "pipeline.bandwidth='fast'",
        "pipeline.latency=-1",
        "costs.repeats=0",
    ):
        assert needle in text


def test_same_rank_assumption_holds_for_every_searched_schedule() -> None:
    """The strategies price a stage alone, valid while each rank holds one stage."""
    for name in ("naive", "gpipe", "1f1b"):
        sched = build_schedule(name, 3, 1 if name == "naive" else 4)
        assert sched.stage_to_rank == (0, 1, 2)
    assert math.isfinite(Link(1e9).time(10))
