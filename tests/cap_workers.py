"""Rank functions for the memory-cap and time-budget tests (importable, so spawn finds them).

One launch runs several training cases through `train._train` on the process group that
`run_ranks` already set up: exactly the code path torchrun runs, without its start-up cost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from splitgraph.config import Workload, load_config, validate
from splitgraph.data import load_dataset
from splitgraph.errors import OutOfMemory
from splitgraph.partition import make_plan
from splitgraph.runtime.dist import DistEnv, Placement
from splitgraph.runtime.mesh import layout_of
from splitgraph.train import run as train


def train_cases(rank: int, world: int, cases: list[dict[str, Any]], root: str) -> dict[str, Any]:
    """Each case trains on every rank; returns per case "ok" or the OutOfMemory's figures."""
    out: dict[str, Any] = {}
    for case in cases:
        run_dir = Path(root) / case["id"]
        cfg = load_config([*case["overrides"], f"run_dir={run_dir}"])
        validate(cfg, world)
        layout = layout_of(cfg.pipeline, cfg.parallel, world)
        plan = make_plan(Workload.of(cfg), layout.pp)
        holds = layout.coords(rank)[1] in (plan.rank_of(0), plan.rank_of(plan.num_stages - 1))
        dataset = load_dataset(cfg.data, Workload.of(cfg)) if holds else None
        env = DistEnv(rank=rank, world_size=world, local_rank=rank)
        try:
            placement = Placement(torch.device("cpu"), "gloo", "direct", shared_gpu=False)
            train._train(cfg, env, layout, placement, dataset, None)
            out[case["id"]] = "ok"
        except OutOfMemory as e:
            out[case["id"]] = {"message": str(e), "needed": e.needed, "rank": e.rank}
    return out


def read_summary(root: str, case: str) -> dict[str, Any]:
    return json.loads((Path(root) / case / "summary.json").read_text())
