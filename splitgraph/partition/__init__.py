"""Where to cut the graph: strategies -> `Plan`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splitgraph.partition.plan import LayerSpec, Plan, layer_specs
from splitgraph.partition.strategies import balanced, manual, uniform

if TYPE_CHECKING:
    from splitgraph.costs import ModelCosts

__all__ = ["LayerSpec", "Plan", "balanced", "layer_specs", "make_plan", "manual", "uniform"]


#: Strategies that read the cost model (splitgraph/costs.py): name -> what they need.
COSTED = {"time": "times", "memory": "memory", "optimal": "times+link"}


def make_plan(cfg: Any, num_ranks: int, costs: ModelCosts | None = None) -> Plan:
    """The plan for `cfg` on `num_ranks` ranks, `schedule.virtual_stages` stages per rank.

    `time`, `memory` and `optimal` need the cost model; pass `costs` to reuse one (else it is
    built here: `time`/`optimal` profile the layers, cached on disk)."""
    layers = layer_specs(cfg)
    n, stages = len(layers), num_ranks * int(cfg.schedule.virtual_stages)
    strategy = str(cfg.partition.strategy)
    if strategy == "uniform":
        bounds = uniform(n, stages)
    elif strategy == "params":
        bounds = balanced([layer.params for layer in layers], stages)
    elif strategy == "manual":
        bounds = manual(cfg.partition.boundaries or [], n, stages)
    elif strategy in COSTED:
        bounds = costed_bounds(strategy, cfg, stages, costs)
    else:
        raise ValueError(f"unknown partition strategy {strategy!r}")
    return Plan(layers=layers, bounds=bounds, strategy=strategy, num_ranks=num_ranks)


def costed_bounds(
    strategy: str, cfg: Any, stages: int, costs: ModelCosts | None = None, check: bool = True
) -> tuple[int, ...]:
    """Bounds from a strategy that reads the cost model (splitgraph/partition/costed.py).

    With a memory cap, `time` and `memory` refuse a split that exceeds it (`check=False`:
    return it anyway, for a search that ranks it); `optimal` only returns splits that fit."""
    from splitgraph.costs import link_from_config, model_costs
    from splitgraph.partition.costed import check_fits, memory_bounds, optimal_bounds, time_bounds

    if costs is None:
        need = COSTED[strategy]
        link = None if "link" in need else link_from_config(cfg, measure=False)
        costs = model_costs(cfg, stages, link=link, times="times" in need)
    if strategy == "optimal":
        return optimal_bounds(costs, stages)
    bounds = memory_bounds(costs, stages) if strategy == "memory" else time_bounds(costs, stages)
    if check:
        check_fits(costs, bounds)
    return bounds
