"""The harness's schema: the training config every variant shares, plus a `compare:` node.

`conf/compare.yaml` composes the same groups as training (model, data, optim, ...) on top of
`CompareRunConfig`, so `splitgraph-compare data=digits model.hidden=[512,512]` means what it
means to `splitgraph.train`. `validate_compare` checks the harness's own rules before any
variant runs; each variant's training config is then validated on its own (a variant whose
config is refused is reported as failed, and the others still run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import II, OmegaConf

from splitgraph.config import Config
from splitgraph.errors import ConfigError
from splitgraph.units import parse_bytes

#: the options the harness compares, in report order
KINDS = ("full", "small", "accumulate", "recompute", "pipeline")
LR_RULES = ("same", "linear")


@dataclass
class CompareConfig:
    name: str = "default"  # results/<name>/ (experiment files set it)
    variants: list[str] = field(default_factory=lambda: list(KINDS))
    memory_cap: str | None = II("pipeline.memory_cap")  # per device, e.g. "64MiB"; null: none
    k: int = 4  # small: batch B/k; accumulate: k micro-steps of B/k
    small_lr: list[str] = field(default_factory=lambda: ["same"])  # same | linear (lr / k)
    stages: list[int] | None = None  # pipeline variants' p; null: [pipeline.stages]
    schedules: list[str] | None = None  # null: [schedule.name]
    microbatches: list[int] | None = None  # null: [pipeline.microbatches]
    pipeline_recompute: list[bool] | None = None  # null: [schedule.recompute]; [false, true]
    epochs: int = 3  # the epoch budget every variant trains for
    evals_per_epoch: int = 4  # held-out evaluations per epoch (at equal samples seen)
    target_loss: float | None = None  # held-out loss to reach; null: the worst final one
    time_budget: float | None = None  # seconds: also train each fitting variant this long
    time_budget_max_epochs: int = 1000  # the epoch bound of those wall-clock runs
    reference: bool = True  # also run `full` without the cap, to compare weights against
    timeout: float = 600.0  # seconds per variant process
    runs_dir: str | None = None  # where variant run dirs go; null: <output dir>/runs
    progress: bool = True
    report_only: bool = False  # rebuild the report from the recorded runs, running nothing


@dataclass
class CompareRunConfig(Config):
    compare: CompareConfig = field(default_factory=CompareConfig)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    from splitgraph.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    ConfigStore.instance().store(name="base_compare", node=CompareRunConfig)
    if not OmegaConf.has_resolver("splitgraph_compare_dir"):
        OmegaConf.register_new_resolver("splitgraph_compare_dir", output_dir)


def output_dir(name: str, overrides: str = "") -> str:
    """Where a single run writes: `results/<name>` for an experiment as committed, else
    `outputs/compare/<name>/<overrides>` (results/ holds only references)."""
    return f"results/{name}" if not overrides else f"outputs/compare/{name}/{overrides}"


def load(overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The harness's config composed as `splitgraph-compare` would (for tests and tools)."""
    from splitgraph.config import load_config

    register()
    return load_config(list(overrides), config_name="compare")


def pipeline_grid(cfg: Any) -> tuple[list[int], list[str], list[int], list[bool]]:
    """The pipeline variants' (stages, schedules, microbatches, recompute), defaults filled in."""
    c = cfg.compare
    stages = list(c.stages) if c.stages is not None else [cfg.pipeline.stages]
    scheds = list(c.schedules) if c.schedules is not None else [str(cfg.schedule.name)]
    mbs = list(c.microbatches) if c.microbatches is not None else [cfg.pipeline.microbatches]
    rc = c.pipeline_recompute
    recompute = [bool(x) for x in rc] if rc is not None else [bool(cfg.schedule.recompute)]
    return stages, scheds, mbs, recompute


def validate_compare(cfg: Any) -> None:
    """The harness's own rules; one ConfigError naming each problem and its fix."""
    c, errors = cfg.compare, []
    batch = int(cfg.train.batch_size)
    kinds = list(c.variants)
    unknown = [v for v in kinds if v not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        extra = f" ({', '.join(unknown)}: not a variant)" if unknown else ""
        errors.append(
            f"compare.variants={kinds}{extra}: list one or more of {', '.join(KINDS)}, each "
            "at most once."
        )
    if c.k < 2:
        errors.append(f"compare.k={c.k} must be >= 2: small and accumulate cut B into k parts.")
    elif batch % c.k:
        divisors = [d for d in range(2, min(batch, 64) + 1) if batch % d == 0][:8]
        errors.append(
            f"compare.k={c.k} does not divide train.batch_size={batch}: small and accumulate "
            f"need k equal parts of B. Choose k in {divisors} or change the batch."
        )
    bad_rules = [r for r in c.small_lr if r not in LR_RULES]
    if bad_rules or not list(c.small_lr):
        errors.append(
            f"compare.small_lr={list(c.small_lr)}: use one or both of {', '.join(LR_RULES)} "
            "(linear scales the learning rate by 1/k with the batch)."
        )
    if c.memory_cap is not None:
        try:
            parse_bytes(c.memory_cap)
        except ValueError as e:
            errors.append(f"compare.memory_cap={c.memory_cap!r}: {e}")
    if "pipeline" in kinds:
        stages, scheds, mbs, _ = pipeline_grid(cfg)
        if any(s is None or s < 2 for s in stages):
            errors.append(
                f"pipeline stages {stages}: the pipeline variants need p >= 2 stages; set "
                "pipeline.stages=2 (or compare.stages=[2,4])."
            )
        from splitgraph.schedule import SCHEDULES

        bad = [s for s in scheds if s not in SCHEDULES or s == "naive"]
        if bad:
            names = ", ".join(n for n in SCHEDULES if n != "naive")
            errors.append(
                f"compare.schedules={scheds}: {bad} cannot pipeline microbatches; use any of "
                f"{names}."
            )
        if any(m < 1 or m > batch for m in mbs):
            errors.append(f"pipeline microbatches {mbs} must lie in 1..train.batch_size={batch}.")
    for key, low in (("epochs", 1), ("evals_per_epoch", 1), ("time_budget_max_epochs", 1)):
        if getattr(c, key) < low:
            errors.append(f"compare.{key}={getattr(c, key)} must be >= {low}.")
    for key in ("target_loss", "time_budget", "timeout"):
        v = getattr(c, key)
        if v is not None and v <= 0:
            errors.append(f"compare.{key}={v} must be > 0.")
    if errors:
        raise ConfigError(errors)
