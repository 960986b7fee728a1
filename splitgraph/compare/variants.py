"""The options the harness compares, each turned into a training command line.

Every variant is the harness's training config (model, data, optimizer, ...) plus a few keys
of its own, written as plain Hydra overrides, so its command in the report is exactly what a
user would type:

    full         one device, minibatch B, the whole batch at once (naive, m=1)
    small        one device, minibatch B/k: k times more updates per epoch (lr same, or lr/k)
    accumulate   one device, k micro-steps of B/k summed into one update: 1F1B with m=k on a
                 single rank, which runs F0 B0 F1 B1 ... and so holds one microbatch's
                 activations at a time; the gradient is full's (L is the mean over B)
    recompute    one device, minibatch B, activations recomputed in the backward
                 (schedule.recompute=true)
    data         d replicas of the whole model under torchrun, B/d rows each, gradients
                 summed (parallel.dp=d, one stage): full's update on d devices
    pipeline     p ranks under torchrun, for each chosen schedule and m (and dp replicas of
                 the pipeline: p x dp ranks)
    reference    `full` without the cap: what the others' weights are compared against
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import OmegaConf

from splitgraph.compare.config import dp_grid, pipeline_grid
from splitgraph.config import Workload

#: keys a variant never inherits from the harness's config (the harness sets them)
_OWN = ("run_dir",)


@dataclass(frozen=True)
class Variant:
    name: str  # unique; names the run directory
    kind: str  # full | small | accumulate | recompute | data | pipeline | reference
    label: str  # for tables and legends
    nproc: int
    batch: int
    settings: dict[str, Any] = field(default_factory=dict)  # training keys this variant sets
    phase: str = "epochs"  # "epochs": the epoch budget; "time": the wall-clock budget

    @property
    def capped(self) -> bool:
        return self.settings.get("pipeline.memory_cap") is not None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole (they are one override)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_leaves(cfg: Any) -> dict[str, Any]:
    """The resolved training keys of a config (the `compare:` node and run_dir left out)."""
    tree = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    assert isinstance(tree, dict)
    tree.pop("compare", None)
    for key in _OWN:  # a placeholder, so keys that follow it (checkpoint.dir) still resolve
        tree[key] = f"<{key}>"
    resolved = OmegaConf.to_container(OmegaConf.create(tree), resolve=True, enum_to_str=True)
    assert isinstance(resolved, dict)
    return {k: v for k, v in flatten(resolved).items() if k not in _OWN}


def _interpolations(cfg: Any) -> dict[str, str]:
    tree = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    assert isinstance(tree, dict)
    return {k: v for k, v in flatten(tree).items() if isinstance(v, str) and "${" in v}


def base_settings(cfg: Any, defaults: Any) -> dict[str, Any]:
    """The training keys where the harness's config differs from `splitgraph.train`'s defaults
    (keys that follow another, like model.in_features -> data.features, are left to follow)."""
    mine, theirs = training_leaves(cfg), training_leaves(defaults)
    links = _interpolations(cfg)
    same_link = {k for k, v in _interpolations(defaults).items() if links.get(k) == v}
    return {
        k: v
        for k, v in sorted(mine.items())
        if k not in same_link and (k not in theirs or theirs[k] != v)
    }


def eval_every_samples(batch: int, num_train: int, evals_per_epoch: int) -> int:
    """Samples between evaluations: a multiple of B (hence of B/k), about evals_per_epoch a
    pass, so every variant is evaluated at the same numbers of samples seen."""
    return batch * max(1, (num_train // batch) // evals_per_epoch)


def build(cfg: Any, num_train: int) -> list[Variant]:
    """The variants `cfg.compare` asks for, in report order (the reference last)."""
    c = cfg.compare
    B, k, lr = cfg.train.batch_size, int(c.k), cfg.optim.lr
    cap = c.memory_cap
    every = eval_every_samples(B, num_train, int(c.evals_per_epoch))

    def common(batch: int) -> dict[str, Any]:
        return {
            "train.batch_size": batch,
            "train.epochs": int(c.epochs),
            "train.steps": None,
            "train.time_budget": None,
            "train.eval_every": every // batch,
            "train.progress": False,
            "checkpoint.save": True,  # model.pt: the weights compared with the reference's
            "checkpoint.every": None,  # no training checkpoints: they would only cost time
            "pipeline.memory_cap": cap,
        }

    # parallel.dp is written out only where it is not splitgraph.train's default of 1
    explicit_dp = cfg.parallel.dp != 1

    def replicas(d: int) -> dict[str, Any]:
        return {"parallel.dp": d} if d != 1 or explicit_dp else {}

    one_device = {
        "pipeline.stages": 1,
        "partition.strategy": "uniform",
        "partition.boundaries": None,
        "schedule.virtual_stages": 1,
    } | replicas(1)
    whole = {"schedule.name": "naive", "pipeline.microbatches": 1}
    out: list[Variant] = []
    kinds = list(c.variants)
    if "full" in kinds:
        out.append(Variant("full", "full", f"full (B={B})", 1, B, common(B) | one_device | whole))
    if "small" in kinds:
        for rule in c.small_lr:
            lr_v = lr if rule == "same" else lr / k
            out.append(
                Variant(
                    f"small-{rule}",
                    "small",
                    f"small (B={B // k}, lr {rule} = {lr_v:g})",
                    1,
                    B // k,
                    common(B // k) | one_device | whole | {"optim.lr": lr_v},
                )
            )
    if "accumulate" in kinds:
        settings = common(B) | one_device | {"schedule.name": "1f1b", "pipeline.microbatches": k}
        out.append(
            Variant("accumulate", "accumulate", f"accumulate ({k} x {B // k})", 1, B, settings)
        )
    if "recompute" in kinds:
        settings = common(B) | one_device | whole | {"schedule.recompute": True}
        out.append(Variant("recompute", "recompute", f"recompute (B={B})", 1, B, settings))
    if "data" in kinds:
        d = int(c.data_parallel)
        settings = common(B) | one_device | whole | replicas(d)
        label = f"data parallel dp={d} (B/{d} each)"
        out.append(Variant(f"data-dp{d}", "data", label, d, B, settings))
    if "pipeline" in kinds:
        out += _pipeline_variants(c, Workload.of(cfg), common(B), replicas)
    if c.reference and cap is not None and set(kinds) - {"recompute"}:
        settings = common(B) | one_device | whole | {"pipeline.memory_cap": None}
        out.append(Variant("reference", "reference", "full, no cap (reference)", 1, B, settings))
    return out


def _pipeline_variants(
    c: Any, work: Workload, base: dict[str, Any], replicas: Callable[[int], dict[str, Any]]
) -> list[Variant]:
    """One variant per (dp, stages, schedule, microbatches, recompute) of compare's grid."""
    from splitgraph.schedule import SCHEDULES

    B = work.batch_size
    out: list[Variant] = []
    stages, scheds, mbs, recomputes = pipeline_grid(c, work)
    grid = itertools.product(dp_grid(c, work.parallel), stages, scheds, mbs, recomputes)
    for d, p, sched, m, rc in grid:
        if c.max_devices is not None and p * d > int(c.max_devices):
            continue
        # model chunks per rank: the configured count for a chunked schedule (2, its
        # group default, if none was chosen), one for the others
        v = work.schedule.virtual_stages if SCHEDULES[sched].virtual else 1
        v = 2 if SCHEDULES[sched].virtual and v == 1 else v
        settings = (
            base
            | {
                "pipeline.stages": p,
                "schedule.name": sched,
                "schedule.virtual_stages": v,
                "schedule.recompute": rc,
                "pipeline.microbatches": m,
            }
            | replicas(d)
        )
        name = f"pipeline-{sched}-p{p}-m{m}" + (f"-v{v}" if v > 1 else "")
        label = f"pipeline {sched} p={p} m={m}" + (f" v={v}" if v > 1 else "")
        if d > 1:
            name, label = name + f"-dp{d}", label + f" x dp={d}"
        if rc:
            name, label = name + "-recompute", label + " + recompute"
        out.append(Variant(name, "pipeline", label, p * d, B, settings))
    return out


