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

from splitgraph.config import Config, ParallelConfig, Workload
from splitgraph.errors import ConfigError
from splitgraph.units import parse_bytes

#: the options the harness compares, in report order (`data` is asked for by name only)
KINDS = ("full", "small", "accumulate", "recompute", "data", "pipeline")
DEFAULT_KINDS = ("full", "small", "accumulate", "recompute", "pipeline")
LR_RULES = ("same", "linear")


@dataclass
class CompareConfig:
    name: str = "default"  # outputs/compare/<name>/ (experiment files set it)
    out: str | None = None  # the report's directory (`--out`); null: outputs/compare/<name>/
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    memory_cap: str | None = II("pipeline.memory_cap")  # per device, e.g. "64MiB"; null: none
    k: int = 4  # small: batch B/k; accumulate: k micro-steps of B/k
    small_lr: list[str] = field(default_factory=lambda: ["same"])  # same | linear (lr / k)
    stages: list[int] | None = None  # pipeline variants' p; null: [pipeline.stages]
    schedules: list[str] | None = None  # null: [schedule.name]
    microbatches: list[int] | None = None  # null: [pipeline.microbatches]
    pipeline_recompute: list[bool] | None = None  # null: [schedule.recompute]; [false, true]
    dp: list[int] | None = None  # pipeline variants' data-parallel replicas; null: [parallel.dp]
    max_devices: int | None = None  # leave out pipeline variants of more p x dp ranks
    data_parallel: int = 2  # the `data` variant: this many replicas of the whole model
    epochs: int = 3  # the epoch budget every variant trains for
    evals_per_epoch: int = 4  # held-out evaluations per epoch (at equal samples seen)
    target_loss: float | None = None  # held-out loss to reach; null: the worst final one
    time_budget: float | None = None  # seconds: also train each fitting variant this long
    time_budget_max_epochs: int = 1000  # the epoch bound of those wall-clock runs
    reference: bool = True  # also run `full` without the cap, to compare weights against
    # launch a variant the memory model predicts over the cap, so the runtime refuses it
    # itself (evidence, a few seconds each); false: refuse it here, before launch
    confirm_refusals: bool = True
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


def output_dir(name: str, overrides: str = "", out: str | None = None) -> str:
    """Where a single run writes: `out` (`--out`, compare.out) if given, else
    `outputs/compare/<name>` for an experiment as is and `outputs/compare/<name>/<overrides>`
    with overrides. Only an explicit `--out results/<name>` regenerates a committed reference."""
    if out:
        return str(out)
    return f"outputs/compare/{name}" if not overrides else f"outputs/compare/{name}/{overrides}"


def load(overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The harness's config composed as `splitgraph-compare` would (for tests and tools)."""
    from splitgraph.config import load_config

    register()
    return load_config(list(overrides), config_name="compare")


def pipeline_grid(c: Any, work: Workload) -> tuple[list[int], list[str], list[int], list[bool]]:
    """The pipeline variants' (stages, schedules, microbatches, recompute) of the compare
    section `c`, the training workload's own filled in where it names none."""
    stages = list(c.stages) if c.stages is not None else [work.pipeline.stages]
    scheds = list(c.schedules) if c.schedules is not None else [work.schedule.name]
    mbs = list(c.microbatches) if c.microbatches is not None else [work.pipeline.microbatches]
    rc = c.pipeline_recompute
    recompute = [bool(x) for x in rc] if rc is not None else [work.schedule.recompute]
    return stages, scheds, mbs, recompute


def dp_grid(c: Any, parallel: ParallelConfig) -> list[int]:
    """The pipeline variants' data-parallel replica counts, parallel.dp where `c` names none."""
    return [int(d) for d in c.dp] if c.dp is not None else [parallel.dp]


def validate_compare(cfg: Any) -> None:
    """The harness's own rules; one ConfigError naming each problem and its fix."""
    c, errors = cfg.compare, []
    batch = cfg.train.batch_size
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
        stages, scheds, mbs, _ = pipeline_grid(c, Workload.of(cfg))
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
        dps = dp_grid(c, cfg.parallel)
        bad_dp = [d for d in dps if d < 1 or batch % d or any(m > batch // d for m in mbs)]
        if bad_dp or not dps:
            errors.append(
                f"compare.dp={dps}: each replica count must be >= 1, divide "
                f"train.batch_size={batch} and leave every replica at least m={max(mbs)} rows "
                "(one per microbatch)."
            )
    if "data" in kinds:
        d = int(c.data_parallel)
        if d < 2 or batch % d:
            errors.append(
                f"compare.data_parallel={d}: the `data` variant needs >= 2 replicas that "
                f"divide train.batch_size={batch}."
            )
    if c.max_devices is not None and c.max_devices < 2:
        errors.append(f"compare.max_devices={c.max_devices} must be >= 2 (or null: no limit).")
    for key, low in (("epochs", 1), ("evals_per_epoch", 1), ("time_budget_max_epochs", 1)):
        if getattr(c, key) < low:
            errors.append(f"compare.{key}={getattr(c, key)} must be >= {low}.")
    for key in ("target_loss", "time_budget", "timeout"):
        v = getattr(c, key)
        if v is not None and v <= 0:
            errors.append(f"compare.{key}={v} must be > 0.")
    if errors:
        raise ConfigError(errors)
