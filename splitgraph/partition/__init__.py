"""Where to cut the graph: a registered strategy -> `Plan`.

Every strategy is registered in `STRATEGIES` with a one-line summary, what it reads from the
cost model, and its split `(layers, stages, cfg, costs) -> bounds`. It is the one place that
names them: `make_plan` dispatches through it, and `config.validate`, `--help`
(splitgraph/train/usage.py), the planner's search and the compare harness read it, so a new
strategy is plannable, accepted and listed once it is registered (and has its
`conf/partition/<name>.yaml`; tests/test_partition.py checks both).

This package imports no torch (plan.py reads the model's widths lazily), so `--help` and the
registry stay cheap; the costed strategies import their cost model when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splitgraph.partition.strategies import balanced, manual, uniform
from splitgraph.plan import LayerSpec, Plan, layer_specs

if TYPE_CHECKING:
    from splitgraph.config import PartitionConfig, Workload
    from splitgraph.cost.costs import ModelCosts

__all__ = [
    "STRATEGIES",
    "LayerSpec",
    "Plan",
    "StrategySpec",
    "balanced",
    "costed_bounds",
    "layer_specs",
    "make_plan",
    "manual",
    "uniform",
]

#: (layers, stages, cfg, cost model or None) -> cut points `(0, ..., len(layers))`
Split = Callable[[tuple[LayerSpec, ...], int, Any, "ModelCosts | None"], tuple[int, ...]]


@dataclass(frozen=True)
class StrategySpec:
    name: str
    summary: str
    split: Split
    #: what it reads from the cost model (splitgraph/cost/costs.py): "times" (per-layer times,
    #: profiled or FLOP-priced), "memory" (bytes only, no profiling), "link" (the link,
    #: measured when pipeline.bandwidth is unset); () reads no cost model
    costs: tuple[str, ...] = ()
    #: reads the user's cut points (partition.boundaries), so a search cannot try it alone
    user_cuts: bool = False

    @property
    def costed(self) -> bool:
        return bool(self.costs)


def _uniform(
    layers: tuple[LayerSpec, ...], stages: int, part: PartitionConfig, costs: Any
) -> tuple[int, ...]:
    return uniform(len(layers), stages)


def _params(
    layers: tuple[LayerSpec, ...], stages: int, part: PartitionConfig, costs: Any
) -> tuple[int, ...]:
    return balanced([layer.params for layer in layers], stages)


def _manual(
    layers: tuple[LayerSpec, ...], stages: int, part: PartitionConfig, costs: Any
) -> tuple[int, ...]:
    return manual(part.boundaries or [], len(layers), stages)


def _time(
    layers: tuple[LayerSpec, ...], stages: int, part: PartitionConfig, costs: Any
) -> tuple[int, ...]:
    from splitgraph.partition.costed import time_bounds

    return time_bounds(costs, stages)


def _memory(
    layers: tuple[LayerSpec, ...], stages: int, part: PartitionConfig, costs: Any
) -> tuple[int, ...]:
    from splitgraph.partition.costed import memory_bounds

    return memory_bounds(costs, stages)


def _optimal(
    layers: tuple[LayerSpec, ...], stages: int, part: PartitionConfig, costs: Any
) -> tuple[int, ...]:
    from splitgraph.partition.costed import optimal_bounds

    return optimal_bounds(costs, stages)


STRATEGIES: dict[str, StrategySpec] = {
    s.name: s
    for s in (
        StrategySpec("uniform", "equal layer counts", _uniform),
        StrategySpec("params", "balanced parameter counts (exact min-max split)", _params),
        StrategySpec(
            "manual", "the user's cut points: partition.boundaries", _manual, user_cuts=True
        ),
        StrategySpec("time", "the fastest slowest stage (measured times)", _time, ("times",)),
        StrategySpec("memory", "the smallest largest stage memory", _memory, ("memory",)),
        StrategySpec(
            "optimal",
            "the fastest simulated step that fits the memory caps",
            _optimal,
            ("times", "link"),
        ),
    )
}


def make_plan(work: Workload, num_ranks: int, costs: ModelCosts | None = None) -> Plan:
    """The plan for `work` on `num_ranks` ranks, `schedule.virtual_stages` stages per rank,
    placed as the schedule places them (`schedule.placement_of`: the V schedules put stage s
    and 2p-1-s on rank s).

    A costed strategy (`time`, `memory`, `optimal`) reads the cost model; pass `costs` to
    reuse one (else it is built here: `time`/`optimal` profile the layers, cached on disk)."""
    layers = layer_specs(work.model)
    stages = num_ranks * work.schedule.virtual_stages
    strategy = work.partition.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown partition strategy {strategy!r}")
    spec = STRATEGIES[strategy]
    if spec.costed:
        bounds = costed_bounds(strategy, work, stages, costs)
    else:
        bounds = spec.split(layers, stages, work.partition, None)
    from splitgraph.schedule import placement_of

    path = getattr(work.schedule, "path", None)
    v = int(work.schedule.virtual_stages)
    placement = placement_of(str(work.schedule.name), num_ranks, v, path=path)
    if placement is not None and len(placement) != stages:
        placement = None  # a file for another shape: the engine's build names the mismatch
    return Plan(
        layers=layers,
        bounds=bounds,
        strategy=strategy,
        num_ranks=num_ranks,
        placement=placement,
    )


def costed_bounds(
    strategy: str,
    work: Workload,
    stages: int,
    costs: ModelCosts | None = None,
    check: bool = True,
) -> tuple[int, ...]:
    """Bounds from a strategy that reads the cost model (splitgraph/partition/costed.py).

    With a memory cap, a split that exceeds it is refused (`check=False`: return it anyway,
    for a search that ranks it); `optimal` only returns splits that fit."""
    from splitgraph.cost.costs import link_from_config, model_costs
    from splitgraph.partition.costed import check_fits

    spec = STRATEGIES[strategy]
    if not spec.costed:
        raise ValueError(f"partition strategy {strategy!r} reads no cost model")
    if costs is None:
        link = None
        if "link" not in spec.costs:
            link = link_from_config(work.pipeline, work.costs, measure=False)
        costs = model_costs(work, stages, link=link, times="times" in spec.costs)
    bounds = spec.split(layer_specs(work.model), stages, work.partition, costs)
    if check:
        check_fits(costs, bounds)
    return bounds
