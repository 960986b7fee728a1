"""Measured layer times and link: positive, cached on disk, reused without measuring again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitgraph.config import Workload, load_config
from splitgraph.cost import profiler
from splitgraph.cost.costs import link_from_config, model_costs

SMALL = ["model.hidden=[32,16]", "data.features=8", "data.outputs=4", "costs.repeats=3"]


def test_layer_profile_is_cached_per_size_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config([*SMALL, f"costs.cache_dir={tmp_path}"])
    first = profiler.profile_layers(cfg.model, cfg.costs, 16, torch.float32, torch.device("cpu"))
    assert len(first) == 3 and all(f > 0 and b > 0 for f, b in first)
    data = json.loads((tmp_path / "profiles.json").read_text())
    assert len(data) == 3 and all("n=16" in k and "float32" in k for k in data)

    def no_measuring(*args: object) -> None:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(profiler, "time_layer", no_measuring)
    assert (
        profiler.profile_layers(cfg.model, cfg.costs, 16, torch.float32, torch.device("cpu"))
        == first
    )
    with pytest.raises(AssertionError, match="measured again"):
        profiler.profile_layers(cfg.model, cfg.costs, 32, torch.float32, torch.device("cpu"))
    fastest = load_config([*SMALL, f"costs.cache_dir={tmp_path}", "costs.statistic=min"])
    mins = profiler.profile_layers(
        fastest.model, fastest.costs, 16, torch.float32, torch.device("cpu")
    )
    assert all(m <= f for pair_m, pair_f in zip(mins, first) for m, f in zip(pair_m, pair_f))


def test_measured_costs_feed_the_cost_model(tmp_path: Path) -> None:
    cfg = load_config([*SMALL, f"costs.cache_dir={tmp_path}", "pipeline.bandwidth=1GB"])
    costs = model_costs(Workload.of(cfg), 2)
    assert costs.time_source == "measured" and all(t > 0 for t in costs.forward)
    assert costs.stage_time(0, 0, 3) == pytest.approx((sum(costs.forward), sum(costs.backward)))


@pytest.mark.timeout(120)
def test_link_is_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config([f"costs.cache_dir={tmp_path}"])
    link = link_from_config(cfg.pipeline, cfg.costs)
    assert link.bandwidth > 1e6 and link.latency >= 0 and "measured" in link.source

    def no_spawning(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured the link again")

    import splitgraph.spawn as spawn

    monkeypatch.setattr(spawn, "run_ranks", no_spawning)
    assert link_from_config(cfg.pipeline, cfg.costs) == link
    fixed = load_config(["pipeline.bandwidth=2GB", "pipeline.latency=1e-5"])
    configured = link_from_config(fixed.pipeline, fixed.costs)
    assert (configured.bandwidth, configured.latency) == (2e9, 1e-5)
