"""Functions that run inside each rank of `run_ranks` (importable, so spawn can find them).

One launch per world size runs a whole list of cases against the already-initialised process
group: starting processes costs seconds on two cores, a case costs milliseconds.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from splitgraph.config import Workload, load_config
from splitgraph.data import BatchOrder, load_dataset
from splitgraph.model import torch_dtype
from splitgraph.runtime.engine import PipelineEngine
from tests.reference import global_names, max_rel_err, objective, plain_mlp, reference_grads

#: A 6-layer MLP small enough for hundreds of cases; batch 12 cuts unevenly into 8.
TINY = [
    "model.hidden=[5,9,4,8,3]",
    "data.features=6",
    "data.outputs=3",
    "data.samples=96",
    "data.test_fraction=0",
    "train.batch_size=12",
]


@functools.cache
def _override(item: str) -> Any:
    """One `key=value` parsed once: the grids repeat a few dozen overrides hundreds of times,
    and OmegaConf's grammar costs milliseconds a parse."""
    return OmegaConf.from_dotlist([item])


@dataclass(frozen=True)
class _Held:
    """A base config as make_cfg copies it: the base itself (held, so its id is not reused),
    pickles of it as given and resolved, and the text of its interpolations."""

    base: Any
    raw: bytes
    resolved: bytes
    links: str


#: base config id -> _Held: see make_cfg
_BASES: dict[int, _Held] = {}


def _held(base: Any) -> _Held:
    """Unpickling a pickle, made once, costs a third of what OmegaConf.merge's deep copy of
    the structured config does (the grids copy it thousands of times a launch); resolving
    the base once spares each copy a walk of every node (a third of a grid case's set-up)."""
    held = _BASES.get(id(base))
    if held is None or held.base is not base:
        raw = pickle.dumps(base)
        resolved = pickle.loads(raw)
        OmegaConf.resolve(resolved)
        links: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
            elif isinstance(node, str) and "${" in node:
                links.append(node)

        walk(OmegaConf.to_container(base, resolve=False))
        held = _BASES[id(base)] = _Held(base, raw, pickle.dumps(resolved), "\n".join(links))
    return held


def make_cfg(base: Any, overrides: list[str]) -> Any:
    """`base` with `overrides` merged in (a new config; `base` is untouched), its
    interpolations resolved: the engine reads the config thousands of times a case, and a
    resolved node is read several times faster. The values are those of the merge: each
    `key=value` is assigned to a copy of `base` through the schema's validation, as
    OmegaConf.merge does, at half its cost. The copy is of the base resolved once, unless an
    override is named by one of the base's interpolations (run_dir: checkpoint.dir follows
    it) or brings its own: then of the base as given, resolved after the assignments
    (test_equivalence.py checks both against Hydra's compose)."""
    held = _held(base)
    items = [(item.split("=", 1)[0], item) for item in overrides]
    stale = any(key.rsplit(".", 1)[-1] in held.links or "${" in item for key, item in items)
    cfg = pickle.loads(held.raw if stale else held.resolved)
    for key, item in items:
        OmegaConf.update(cfg, key, OmegaConf.select(_override(item), key), merge=True)
    if stale:
        OmegaConf.resolve(cfg)
    return cfg


#: The equivalence grid's model: 8 layers, so 4 ranks x 2 virtual stages fit.
GRID = [*TINY[1:], "model.hidden=[5,9,4,8,3,6,7]"]


def grid_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, float]:
    """For each case: one pipeline step (or several) vs plain single-device PyTorch."""
    base = load_config(GRID)
    errors: dict[str, float] = {}
    for case in cases:
        cfg = make_cfg(base, case["overrides"])
        if case.get("csv_of"):  # schedule=csv: this schedule written as torch's file, read back
            cfg = make_cfg(cfg, [f"schedule.path={_csv_file(cfg, world, case['csv_of'])}"])
        if case.get("steps", 0):
            errors[case["id"]] = _steps_error(cfg, rank, world, case["steps"])
        else:
            errors[case["id"]] = _grad_error(cfg, rank, world)
    return errors


