"""Where to cut the graph: strategies -> `Plan`."""

from __future__ import annotations

from typing import Any

from splitgraph.partition.plan import LayerSpec, Plan, layer_specs
from splitgraph.partition.strategies import balanced, manual, uniform

__all__ = ["LayerSpec", "Plan", "balanced", "layer_specs", "make_plan", "manual", "uniform"]


def make_plan(cfg: Any, num_ranks: int) -> Plan:
    """The plan for `cfg` on `num_ranks` ranks: `schedule.virtual_stages` stages per rank."""
    layers = layer_specs(cfg)
    n, stages = len(layers), num_ranks * int(cfg.schedule.virtual_stages)
    strategy = str(cfg.partition.strategy)
    if strategy == "uniform":
        bounds = uniform(n, stages)
    elif strategy == "params":
        bounds = balanced([layer.params for layer in layers], stages)
    elif strategy == "manual":
        bounds = manual(cfg.partition.boundaries or [], n, stages)
    else:
        raise ValueError(f"unknown partition strategy {strategy!r}")
    return Plan(layers=layers, bounds=bounds, strategy=strategy, num_ranks=num_ranks)
