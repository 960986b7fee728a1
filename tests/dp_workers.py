"""Workers for the data x pipeline parallel tests (run inside `run_ranks`).

One launch of 4 ranks runs every case: the three DeviceMeshes (2x2, 4x1, 1x4) are built once,
up front and in the same order on every rank (each is a collective), and reused by the cases.
"""

from __future__ import annotations

from typing import Any

import torch

from splitgraph.config import Workload, load_config
from splitgraph.data import replica_rows
from splitgraph.model import torch_dtype
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.runtime.mesh import Layout, build_mesh
from tests.reference import global_names, max_rel_err, objective, plain_mlp, reference_grads
from tests.workers import GRID, _batch, make_cfg

LAYOUTS = ((2, 2), (4, 1), (1, 4))


def dp_grid_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case: this rank's gradient (or weight) error against single-device full-batch
    training, and its share of L and s (the test sums them over ranks)."""
    meshes = {shape: build_mesh(Layout(*shape), "cpu") for shape in LAYOUTS}
    base = load_config(GRID)
    out: dict[str, Any] = {}
    for case in cases:
        dp, pp = case["layout"]
        cfg = make_cfg(base, [*case["overrides"], f"parallel.dp={dp}"])
        engine = PipelineEngine.from_mesh(
            Workload.of(cfg), meshes[(dp, pp)], channels=case.get("channels")
        )
        assert (engine.dp, engine.world_size) == (dp, pp)
        out[case["id"]] = _run_case(cfg, engine, int(case.get("steps", 0)))
    return out


def _mine(engine: PipelineEngine, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
    rows = replica_rows(torch.arange(x.shape[0]), engine.dp_rank, engine.dp)
    return x[rows], y[rows]


def _run_case(cfg: Any, engine: PipelineEngine, steps: int) -> dict[str, float]:
    dtype = torch_dtype(cfg.runtime.dtype)
    task = str(cfg.model.task.value)
    wd = float(cfg.optim.weight_decay)
    if not steps:
        x, y = _batch(cfg, dtype)
        stats = engine.forward_backward(*_mine(engine, x, y))
        got = {k: p.grad for k, p in engine.named_parameters().items()}
        seq = plain_mlp(cfg, dtype)
        with torch.no_grad():
            J = float(objective(seq, x, y, task, wd))
        return {
            "err": max_rel_err(got, reference_grads(cfg, x, y, dtype)),
            "J_share": stats.loss + stats.l2,
            "J_ref": J,
        }
    seq = plain_mlp(cfg, dtype)
    params = global_names(seq)
    start = {k: p.detach().clone() for k, p in params.items()}
    if str(cfg.optim.name.value) == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params.values(), lr=cfg.optim.lr, momentum=cfg.optim.momentum
        )
    else:
        opt = torch.optim.Adam(params.values(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    for step in range(steps):
        x, y = _batch(cfg, dtype, step)
        engine.step(*_mine(engine, x, y))
        opt.zero_grad()
        objective(seq, x, y, task, wd).backward()
        opt.step()
    got = {k: p.detach() for k, p in engine.named_parameters().items()}
    return {
        "err": max_rel_err(got, {k: p.detach() for k, p in params.items()}),
        "moved": max_rel_err(got, start),  # the weights did change: a 0 error means something
    }