def _csv_file(cfg: Any, world: int, name: str) -> str:
    """`name`'s order for this run in torch.distributed.pipelining's compute-only CSV, in a
    temporary file of this rank's (the same text on every rank)."""
    import tempfile

    from splitgraph.schedule import build_schedule
    from splitgraph.schedule.interop import to_csv

    m, v = int(cfg.pipeline.microbatches), int(cfg.schedule.virtual_stages)
    text = to_csv(build_schedule(name, world, m, v))
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False, newline="") as f:
        f.write(text)
    return f.name


def _batch(cfg: Any, dtype: torch.dtype, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset(cfg.data, Workload.of(cfg)).to(dtype, "cpu")
    idx = BatchOrder(ds.num_train, int(cfg.train.batch_size), True, int(cfg.train.seed)).indices(
        step
    )
    return ds.X[idx], ds.y[idx]


#: what the reference depends on -> (its minibatch, its gradients): see _reference
_REFERENCES: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = {}


def _reference(cfg: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The first minibatch and the single-device gradients on it, computed once per rank for
    each model, data, minibatch, runtime and weight decay: a grid's cases differ mostly in
    schedule, partition and m, which the reference does not read."""
    key = repr(
        (str(cfg.model), str(cfg.data), str(cfg.train), str(cfg.runtime), cfg.optim.weight_decay)
    )
    if key not in _REFERENCES:
        x, y = _batch(cfg, dtype)
        _REFERENCES[key] = (x, y, reference_grads(cfg, x, y, dtype))
    x, y, grads = _REFERENCES[key]
    return x.clone(), y.clone(), grads


def _grad_error(cfg: Any, rank: int, world: int) -> float:
    dtype = torch_dtype(cfg.runtime.dtype)
    engine = PipelineEngine(Workload.of(cfg), rank, world)
    x, y, want = _reference(cfg, dtype)
    engine.forward_backward(x, y)
    got = {k: p.grad for k, p in engine.named_parameters().items()}
    return max_rel_err(got, want)


def _steps_error(cfg: Any, rank: int, world: int, steps: int) -> float:
    """Weights after `steps` optimizer steps on successive minibatches."""
    dtype = torch_dtype(cfg.runtime.dtype)
    engine = PipelineEngine(Workload.of(cfg), rank, world)
    seq = plain_mlp(cfg, dtype)
    params = global_names(seq)
    opt_name = str(cfg.optim.name.value)
    if opt_name == "sgd":
        opt = torch.optim.SGD(
            params.values(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
        )
    else:
        opt = torch.optim.Adam(
            params.values(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
        )
    task = str(cfg.model.task.value)
    for step in range(steps):
        x, y = _batch(cfg, dtype, step)
        engine.step(x, y)
        opt.zero_grad()
        objective(seq, x, y, task, float(cfg.optim.weight_decay)).backward()
        opt.step()
    got = {k: p.detach() for k, p in engine.named_parameters().items()}
    return max_rel_err(got, {k: p.detach() for k, p in params.items()})


def failing_worker(rank: int, world: int, fail_rank: int, steps: int) -> str:
    """Train `steps` steps; `fail_rank` raises inside the schedule of step 1."""
    cfg = load_config(TINY + ["pipeline.microbatches=4"])
    engine = PipelineEngine(Workload.of(cfg), rank, world)
    x, y = _batch(cfg, torch.float32)
    for step in range(steps):
        engine.step(x, y, fail_at=3 if (rank == fail_rank and step == 1) else None)
    return "finished"


def stalled_worker(rank: int, world: int, stall_rank: int) -> str:
    """`stall_rank` never starts its step; the others must give up at the group timeout
    (runtime.timeout bounds the engine's channel groups: 3 s, as the test's process group)."""
    import time

    cfg = load_config(TINY + ["pipeline.microbatches=2", "runtime.timeout=3"])
    engine = PipelineEngine(Workload.of(cfg), rank, world)
    x, y = _batch(cfg, torch.float32)
    if rank == stall_rank:
        time.sleep(3600)
    engine.step(x, y)
    return "finished"


def memory_worker(rank: int, world: int, overrides: list[str]) -> dict[str, Any]:
    """Peak saved-activation bytes measured on this rank for one step."""
    cfg = load_config(TINY + overrides)
    engine = PipelineEngine(Workload.of(cfg), rank, world)
    x, y = _batch(cfg, torch_dtype(cfg.runtime.dtype))
    engine.forward_backward(x, y)
    assert engine.meter is not None
    return {
        "peak": engine.meter.peak,
        "current": engine.meter.current,
        "stages": sorted(engine.stages),
    }


def precision_worker(rank: int, world: int, cases: list[list[str]]) -> list[dict[str, Any]]:
    """bf16 autocast / staged transport: gradients vs the float32 reference, and dtypes seen."""
    out = []
    base = load_config(GRID)
    for overrides in cases:
        cfg = make_cfg(base, overrides)
        engine = PipelineEngine(Workload.of(cfg), rank, world)
        dtype = torch_dtype(cfg.runtime.dtype)  # float32 master weights under bf16 autocast
        x, y = _batch(cfg, dtype)
        seen: list[torch.dtype] = []

        def record(ts: list[Any], post: Any = engine.p2p.post, seen: list = seen) -> Any:
            seen.extend(t.tensor.dtype for t in ts)
            return post(ts)

        engine.p2p.post = record  # type: ignore[method-assign]
        engine.forward_backward(x, y)
        got = {k: p.grad for k, p in engine.named_parameters().items()}
        ref_cfg = make_cfg(cfg, [f"runtime.dtype={str(dtype).removeprefix('torch.')}"])
        out.append(
            {
                "err": max_rel_err(got, reference_grads(ref_cfg, x, y, dtype)),
                "param_dtypes": sorted({str(p.dtype) for p in engine.parameters()}),
                "grad_dtypes": sorted({str(p.grad.dtype) for p in engine.parameters()}),
                "transfer_dtypes": sorted({str(d) for d in seen}),
                "p2p": type(engine.p2p).__name__,
                "grads": {k: g.detach().float().cpu() for k, g in got.items()},
            }
        )
    return out


def saved_peak_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, list[int]]:
    """For each case, one step: [peak saved bytes, bytes still saved after it] on this rank."""
    base = load_config(TINY)
    out = {}
    batches: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for case in cases:
        cfg = make_cfg(base, case["overrides"])
        engine = PipelineEngine(Workload.of(cfg), rank, world)
        key = (str(cfg.model.task), str(cfg.runtime.dtype))
        if key not in batches:
            batches[key] = _batch(cfg, torch_dtype(cfg.runtime.dtype))
        x, y = batches[key]
        engine.forward_backward(x, y)
        assert engine.meter is not None
        out[case["id"]] = [engine.meter.peak, engine.meter.current]
    return out


def step_sums(rank: int, world: int) -> list[list[float]]:
    """The step's scalar sum (runtime/stepsum.py) over several rounds, values that depend on
    the rank and the round; the star leaves its input untouched."""
    from splitgraph.runtime.stepsum import StepSum

    star = StepSum("gloo", torch.device("cpu"))
    assert star.star
    out = []
    for rnd in range(5):
        mine = torch.tensor(
            [0.1 * rank, rank + rnd, 1e-17 * rank, float(rank == 0)], dtype=torch.float64
        )
        keep = mine.clone()
        out.append(star(mine).tolist())
        assert torch.equal(mine, keep)
    return out


def environ_worker(rank: int, world: int, name: str) -> str | None:
    """The value of environment variable `name` in this rank."""
    import os

    return os.environ.get(name)


def schedule_agreement_worker(rank: int, world: int, names: list[list[str]]) -> list[str]:
    """Per case, `same_schedule_everywhere` on `names[case][rank]`: "agree" or its error."""
    from splitgraph.errors import ConfigError
    from splitgraph.planner.check import same_schedule_everywhere
    from splitgraph.schedule import build_schedule

    out = []
    for per_rank in names:
        try:
            same_schedule_everywhere(build_schedule(per_rank[rank], world, 4))
            out.append("agree")
        except ConfigError as e:
            out.append(str(e))
    return out
