"""Training checkpoints with torch.distributed.checkpoint (DCP), under global parameter names,
so a run saved on 2 stages resumes on 4, on another partition, or on one device.

Layout of `checkpoint.dir` (default `<run dir>/checkpoints`, the same across torchrun restarts):

    step_00000100/          a committed checkpoint: the state after 100 steps
        __0_0.distcp ...    each rank's tensors (DCP)
        .metadata           DCP's index (read by safeload.read_metadata, never plain pickle)
        splitgraph.json     written last, by rank 0: step, data position, config hash, plan
    .step_00000200.tmp/     a save in progress, or one a crash cut short: never read
    .step_00000200.old/     a replaced checkpoint of the same step, for a moment: never read

The tensors, named the same whichever rank held them:

    model.layers.3.weight                  the parameter
    optim.layers.3.weight.momentum_buffer  optimizer state keyed by the parameter's name
    optim.layers.3.weight.exp_avg  ...     (not by its index in one rank's optimizer)
    rng.rank0.cpu  (rng.rank0.cuda)        each rank's torch RNG state

The data position needs no tensor: minibatch `step` is `BatchOrder(...).indices(step)`, a
function of the seed and the step alone.

Saving is atomic: every rank writes into `.step_N.tmp/` (a DCP collective: rank 0 writes
`.metadata` once all ranks have written), rank 0 then writes and fsyncs `splitgraph.json` and
renames the directory to `step_N`. A crash before the rename leaves no `step_N`, and the previous
checkpoint untouched. `checkpoint.resume=auto` takes the newest `step_N` holding the marker.

Loading happens on every rank before the process group exists (DCP with `no_dist`): each rank
reads just the tensors of the layers it holds *now*; the layout it was saved with is irrelevant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor

from splitgraph.errors import CheckpointError
from splitgraph.model import layer_dims

# DCP (and safeload, built on it) is imported where a checkpoint is read or written: importing
# it costs about as much as `import torch`, and a run that starts afresh needs it only for its
# first save, after training has begun.
if TYPE_CHECKING:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger("splitgraph")

MARKER = "splitgraph.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
#: the config that must not change across a resume (checkpoint.strict); everything else may:
#: the layout (stages, partition, schedule, microbatches), train.steps, the runtime.
IDENTITY = ("model", "data", "optim", "train.batch_size", "train.seed", "runtime.dtype")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# -- what a checkpoint must match ------------------------------------------------------------


def identity(cfg: Any) -> dict[str, Any]:
    """The IDENTITY part of the config, flattened to dotted keys."""
    out: dict[str, Any] = {}
    for key in IDENTITY:
        node = OmegaConf.select(cfg, key)
        value = (
            OmegaConf.to_container(node, resolve=True, enum_to_str=True)
            if OmegaConf.is_config(node)
            else (node.value if hasattr(node, "value") else node)
        )
        _flatten(key, value, out)
    return out


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def config_hash(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(ident), sort_keys=True).encode()).hexdigest()[:16]


def param_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole model under its global name, from the config alone."""
    dims = layer_dims(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(len(dims) - 1):
        shapes[f"layers.{i}.weight"] = (dims[i + 1], dims[i])
        if cfg.model.bias:
            shapes[f"layers.{i}.bias"] = (dims[i + 1],)
    return shapes


def names_held(cfg: Any, plan: Any, rank: int) -> list[str]:
    """The global names of the parameters `rank` holds under `plan`."""
    held = {i for s in plan.stages_of(rank) for i in plan.stage_range(s)}
    return [n for n in param_shapes(cfg) if int(n.split(".")[1]) in held]


def check_fits(
    found: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Refuse a checkpoint whose parameters differ from the model's, naming each mismatch."""
    problems = [f"{n} is missing" for n in want if n not in found]
    problems += [
        f"{n} has shape {tuple(found[n])}, the model {tuple(want[n])}"
        for n in want
        if n in found and tuple(found[n]) != tuple(want[n])
    ]
    problems += [f"{n} is not in this model" for n in found if n not in want]
    if problems:
        raise CheckpointError(
            f"{source} does not fit this model ({len(problems)} mismatched parameters): "
            + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else "")
            + ". Check model.hidden, model.bias, data.features and data.outputs."
        )


def load_model_pt(path: str | Path, cfg: Any) -> dict[str, Tensor]:
    """`checkpoint.init_from`: a consolidated model.pt, weights_only, checked against the model."""
    from splitgraph.safeload import load_tensor_dict

    source = f"checkpoint.init_from={str(path)!r}"
    state = load_tensor_dict(path, source)
    check_fits({k: tuple(v.shape) for k, v in state.items()}, param_shapes(cfg), source)
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{source}: {bad} are not floating-point tensors.")
    return state


# -- finding checkpoints ---------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]


def _committed(path: Path) -> Checkpoint | None:
    match = _STEP_DIR.match(path.name)
    if not match or not (path / MARKER).is_file() or not (path / ".metadata").is_file():
        return None
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("step") != int(match[1]):
        return None
    return Checkpoint(path, int(match[1]), meta)


def list_checkpoints(directory: str | Path) -> list[Checkpoint]:
    """The committed checkpoints in `directory`, oldest first (temporary ones are skipped)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [_committed(p) for p in d.iterdir() if p.is_dir()]
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def find_resume(cfg: Any) -> tuple[Checkpoint, Metadata] | None:
    """The checkpoint `checkpoint.resume` asks for, checked against this config, or None.

    `auto`: the newest committed one in `checkpoint.dir` (none: start afresh). A committed
    checkpoint whose metadata is unreadable or refused is skipped with a warning, in favour of
    the one before it. A path: that checkpoint, or the newest inside that directory.
    """
    mode = str(cfg.checkpoint.resume).strip()
    if mode == "never":
        return None
    if mode == "auto":
        candidates = list_checkpoints(cfg.checkpoint.dir)
        for ck in reversed(candidates):
            try:
                meta = read_metadata(ck.path)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", ck.path, e)
                continue
            _check_matches(ck, meta, cfg)
            return ck, meta
        return None
    path = Path(mode)
    one = _committed(path)
    if one is None:
        inside = list_checkpoints(path)
        if not inside:
            what = "does not exist" if not path.exists() else "holds no committed checkpoint"
            raise CheckpointError(
                f"checkpoint.resume={mode!r} {what} (a step_N directory with {MARKER}, or a "
                "directory of them). Use checkpoint.resume=auto or never."
            )
        one = inside[-1]
    meta = read_metadata(one.path)
    _check_matches(one, meta, cfg)
    return one, meta


def read_metadata(path: Path) -> Metadata:
    """DCP's index of a checkpoint (safeload: never plain pickle)."""
    from splitgraph.safeload import read_metadata as read

    return read(path)


def _check_matches(ck: Checkpoint, meta: Metadata, cfg: Any) -> None:
    ident = identity(cfg)
    if cfg.checkpoint.strict and ck.meta.get("config_hash") != config_hash(ident):
        saved = ck.meta.get("identity", {})
        diff = [
            f"{k}: saved {saved.get(k)!r}, now {ident.get(k)!r}"
            for k in sorted(set(saved) | set(ident))
            if saved.get(k) != ident.get(k)
        ]
        raise CheckpointError(
            f"checkpoint {ck.path} was saved with another configuration: "
            + ("; ".join(diff) or "(its config hash differs)")
            + ". Resume with the same model, data and optimizer settings, or set "
            "checkpoint.strict=false to continue anyway, or checkpoint.resume=never to start "
            "afresh."
        )
    shapes = {
        k[len("model.") :]: tuple(v.size)
        for k, v in meta.state_dict_metadata.items()
        if k.startswith("model.")
    }
    check_fits(shapes, param_shapes(cfg), f"checkpoint {ck.path}")


# -- reading one rank's share ------------------------------------------------------------------


@dataclass
class RankState:
    checkpoint: Checkpoint
    model: dict[str, Tensor]
    optim: dict[str, dict[str, Tensor]]
    rng: dict[str, Tensor]


def read_rank_state(ck: Checkpoint, meta: Metadata, names: Iterable[str], rank: int) -> RankState:
    """The tensors of parameters `names` (and their optimizer state), and this rank's RNG state
    (rank 0's if the checkpoint had fewer ranks), read without any process group."""
    import torch.distributed.checkpoint as dcp

    from splitgraph.safeload import SafeReader

    entries = meta.state_dict_metadata
    names = list(names)
    want: dict[str, Tensor] = {}
    for n in names:
        for key, entry in entries.items():
            if key == f"model.{n}" or key.startswith(f"optim.{n}."):
                want[key] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    rng = (
        f"rng.rank{rank}."
        if any(k.startswith(f"rng.rank{rank}.") for k in entries)
        else ("rng.rank0.")
    )
    for key, entry in entries.items():
        if key.startswith(rng):
            want[key] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    try:
        with _single_process_ok():
            dcp.load(want, storage_reader=SafeReader(ck.path), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {ck.path} could not be read: {e}") from e
    state = RankState(ck, {}, {}, {})
    for key, t in want.items():
        if key.startswith("model."):
            state.model[key[len("model.") :]] = t
        elif key.startswith("optim."):
            for n in names:
                if key.startswith(f"optim.{n}."):
                    state.optim.setdefault(n, {})[key[len(f"optim.{n}.") :]] = t
        else:
            state.rng[key[len(rng) :]] = t
    return state


def apply_state(engine: Any, state: RankState, cfg: Any) -> None:
    """Copy a RankState into the engine: weights, optimizer state, RNG."""
    named = engine.named_parameters()
    engine.load_state_dict(state.model, source=f"checkpoint {state.checkpoint.path}")
    same_optim = state.checkpoint.meta.get("optimizer") == str(cfg.optim.name.value)
    if state.optim and not same_optim:
        log.warning(
            "checkpoint %s holds %s state; this run uses optim=%s: its state starts afresh",
            state.checkpoint.path,
            state.checkpoint.meta.get("optimizer"),
            cfg.optim.name.value,
        )
    elif state.optim:
        opt = engine.optimizer
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        sd = opt.state_dict()
        sd["state"] = {index[id(named[n])]: dict(st) for n, st in state.optim.items()}
        opt.load_state_dict(sd)
    if "cpu" in state.rng:
        torch.set_rng_state(state.rng["cpu"])
    if "cuda" in state.rng and engine.device.type == "cuda":
        torch.cuda.set_rng_state(state.rng["cuda"], engine.device)


# -- saving ----------------------------------------------------------------------------------


def rank_tensors(engine: Any, rank: int) -> dict[str, Tensor]:
    """This rank's share of a checkpoint, under global names."""
    out: dict[str, Tensor] = {}
    for n, p in engine.named_parameters().items():
        out[f"model.{n}"] = p.detach()
        for k, v in engine.optimizer.state.get(p, {}).items():
            out[f"optim.{n}.{k}"] = v.detach() if isinstance(v, Tensor) else torch.as_tensor(v)
    out[f"rng.rank{rank}.cpu"] = torch.get_rng_state()
    if engine.device.type == "cuda":
        out[f"rng.rank{rank}.cuda"] = torch.cuda.get_rng_state(engine.device)
    return out


def marker(cfg: Any, engine: Any, step: int, steps_per_epoch: int, world_size: int) -> dict:
    """splitgraph.json: what a resume checks and a person reads."""
    ident = identity(cfg)
    epoch, in_epoch = divmod(step, max(1, steps_per_epoch))
    return {
        "format": FORMAT,
        "step": step,
        "data_position": {
            "next_step": step,
            "epoch": epoch,
            "batch_in_epoch": in_epoch,
            "samples_seen": step * int(cfg.train.batch_size),
        },
        "config_hash": config_hash(ident),
        "identity": ident,
        "optimizer": str(cfg.optim.name.value),
        "world_size": world_size,
        "plan": engine.plan.to_dict(),
        "schedule": engine.schedule.name,
        "microbatches": len(engine.sizes),
        "torch": torch.__version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save(
    engine: Any,
    directory: str | Path,
    step: int,
    meta: dict[str, Any] | None,
    keep: int,
    rank: int,
    world_size: int,
    writer: type[FileSystemWriter] | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically; every rank calls it (rank 0 passes `meta`).
    `writer`: DCP's FileSystemWriter unless given (the fault tests pass one that dies)."""
    import torch.distributed.checkpoint as dcp

    writer = writer or dcp.FileSystemWriter
    distributed = world_size > 1 and dist.is_initialized()
    d = Path(directory)
    final = d / step_dir_name(step)
    tmp = d / f".{final.name}.tmp"
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        for stale in [*d.glob(".step_*.tmp"), *d.glob(".step_*.old")]:  # cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
    if distributed:
        dist.barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    with _single_process_ok():
        dcp.save(rank_tensors(engine, rank), storage_writer=writer(tmp), no_dist=not distributed)
    if rank == 0:
        _write_synced(tmp / MARKER, json.dumps(meta, indent=2) + "\n")
        old = d / f".{final.name}.old"
        if final.exists():  # an earlier run's (checkpoint.resume=never): this one replaces it
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(d)
        shutil.rmtree(old, ignore_errors=True)
        for old in list_checkpoints(d)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
