"""Functions that run inside each rank of `run_ranks` for the reliability tests: the real
`train.run` on an already-initialised process group, several runs per launch."""

from __future__ import annotations

from typing import Any

import torch

from splitgraph.config import Workload, load_config
from splitgraph.errors import SplitgraphError
from splitgraph.partition import make_plan
from splitgraph.reliability import checkpoint
from splitgraph.runtime.dist import DistEnv
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.train import run as train
from tests import workers

#: the 6-layer model of tests/workers.py, in float64, quiet, with checkpoints every 3 steps;
#: traced, but no timeline.png (no test here reads it; drawing it was half a run's CPU:
#: test_e2e and test_bubble check the picture)
TINY = [
    *workers.TINY,
    "runtime.dtype=float64",
    "train.progress=false",
    "trace.picture=false",
    "checkpoint.every=3",
    "checkpoint.keep=4",
]

#: rank 1 of 2 stalls inside its schedule at step 1; the watchdog gives it 2 s
STALL = [
    "train.steps=4",
    "debug.fail_at_step=1",
    "debug.fail_rank=1",
    "debug.fail_mode=stall",
    "runtime.hang_timeout=2",
    "runtime.timeout=60",
]


def train_runs(rank: int, world: int, runs: list[list[str]]) -> list[str | None]:
    """`train.run` for each override list in turn; per run None, or the SplitgraphError text."""
    results: list[str | None] = []
    for overrides in runs:
        cfg = load_config(TINY + overrides)
        try:
            train.run(cfg, DistEnv(rank, world, rank))
            results.append(None)
        except SplitgraphError as e:
            results.append(f"{type(e).__name__}: {e}")
    return results


def loaded_state(rank: int, world: int, overrides: list[str]) -> dict[str, Any]:
    """What this rank holds right after loading the checkpoint `checkpoint.resume` names:
    weights and optimizer state by global name (the loading half of train.run)."""
    cfg = load_config(TINY + overrides)
    found = checkpoint.find_resume(cfg.checkpoint, cfg.model, checkpoint.identity(cfg))
    assert found is not None, "no checkpoint to resume"
    ck, meta = found
    plan = make_plan(Workload.of(cfg), world)
    state = checkpoint.read_rank_state(ck, meta, checkpoint.names_held(cfg.model, plan, rank), rank)
    engine = PipelineEngine(Workload.of(cfg), rank, world)
    checkpoint.apply_state(engine, state, cfg.optim.name)
    named = engine.named_parameters()
    return {
        "step": ck.step,
        "model": {n: p.detach().clone() for n, p in named.items()},
        "optim": {
            n: {k: v.clone() for k, v in engine.optimizer.state[p].items()}
            for n, p in named.items()
            if p in engine.optimizer.state
        },
    }


def cases(rank: int, world: int, items: list[tuple[str, list[str], str | None]]) -> list[Any]:
    """Many cases in one launch: (kind, overrides, outcome file or None).

    kind "train": train.run; "load": loaded_state; "nan_grad": nan_gradient; "corrupt":
    rank 0 damages the files named (the overrides), then all wait for it. Outcomes of
    train and nan_grad (None, or the error text) are also written to `<file>.rank<r>`, so a
    later case may end the launch (a killed rank) without losing the earlier ones'.
    """
    from pathlib import Path

    out: list[Any] = []
    for kind, overrides, file in items:
        if kind == "load":
            result: Any = loaded_state(rank, world, overrides)
        elif kind == "corrupt":  # rank 0 flips the low bit of every 4th byte of each file
            if rank == 0:
                for name in overrides:
                    data = bytearray(Path(name).read_bytes())
                    for i in range(1024, len(data), 4):
                        data[i] ^= 1
                    Path(name).write_bytes(bytes(data))
            torch.distributed.barrier()
            result = None
        elif kind == "groups":
            result = group_timeouts(rank, world, overrides)
        elif kind == "nan_grad":
            result = nan_gradient(rank, world, overrides)
        else:
            result = train_runs(rank, world, [overrides])[0]
        if file is not None:
            path = Path(f"{file}.rank{rank}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("ok" if result is None else str(result))
        out.append(result)
    return out


def nan_gradient(rank: int, world: int, overrides: list[str]) -> str:
    """One step in which stage 1's backward of microbatch 1 sends back a NaN gradient."""
    from splitgraph.config import NanCheck
    from splitgraph.data import BatchOrder, load_dataset
    from splitgraph.runtime.guard import raise_if_any

    cfg = load_config(TINY + overrides)
    engine = PipelineEngine(Workload.of(cfg), rank, world, nan_check=NanCheck.microbatch)
    calls = {"n": 0}

    def poison(module: Any, grad_in: Any, grad_out: Any) -> Any:
        calls["n"] += 1
        return (grad_in[0] * float("nan"),) if calls["n"] == 2 else None

    if 1 in engine.stages:
        engine.stages[1].register_full_backward_hook(poison)
    guard = engine.guard
    assert guard is not None
    ds = load_dataset(cfg.data, Workload.of(cfg)).to(torch.float64, "cpu")
    idx = BatchOrder(ds.num_train, 12, True, 0).indices(0)
    guard.begin()
    engine.forward_backward(ds.X[idx], ds.y[idx])
    guard.finish()
    events: list[Any] = [None] * world
    torch.distributed.all_gather_object(events, guard.events)
    try:
        raise_if_any(0, [e for evs in events for e in evs], None)
    except SplitgraphError as e:
        return str(e)
    return "no error"


def group_timeouts(rank: int, world: int, overrides: list[str]) -> dict[str, float | None]:
    """The timeout (seconds) of every process group a training rank waits on, as built by
    train.run's path: the mesh's groups, the channel groups, the step sum's group."""
    from datetime import timedelta

    from splitgraph.runtime.comm import group_timeout
    from splitgraph.runtime.mesh import build_mesh, layout_of
    from splitgraph.runtime.stepsum import StepSum

    cfg = load_config(TINY + overrides)
    wait = timedelta(seconds=float(cfg.runtime.timeout))
    mesh = build_mesh(layout_of(cfg.pipeline, cfg.parallel, world), "cpu", timeout=wait)
    engine = PipelineEngine.from_mesh(Workload.of(cfg), mesh)
    star = StepSum("gloo", torch.device("cpu"), timeout=wait)
    groups = {
        "dp": mesh["dp"].get_group(),
        "pp": mesh["pp"].get_group(),
        **{f"channel {k}": g for k, g in (engine.p2p._channels or {}).items()},
        "step sum": star.group,
    }
    found = {name: group_timeout(g) for name, g in groups.items()}
    return {name: t.total_seconds() if t is not None else None for name, t in found.items()}