def for_time_budget(v: Variant, seconds: float, max_epochs: int) -> Variant:
    """The same variant trained for a wall-clock budget instead of an epoch budget."""
    settings = v.settings | {"train.time_budget": seconds, "train.epochs": max_epochs}
    return replace(v, name=f"{v.name}@{seconds:g}s", settings=settings, phase="time")


# -- command lines -------------------------------------------------------------------------

_UNQUOTED = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./+\-]*$")


def hydra_value(v: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    s = str(v)
    if _UNQUOTED.match(s) and not _is_keyword_or_number(s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_keyword_or_number(s: str) -> bool:
    if s.lower() in ("null", "true", "false", "nan", "inf"):
        return True
    try:
        float(s)
    except ValueError:
        return False
    return True


def overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{k}={hydra_value(v)}" for k, v in settings.items()]


def command(v: Variant, base: dict[str, Any], run_dir: str) -> list[str]:
    """The exact command that trains variant `v` into `run_dir`."""
    from splitgraph.bench.launch import train_command

    return train_command(
        v.nproc, overrides(base | v.settings | {"run_dir": run_dir}), launcher="torchrun"
    )


def printable(cmd: list[str]) -> str:
    """The command as a user would type it (`python`, `torchrun`), shell-quoted."""
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        cmd = ["torchrun", *cmd[3:]]
    elif cmd[1:3] == ["-m", "splitgraph.train"]:
        cmd = ["python", *cmd[1:]]
    return shlex.join(cmd)
