"""Partition strategies and the Plan they produce."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from splitgraph.config import Workload, load_config, validate
from splitgraph.errors import ConfigError, PartitionError
from splitgraph.partition import STRATEGIES, balanced, make_plan, manual, uniform
from splitgraph.train import usage

#: 4 layers; costed strategies price FLOPs and a configured link (nothing profiled or measured)
TINY = [
    "model.hidden=[8,16,8]",
    "data.features=4",
    "data.outputs=3",
    "costs.times=flops",
    "pipeline.bandwidth=1GB",
]
CONF = Path(__file__).resolve().parents[1] / "conf" / "partition"


def brute_force_minmax(costs: list[float], k: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0, *cuts, n)
        best = min(best, max(sum(costs[b[i] : b[i + 1]]) for i in range(k)))
    return best


def test_uniform_gives_remainder_to_early_stages() -> None:
    assert uniform(6, 4) == (0, 2, 4, 5, 6)
    assert uniform(4, 4) == (0, 1, 2, 3, 4)
    assert uniform(5, 1) == (0, 5)


def test_balanced_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [rng.choice([1, 2, 3, 5, 8, 13, 100]) * rng.random() for _ in range(n)]
        bounds = balanced(costs, k)
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == k + 1
        got = max(sum(costs[bounds[i] : bounds[i + 1]]) for i in range(k))
        assert got == pytest.approx(brute_force_minmax(costs, k))


def test_too_many_stages_is_a_clear_error() -> None:
    with pytest.raises(PartitionError, match="cannot cut 3 layers into 4"):
        uniform(3, 4)
    with pytest.raises(PartitionError, match="strictly increasing"):
        manual([3, 2], 6, 3)
    with pytest.raises(PartitionError, match="has 1 cut points; 3 stages need 2"):
        manual([3], 6, 3)


def test_plan_from_config_params_strategy_balances_parameters() -> None:
    cfg = load_config(["model.hidden=[512,32,32,32]", "partition=params"])
    plan = make_plan(Workload.of(cfg), 2)
    per_stage = [plan.stage_params(s) for s in range(2)]
    uni = make_plan(Workload.of(load_config(["model.hidden=[512,32,32,32]"])), 2)
    assert max(per_stage) <= max(uni.stage_params(s) for s in range(2))
    assert plan.bounds == (0, 1, 5)


def test_plan_table_names_layers_params_and_boundary_shape() -> None:
    cfg = load_config(["model.hidden=[8,8,8]", "data.features=4", "data.outputs=3"])
    plan = make_plan(Workload.of(cfg), 2)
    table = plan.table(16)
    assert "stage" in table and "[16, 8]" in table and "(loss)" in table
    assert "0-1" in table and "2-3" in table
    d = plan.to_dict()
    assert [s["layers"] for s in d["stages"]] == [[0, 1], [2, 3]]
    assert sum(s["params"] for s in d["stages"]) == 4 * 8 + 8 * 8 + 8 * 8 + 8 * 3


def test_manual_plan() -> None:
    cfg = load_config(["partition=manual", "partition.boundaries=[1,3]"])
    assert make_plan(Workload.of(cfg), 3).bounds == (0, 1, 3, 4)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_registered_strategy_is_selectable_accepted_and_plannable(name: str) -> None:
    """A strategy in the registry is a Hydra option (`partition=<name>`), passes
    `config.validate`, and `make_plan` turns it into a valid plan (building the cost model
    itself when the strategy reads one)."""
    spec = STRATEGIES[name]
    assert spec.name == name and spec.summary
    over = [f"partition={name}", *TINY]
    if spec.user_cuts:
        over.append("partition.boundaries=[1,3]")
    cfg = load_config(over)
    assert cfg.partition.strategy == name
    validate(cfg, 3)
    plan = make_plan(
        Workload.of(cfg), 3
    )  # Plan checks its bounds cut 4 layers into non-empty stages
    assert plan.strategy == name and plan.num_stages == 3 and plan.num_layers == 4


def test_config_accepts_and_lists_exactly_the_registry() -> None:
    """One place names the strategies: the config group, validate's choices and `--help`
    read the registry, in its order."""
    assert sorted(f.stem for f in CONF.glob("*.yaml")) == sorted(STRATEGIES)
    with pytest.raises(ConfigError) as e:
        validate(load_config(["partition.strategy=optimel", *TINY]), 2)
    names = ", ".join(STRATEGIES)
    assert f"'optimel' is not a strategy (did you mean 'optimal'?). Choose one of: {names}." in (
        str(e.value)
    )
    assert f"partition={'|'.join(STRATEGIES)}\n" in usage.OVERRIDES


def test_costed_strategies_refuse_virtual_stages_and_name_the_others() -> None:
    """The cost model prices one stage per rank: the registry's costed strategies are
    refused with two chunks per rank, and the message offers every one that is not."""
    free = [n for n, s in STRATEGIES.items() if not s.costed]
    offer = f"Use partition={', '.join(free[:-1])} or {free[-1]} with virtual stages."
    chunked = ["schedule=interleaved", "schedule.virtual_stages=2", "pipeline.microbatches=4"]
    for name, spec in STRATEGIES.items():
        over = [f"partition={name}", *TINY, "model.hidden=[8,8,8,8,8]", *chunked]
        if spec.user_cuts:
            over.append("partition.boundaries=[1,2,3]")
        if not spec.costed:
            validate(load_config(over), 2)
            continue
        with pytest.raises(ConfigError, match="prices one stage per rank") as e:
            validate(load_config(over), 2)
        assert offer in str(e.value)
