"""Training checkpoints with torch.distributed.checkpoint (DCP), under global parameter names,
so a run saved on 2 stages resumes on 4, on another partition, or on one device.

Layout of `checkpoint.dir` (default `<run dir>/checkpoints`, the same across torchrun restarts):

    step_00000100/          a committed checkpoint: the state after 100 steps
        __0_0.distcp ...    each rank's tensors (DCP)
        .metadata           DCP's index (read by safeload.read_metadata, never plain pickle)
        splitgraph.json     written last, by rank 0: step, data position, config hash, plan,
                            each file's size and SHA-256
    .step_00000200.tmp/     a save in progress, or one a crash cut short: never read
    .step_00000200.old/     a replaced or pruned checkpoint, for a moment: never read
    step_00000300.damaged/  a checkpoint that failed its integrity check, set aside: never read

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
checkpoint untouched. `checkpoint.resume=auto` takes the newest intact `step_N`.

Integrity: each rank hashes (SHA-256) its shard file while DCP writes it (the bytes pass through
a hashing stream, no second read), rank 0 gathers the digests and records them in
`splitgraph.json` with every file's size and the digest of `.metadata`; the marker carries a
digest of itself. Before a checkpoint is read, every rank checks all of it (sizes, then digests):
each rank reaches the same verdict from the same files, so the ranks agree on which checkpoint to
load before any process group exists. A damaged one (a file missing, truncated, changed; the
marker missing or garbled) is never loaded: under `resume=auto` rank 0 names it in a warning,
renames it `step_N.damaged` (never overwritten, never deleted) and the newest intact one before
it is used; an explicit `resume=<path>` refuses with the reason. Checkpoints of format 1 (no
digests) load with a warning that they were not verified.

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
from torch import Tensor

from splitgraph.errors import CheckpointError
from splitgraph.model import layer_dims

if TYPE_CHECKING:
    from splitgraph.config import CheckpointConfig, ModelConfig, OptimName

# DCP (and safeload, built on it) is imported where a checkpoint is read or written: importing
# it costs about as much as `import torch`, and a run that starts afresh needs it only for its
# first save, after training has begun.
if TYPE_CHECKING:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger("splitgraph")

MARKER = "splitgraph.json"
FORMAT = 2  # 2: files and their SHA-256 in the marker
HASH = "sha256"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
#: the config that must not change across a resume (checkpoint.strict); everything else may:
#: the layout (stages, partition, schedule, microbatches), train.steps, the runtime.
IDENTITY = ("model", "data", "optim", "train.batch_size", "train.seed", "runtime.dtype")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# -- what a checkpoint must match ------------------------------------------------------------


def identity(cfg: Any) -> dict[str, Any]:
    """The IDENTITY part of the config, flattened to dotted keys."""
    from splitgraph.config import as_container

    tree = as_container(cfg)
    out: dict[str, Any] = {}
    for key in IDENTITY:
        value: Any = tree
        for part in key.split("."):
            value = value[part]
        _flatten(key, value, out)
    out.pop("data.max_memory", None)  # a bound on loading, not what is trained on
    return out


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def config_hash(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(ident), sort_keys=True).encode()).hexdigest()[:16]


def param_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole model under its global name, from its config alone."""
    dims = layer_dims(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(len(dims) - 1):
        shapes[f"layers.{i}.weight"] = (dims[i + 1], dims[i])
        if model.bias:
            shapes[f"layers.{i}.bias"] = (dims[i + 1],)
    return shapes


def names_held(model: ModelConfig, plan: Any, rank: int) -> list[str]:
    """The global names of the parameters `rank` holds under `plan`."""
    held = {i for s in plan.stages_of(rank) for i in plan.stage_range(s)}
    return [n for n in param_shapes(model) if int(n.split(".")[1]) in held]


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


def load_model_pt(path: str | Path, model: ModelConfig) -> dict[str, Tensor]:
    """`checkpoint.init_from`: a consolidated model.pt, weights_only, checked against the model."""
    from splitgraph.reliability.safeload import load_tensor_dict

    source = f"checkpoint.init_from={str(path)!r}"
    state = load_tensor_dict(path, source)
    check_fits({k: tuple(v.shape) for k, v in state.items()}, param_shapes(model), source)
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


@dataclass(frozen=True)
class Damaged:
    """A `step_N` directory that cannot be a checkpoint: what is wrong with it."""

    path: Path
    reason: str


def _inspect(path: Path) -> Checkpoint | Damaged | None:
    """A committed checkpoint, a damaged one, or None for anything not named `step_N`.

    Only a rename after the marker was written makes a `step_N` directory, so one without
    its marker, or with a garbled one, was damaged after it was committed."""
    match = _STEP_DIR.match(path.name)
    if not match or not path.is_dir():
        return None
    step = int(match[1])
    if not (path / MARKER).is_file():
        return Damaged(path, f"{MARKER} is missing")
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        return Damaged(path, f"{MARKER} is unreadable or not JSON ({e})")
    if not isinstance(meta, dict) or meta.get("step") != step:
        got = meta.get("step") if isinstance(meta, dict) else type(meta).__name__
        return Damaged(path, f"{MARKER} says step {got!r}, the directory {step}")
    if "marker_sha256" in meta and meta["marker_sha256"] != _marker_digest(meta):
        return Damaged(path, f"{MARKER} was changed after it was written (its digest differs)")
    if not (path / ".metadata").is_file():
        return Damaged(path, ".metadata is missing")
    return Checkpoint(path, step, meta)


def scan(directory: str | Path) -> tuple[list[Checkpoint], list[Damaged]]:
    """The committed checkpoints in `directory` (oldest first) and the damaged `step_N`
    directories (their files are not hashed here: see `verify`)."""
    d = Path(directory)
    if not d.is_dir():
        return [], []
    found = [_inspect(p) for p in d.iterdir()]
    good = sorted((c for c in found if isinstance(c, Checkpoint)), key=lambda c: c.step)
    bad = sorted((c for c in found if isinstance(c, Damaged)), key=lambda c: c.path.name)
    return good, bad


def list_checkpoints(directory: str | Path) -> list[Checkpoint]:
    """The committed checkpoints in `directory`, oldest first (temporary and damaged ones
    are skipped)."""
    return scan(directory)[0]


def _committed(path: Path) -> Checkpoint | None:
    found = _inspect(path)
    return found if isinstance(found, Checkpoint) else None


def verify(ck: Checkpoint) -> str | None:
    """None if every file of `ck` has the size and SHA-256 recorded when it was written,
    else what is wrong. Format 1 checkpoints record nothing: None (see `verified`)."""
    files = ck.meta.get("files")
    if files is None:
        return None
    if not isinstance(files, dict) or ".metadata" not in files:
        return f"{MARKER} has no usable file list"
    for name, rec in sorted(files.items()):
        try:
            size = (ck.path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != rec.get("bytes"):
            cut = " (truncated)" if size < rec.get("bytes", 0) else ""
            return f"{name} is {size} bytes, {rec.get('bytes')} when written{cut}"
    for name, rec in sorted(files.items()):
        try:
            digest, _ = hash_file(ck.path / name)
        except OSError as e:
            return f"{name} could not be read ({e})"
        if digest != rec.get(HASH):
            return f"{name} does not match its recorded {HASH} (its bytes changed after saving)"
    return None


def verified(ck: Checkpoint) -> bool:
    """Whether `ck` records digests to verify (format 2 and later)."""
    return isinstance(ck.meta.get("files"), dict)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint `step_N` to `step_N.damaged` (or `.damaged-2`, ...): out
    of every listing and of `keep`'s pruning, never overwritten, never deleted."""
    for i in range(1, 1000):
        aside = path.with_name(f"{path.name}.damaged" + (f"-{i}" if i > 1 else ""))
        if aside.exists():
            continue
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # another rank of this job moved it first
            return aside
        except OSError:
            if aside.exists():
                continue
            raise
        return aside
    raise CheckpointError(f"could not set {path} aside: 999 damaged copies already exist")


def _load_checked(ck: Checkpoint) -> tuple[Metadata | None, str | None]:
    """(metadata, None) for an intact checkpoint, (None, reason) for a damaged one."""
    reason = verify(ck)
    if reason is not None:
        return None, reason
    try:
        meta = read_metadata(ck.path)
    except CheckpointError as e:
        return None, str(e)
    files = ck.meta.get("files")
    if isinstance(files, dict):
        stray = sorted(
            {str(i.relative_path) for i in (meta.storage_data or {}).values()} - set(files)
        )
        if stray:
            return None, f".metadata names files not recorded at commit: {stray}"
    return meta, None


def find_resume(
    ck_cfg: CheckpointConfig,
    model: ModelConfig,
    ident: Mapping[str, Any],
    quarantine: bool = True,
) -> tuple[Checkpoint, Metadata] | None:
    """The checkpoint `checkpoint.resume` asks for, verified and checked against this run's
    `identity` (with checkpoint.strict) and its model's parameter shapes, or None.

    `auto`: the newest intact one in `checkpoint.dir` (none: start afresh, with a warning
    if damaged ones were skipped). Damaged ones are never loaded; with `quarantine` (rank 0)
    they are named in a warning and set aside, other ranks skip them silently (every rank
    reaches the same verdict from the same files). A path: that checkpoint, or the newest
    inside that directory; if it is damaged, a CheckpointError with the reason (an explicit
    path is not moved: it may not be this run's).
    """
    mode = ck_cfg.resume.strip()
    if mode == "never":
        return None
    if mode == "auto":
        candidates, damaged = scan(ck_cfg.dir)
        skipped = []
        for bad in damaged:
            skipped.append(bad.path.name)
            _set_aside(bad.path, bad.reason, quarantine)
        for ck in reversed(candidates):
            meta, reason = _load_checked(ck)
            if reason is not None:
                skipped.append(ck.path.name)
                _set_aside(ck.path, reason, quarantine)
                continue
            _warn_unverified(ck, quarantine)
            _check_matches(ck, meta, ident, model, ck_cfg.strict)
            if skipped and quarantine:
                log.warning(
                    "resuming from %s instead: the newest intact checkpoint (the steps after "
                    "it are trained again)",
                    ck.path,
                )
            return ck, meta
        if skipped and quarantine:
            log.warning(
                "no intact checkpoint left in %s (set aside: %s): training starts from step 0",
                ck_cfg.dir,
                ", ".join(skipped),
            )
        return None
    path = Path(mode)
    one = _inspect(path)
    if isinstance(one, Damaged):
        raise _refuse(mode, one.reason, list_checkpoints(path.parent))
    if one is None:
        candidates, damaged = scan(path)
        newest = max([*candidates, *damaged], key=_step_of, default=None)
        if newest is None:
            what = "does not exist" if not path.exists() else "holds no committed checkpoint"
            raise CheckpointError(
                f"checkpoint.resume={mode!r} {what} (a step_N directory with {MARKER}, or a "
                "directory of them). Use checkpoint.resume=auto or never."
            )
        if isinstance(newest, Damaged):
            raise _refuse(str(newest.path), newest.reason, candidates)
        one = newest
    meta, reason = _load_checked(one)
    if reason is not None:
        raise _refuse(str(one.path), reason, list_checkpoints(one.path.parent))
    _warn_unverified(one, quarantine)
    _check_matches(one, meta, ident, model, ck_cfg.strict)
    return one, meta


def integrity_note(path: str | Path | None) -> str | None:
    """What a message may say about the checkpoint at `path`, checked now: intact (its files
    match the digests recorded when it was written), damaged, or unverifiable."""
    if path is None:
        return None
    found = _inspect(Path(path))
    if not isinstance(found, Checkpoint):
        why = found.reason if isinstance(found, Damaged) else "it is gone"
        return f"the last checkpoint, {path}, is damaged ({why}): do not resume from it"
    reason = verify(found)
    if reason is not None:
        return f"the last checkpoint, {path}, is damaged ({reason}): do not resume from it"
    if not verified(found):
        return f"the last checkpoint is {path} (not verified: it records no digests)"
    return (
        f"the last checkpoint, {path}, is intact (its files match the digests recorded when "
        "it was written, checked now)"
    )


def _step_of(c: Checkpoint | Damaged) -> int:
    return c.step if isinstance(c, Checkpoint) else int(c.path.name.split("_")[1])


def _set_aside(path: Path, reason: str, quarantine: bool) -> None:
    if not quarantine:
        return
    aside = set_aside(path)
    log.warning("checkpoint %s is damaged (%s): not loaded, moved aside to %s", path, reason, aside)


def _refuse(path: str, reason: str, others: list[Checkpoint] | None) -> CheckpointError:
    good = [c for c in others or [] if str(c.path) != path and verify(c) is None]
    hint = f" The newest intact one there is {good[-1].path}." if good else ""
    return CheckpointError(
        f"checkpoint.resume={path} refused: it is damaged ({reason}); it was not loaded, "
        f"and left where it is.{hint} Use checkpoint.resume=<another step_N>, auto or never."
    )


def _warn_unverified(ck: Checkpoint, speak: bool) -> None:
    if speak and not verified(ck):
        log.warning(
            "checkpoint %s was written before checkpoints recorded their digests (format %s): "
            "loaded without an integrity check",
            ck.path,
            ck.meta.get("format"),
        )


def read_metadata(path: Path) -> Metadata:
    """DCP's index of a checkpoint (safeload: never plain pickle)."""
    from splitgraph.reliability.safeload import read_metadata as read

    return read(path)


def _check_matches(
    ck: Checkpoint, meta: Metadata, ident: Mapping[str, Any], model: ModelConfig, strict: bool
) -> None:
    if strict and ck.meta.get("config_hash") != config_hash(ident):
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
    check_fits(shapes, param_shapes(model), f"checkpoint {ck.path}")


# -- reading one rank's share ------------------------------------------------------------------


@dataclass
class RankState:
    checkpoint: Checkpoint
    model: dict[str, Tensor]
    optim: dict[str, dict[str, Tensor]]
    rng: dict[str, Tensor]


def read_rank_state(ck: Checkpoint, meta: Metadata, names: Iterable[str], rank: int) -> RankState:
    """The tensors of parameters `names` (and their optimizer state), and this rank's RNG state
    (rank 0's, with a warning, if the checkpoint had fewer ranks), read without any process
    group."""
    import torch.distributed.checkpoint as dcp

    from splitgraph.reliability.safeload import SafeReader

    entries = meta.state_dict_metadata
    names = list(names)
    want: dict[str, Tensor] = {}
    for n in names:
        for key, entry in entries.items():
            if key == f"model.{n}" or key.startswith(f"optim.{n}."):
                want[key] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    rng = f"rng.rank{rank}."
    if not any(k.startswith(rng) for k in entries):
        rng = "rng.rank0."
        saved = ck.meta.get("world_size", "fewer")
        log.warning(
            "rank %d: checkpoint %s (saved on %s ranks) holds no RNG state for rank %d; it "
            "takes rank 0's. splitgraph draws nothing from torch's global generator while "
            "training (data order and initial weights have seeded generators of their own), "
            "so the weights are unaffected; code that does (dropout, say) would repeat rank 0's "
            "random stream on this rank",
            rank,
            ck.path,
            saved,
            rank,
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


def apply_state(engine: Any, state: RankState, optimizer: OptimName) -> None:
    """Copy a RankState into the engine: weights, optimizer state, RNG."""
    named = engine.named_parameters()
    engine.load_state_dict(state.model, source=f"checkpoint {state.checkpoint.path}")
    same_optim = state.checkpoint.meta.get("optimizer") == optimizer.value
    if state.optim and not same_optim:
        log.warning(
            "checkpoint %s holds %s state; this run uses optim=%s: its state starts afresh",
            state.checkpoint.path,
            state.checkpoint.meta.get("optimizer"),
            optimizer.value,
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


def marker(
    ident: Mapping[str, Any], engine: Any, step: int, steps_per_epoch: int, world_size: int
) -> dict:
    """splitgraph.json: what a resume checks (the run's `identity`) and a person reads; the
    batch and the optimizer are the engine's."""
    work = engine.work
    epoch, in_epoch = divmod(step, max(1, steps_per_epoch))
    return {
        "format": FORMAT,
        "step": step,
        "data_position": {
            "next_step": step,
            "epoch": epoch,
            "batch_in_epoch": in_epoch,
            "samples_seen": step * work.batch_size,
        },
        "config_hash": config_hash(ident),
        "identity": ident,
        "optimizer": str(work.optim.name.value),
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
    """Write the checkpoint of `step` atomically, with the digest of every file; every rank
    calls it (rank 0 passes `meta`).
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
    storage = writer(tmp)
    hashing = _hashing_file_system()
    storage.fs = hashing  # DCP opens every file through it: digests while writing
    with _single_process_ok():
        dcp.save(rank_tensors(engine, rank), storage_writer=storage, no_dist=not distributed)
    mine = hashing.checked(tmp)
    every: list[Any] = [mine]
    if distributed:
        every = [None] * world_size if rank == 0 else []
        dist.gather_object(mine, every if rank == 0 else None, dst=0)
    if rank == 0:
        files: dict[str, dict[str, Any]] = {}
        for part in every:
            files.update(part)
        for f in tmp.iterdir():  # a file DCP wrote by another path than the stream: read it
            if f.name not in files and f.name != MARKER and f.is_file():
                digest, size = hash_file(f)
                files[f.name] = {HASH: digest, "bytes": size}
        marked = {**(meta or {}), "files": dict(sorted(files.items()))}
        marked["marker_sha256"] = _marker_digest(marked)
        _write_synced(tmp / MARKER, json.dumps(marked, indent=2) + "\n")
        old = d / f".{final.name}.old"
        if final.exists():  # an earlier run's (checkpoint.resume=never): this one replaces it
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(d)
        shutil.rmtree(old, ignore_errors=True)
        for ck in list_checkpoints(d)[:-keep]:  # renamed first: a crash mid-delete leaves
            gone = d / f".{ck.path.name}.old"  # hidden debris, never a damaged step_N
            shutil.rmtree(gone, ignore_errors=True)
            os.rename(ck.path, gone)
            shutil.rmtree(gone, ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


def hash_file(path: str | Path) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file."""
    digest, size = hashlib.new(HASH), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _marker_digest(meta: Mapping[str, Any]) -> str:
    """The digest of the marker's content other than this digest itself."""
    body = {k: v for k, v in meta.items() if k != "marker_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _HashingStream:
    """A binary file whose writes also feed a digest (DCP writes each shard sequentially)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.digest = hashlib.new(HASH)
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self.raw.write(view)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ...
        return getattr(self.raw, name)


def _hashing_file_system() -> Any:
    """DCP's local file system, recording the digest of each file written through it
    (a class made on first use: DCP is imported only where a checkpoint is written)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        """DCP's local file system, recording the digest of each file written through it."""

        def __init__(self) -> None:
            super().__init__()
            self.written: dict[str, _HashingStream] = {}

        @contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                hashing = _HashingStream(stream)
                name = Path(path).name
                # DCP writes `.metadata.tmp` and renames it `.metadata`
                self.written[name[: -len(".tmp")] if name.endswith(".tmp") else name] = hashing
                yield hashing

        def checked(self, directory: Path) -> dict[str, dict[str, Any]]:
            """{file name: {sha256, bytes}} of the files written, each checked against its size
            on disk; a file whose size differs from the bytes seen (a write that bypassed the
            stream) is hashed again from disk, so a digest is never wrong."""
            out = {}
            for name, stream in self.written.items():
                path = directory / name
                size = path.stat().st_size
                if size == stream.size:
                    out[name] = {HASH: stream.digest.hexdigest(), "bytes": size}
                else:
                    log.warning(
                        "checkpoint file %s: %d bytes on disk, %d seen while writing; hashed again "
                        "from disk (a torch change in how DCP writes?)",
                        path,
                        size,
                        stream.size,
                    )
                    digest, size = hash_file(path)
                    out[name] = {HASH: digest, "bytes": size}
            return out

    return HashingFileSystem()


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
