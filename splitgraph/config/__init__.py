"""Configuration: typed schemas for Hydra, and the cross-field rules of `validate`.

Two layers of checking, so a bad run fails before any process group exists:

1. The dataclasses below are registered in Hydra's ConfigStore as the schema of
   `conf/config.yaml`. A typo (`pipeline.microbatch=4`) or a wrong type
   (`train.batch_size=abc`) fails inside Hydra with its own message.
2. `validate(cfg, world_size)` checks the rules that span fields (stages vs world size vs
   layers, microbatches vs batch, ...) and raises one `ConfigError` listing every problem,
   each naming the value and the fix. Every rank runs it before `init_process_group`.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import II, MISSING, DictConfig, OmegaConf

from splitgraph.errors import ConfigError
from splitgraph.units import parse_bytes


class Activation(Enum):
    relu = "relu"
    tanh = "tanh"
    sigmoid = "sigmoid"
    gelu = "gelu"


class Task(Enum):
    classification = "classification"
    regression = "regression"


class DataName(Enum):
    synthetic = "synthetic"
    file = "file"
    digits = "digits"


class Standardize(Enum):
    """What the loader standardizes with the training split's mean and std (data.py)."""

    auto = "auto"  # data=file: inputs, and regression targets; built-in sets: nothing
    none = "none"
    inputs = "inputs"
    all = "all"  # inputs and (regression) targets


class OptimName(Enum):
    sgd = "sgd"
    adam = "adam"


class Backend(Enum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(Enum):
    float32 = "float32"
    float64 = "float64"
    bfloat16 = "bfloat16"  # autocast: fp32 master weights, bf16 matmuls and activations


class Transport(Enum):
    auto = "auto"
    direct = "direct"  # the backend's own transfers (NCCL between GPUs, gloo on CPU)
    staged = "staged"  # ranks sharing one GPU: device tensors staged through host memory


class TimeSource(Enum):
    measured = "measured"  # profile each layer on this device (cached)
    flops = "flops"  # analytic: FLOPs / costs.flops_per_s (deterministic)


class NanCheck(Enum):
    """Where the numerical guard looks for non-finite values (runtime/guard.py)."""

    step = "step"  # losses and parameter gradients each step; a failure replays the step
    microbatch = "microbatch"  # every activation, loss and gradient of every microbatch


#: debug.fail_mode: how the injected fault of debug.fail_at_step shows itself
#: (splitgraph/reliability/faults.py)
FAIL_MODES = ("raise", "kill", "stall", "nan", "kill_in_save", "sigterm", "sigint")


@dataclass
class ModelConfig:
    """The textbook MLP: Linear layers (no bias by default) with an elementwise activation."""

    in_features: int | None = II("data.features")  # None only until read from a data file
    hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    out_features: int | None = II("data.outputs")
    activation: Activation = Activation.relu
    bias: bool = False
    task: Task = Task.classification
    init_seed: int = 0


@dataclass
class DataConfig:
    name: DataName = DataName.synthetic
    # data=file: null reads them from the file (splitgraph.data.fill_shape_from_file)
    features: int | None = 64
    outputs: int | None = 10  # classes for classification, targets for regression
    samples: int = 8192  # synthetic only
    test_fraction: float = 0.1
    seed: int = 0
    shuffle: bool = True
    on_device: bool = True  # keep the dataset on the GPU; false: pinned host, async copies
    path: str | None = None  # file only: a .pt or .npz holding X and y
    teacher_hidden: int = 64  # synthetic only: width of the fixed random teacher
    noise: float = 0.0  # synthetic regression only: std of target noise
    # standardize with the training split's per-column mean and std: auto, none, inputs, all
    standardize: Standardize = Standardize.auto
    # most memory loading the data may take on one node, all its loading ranks together
    # (e.g. "8GiB"); null: half of this machine's memory (splitgraph/reliability/preflight.py)
    max_memory: str | None = None


@dataclass
class PartitionConfig:
    strategy: str = "uniform"
    boundaries: list[int] | None = None  # manual: first layer of stages 1..S-1


@dataclass
class ScheduleConfig:
    """Schedule names are strings ("1f1b" is no identifier), checked against the registry."""

    name: str = "1f1b"
    virtual_stages: int = 1  # model chunks per rank (interleaved, loopedbfs)
    recompute: bool = False  # keep only each stage's input; recompute the forward in backward
    recompute_stages: list[int] | None = None  # with recompute: only these stages (None: all)
    path: str | None = None  # schedule=csv: a torch.distributed.pipelining compute-only CSV


@dataclass
class DeviceSpec:
    """One rank's device, for the planner: relative compute speed and its own memory cap."""

    speed: float = 1.0  # stage times are divided by it (2.0: twice as fast as measured here)
    memory: str | None = None  # e.g. "8GiB"; null: pipeline.memory_cap


@dataclass
class PipelineConfig:
    stages: int | None = None  # None: one stage per rank
    microbatches: int = 4
    memory_cap: str | None = None  # per-device memory cap, e.g. "12GiB" (see splitgraph.units)
    devices: list[DeviceSpec] | None = None  # one per rank (heterogeneous); null: all alike
    bandwidth: str | None = None  # between adjacent stages, bytes/s ("10GB"); null: measure
    latency: float | None = None  # seconds per message; null: measured (0 if bandwidth is set)


@dataclass
class ParallelConfig:
    """Data parallelism: `dp` replicas of the pipeline; world size = dp x pipeline.stages.

    Replica d takes rows [d*B/dp, (d+1)*B/dp) of every minibatch (B = train.batch_size, the
    global batch) and cuts them into pipeline.microbatches microbatches; each stage's
    gradients are summed over its dp peers once per step (runtime/gradsync.py).
    """

    dp: int = 1
    overlap: bool = True  # start a stage's all-reduce right after its last backward of the step
    bucket_mb: float = 25.0  # gradients are flattened into buckets of at most this many MiB


@dataclass
class OptimConfig:
    """Optimizer. `weight_decay` is the objective's lambda, J = L + lambda/2 sum ||W||_F^2,
    applied to weight matrices only (never biases), identical for every optimizer."""

    name: OptimName = OptimName.sgd
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4


@dataclass
class TrainConfig:
    batch_size: int = 256
    steps: int | None = 200
    epochs: int | None = None
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    eval_every: int | None = None  # steps between held-out evaluations (metrics.jsonl)
    time_budget: float | None = None  # seconds of training; every rank stops at the same step


@dataclass
class RuntimeConfig:
    backend: Backend = Backend.auto
    device: Device = Device.auto
    dtype: DType = DType.float32
    timeout: float = 120.0  # seconds: process-group timeout, the bound on any wait
    track_memory: bool = True  # count bytes saved for backward (saved-tensor hooks)
    verbose: bool = False  # print every p2p operation with rank and step
    threads: int | None = None  # torch intra-op threads per rank; None: leave as is
    transport: Transport = Transport.auto  # auto: staged when ranks must share a GPU
    tf32: bool = False  # allow TF32 matmuls on Ampere+ GPUs (float32 runs)
    nvml_interval: float = 0.2  # seconds between NVML samples on GPU (0: off)
    hang_timeout: float | None = None  # seconds without a finished action; None: timeout / 2
    nan_check: NanCheck = NanCheck.step  # numerical guard granularity (runtime/guard.py)


@dataclass
class TraceConfig:
    """Measured timelines: record every action of `steps` steps after `warmup` (trace.json)."""

    enabled: bool = True
    warmup: int = 10  # the first steps run slower (allocator, gloo connections, caches)
    steps: int = 20
    # timeline.png beside trace.json (matplotlib: ~0.5-1.5 s of CPU at the end of a run);
    # false keeps trace.json and summary.json's timeline, draws nothing (sweeps, tests)
    picture: bool = True


@dataclass
class CostsConfig:
    """Where the planner's per-layer times come from (splitgraph/cost/costs.py, profiler.py)."""

    times: TimeSource = TimeSource.measured
    flops_per_s: float = 1e10  # times=flops only
    warmup: int = 3  # measured: untimed runs per layer before timing
    repeats: int = 9  # measured: timed runs per layer
    statistic: str = "median"  # of the repeats: "median", or "min" on a machine shared with others
    cache_dir: str | None = None  # null: $SPLITGRAPH_CACHE, else ~/.cache/splitgraph
    report: bool = True  # training: predicted vs measured per stage in summary.json


@dataclass
class CheckpointConfig:
    init_from: str | None = None  # a model.pt written by a run (any partition)
    save: bool = True  # write the consolidated model.pt at the end
    # Training checkpoints (splitgraph/reliability/checkpoint.py): torch.distributed.checkpoint,
    # global names.
    dir: str = "${run_dir}/checkpoints"  # stable across torchrun restarts (same run dir)
    every: int | None = 100  # steps between checkpoints (and one at the end); null: none
    keep: int = 2  # newest checkpoints kept; older ones are deleted after a save commits
    resume: str = "auto"  # auto: latest valid one in checkpoint.dir; never; or a path
    strict: bool = True  # refuse to resume when the model/data/optimizer config changed


@dataclass
class DebugConfig:
    fail_at_step: int | None = None  # fault injection: raise on `fail_rank` at this step
    fail_rank: int = 0
    fail_mode: str = "raise"  # raise, kill, stall, nan, kill_in_save, sigterm, sigint
    fail_attempt: int = 0  # fire only on this torchrun attempt (TORCHELASTIC_RESTART_COUNT)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    run_dir: str = MISSING


def register_configs() -> None:
    """Register the schemas so `conf/*.yaml` is checked against them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def _run_dir() -> str:
    """One run directory for every rank of a launch.

    `SPLITGRAPH_RUN_DIR` wins (launch/train.sh sets it); under torchrun the rendezvous id,
    which every rank shares, names the directory; alone, a timestamp does.
    """
    if os.environ.get("SPLITGRAPH_RUN_DIR"):
        return os.environ["SPLITGRAPH_RUN_DIR"]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return os.path.join("outputs", "torchrun", run_id)
    import time

    return os.path.join("outputs", time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S"))


def _train_help() -> str:
    from splitgraph.train.usage import train_template

    return train_template()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("splitgraph_run_dir"):
        OmegaConf.register_new_resolver("splitgraph_run_dir", _run_dir, use_cache=True)
    if not OmegaConf.has_resolver("splitgraph_help"):  # conf/config.yaml's hydra.help
        OmegaConf.register_new_resolver("splitgraph_help", _train_help)


def load_config(
    overrides: Sequence[str] = (), config_name: str = "config", fill_data: bool = True
) -> DictConfig:
    """Compose the config as `splitgraph.train` would, without running anything.

    The one way tests, benchmarks and the harness build configs, so they meet the same
    schema and defaults as users do on the command line. `fill_data`: with data=file, set
    data.features and data.outputs that are null from the file's header (as training does).
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module="splitgraph.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if fill_data and "data" in cfg:
        from splitgraph.data import fill_shape_from_file

        fill_shape_from_file(cfg.data, cfg.model.task, cfg.runtime)  # data=file: from the file
    return cfg


def typed(cfg: DictConfig | Config) -> Config:
    """The composed config as the typed dataclasses above, resolved once at the entrance.

    Entry points call it after the composed config is final (data=file shapes filled in,
    `validate` passed); below them every value has its schema's type (an int is an int, an
    enum an enum), so no layer casts, and interpolations such as checkpoint.dir are resolved.
    """
    if isinstance(cfg, Config):
        return cfg
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj


def as_container(cfg: DictConfig | Config) -> dict[str, Any]:
    """The config as plain data (enums as their names): what summary.json records."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    out = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Workload:
    """What one training step computes, how it is cut across ranks and how it is priced:
    the sections the cost model, the partition, the planner and the engine read.

    Picked once at the entrance (`Workload.of(cfg)`); the layers below take this (or one of
    its sections), never the whole config: no data source, run directory, checkpoints,
    trace window or fault injection reaches them. The sections are the composed config's
    own nodes (or the typed dataclasses): same fields, same types, read, not copied.
    """

    model: ModelConfig
    batch_size: int  # train.batch_size: the global minibatch B
    pipeline: PipelineConfig
    parallel: ParallelConfig
    schedule: ScheduleConfig
    partition: PartitionConfig
    optim: OptimConfig
    runtime: RuntimeConfig
    costs: CostsConfig

    @classmethod
    def of(cls, cfg: DictConfig | Config | Workload) -> Workload:
        if isinstance(cfg, Workload):
            return cfg
        return cls(
            model=cfg.model,
            batch_size=int(cfg.train.batch_size),
            pipeline=cfg.pipeline,
            parallel=cfg.parallel,
            schedule=cfg.schedule,
            partition=cfg.partition,
            optim=cfg.optim,
            runtime=cfg.runtime,
            costs=cfg.costs,
        )

    @property
    def dp(self) -> int:
        """Data-parallel replicas (at least 1)."""
        return max(int(self.parallel.dp), 1)

    @property
    def local_batch(self) -> int:
        """Rows of each minibatch one replica runs: B / dp."""
        return self.batch_size // self.dp

    def num_stages(self, world_size: int) -> int:
        """Pipeline ranks per replica on `world_size` ranks (see `num_stages`)."""
        return num_stages(self.pipeline, self.parallel, world_size)


# ---------------------------------------------------------------------------------------
# Cross-field validation
# ---------------------------------------------------------------------------------------


def num_layers(model: ModelConfig) -> int:
    return len(model.hidden) + 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _suggest(value: str, options: Sequence[str]) -> str:
    """The end of "X is not a Y": a guess if one is close, then every choice, as sentences."""
    close = difflib.get_close_matches(value, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}. Choose one of: {', '.join(options)}."


def recompute_stages(schedule: ScheduleConfig, num_stages: int) -> set[int]:
    """The stages that recompute their forward in backward (`schedule.recompute*`)."""
    if not schedule.recompute:
        return set()
    chosen = schedule.recompute_stages
    return set(range(num_stages)) if chosen is None else {int(s) for s in chosen}


def num_stages(pipeline: PipelineConfig, parallel: ParallelConfig, world_size: int) -> int:
    """Pipeline ranks per replica: pipeline.stages, else world size / parallel.dp."""
    if pipeline.stages is not None:
        return pipeline.stages
    return max(world_size // max(parallel.dp, 1), 1)


def _non_finite_floats(cfg: Any, prefix: str = "") -> list[str]:
    """NaN and infinity pass every `x <= 0` test, so each float is checked on its own
    (lists such as optim.betas have range rules of their own, which NaN fails)."""
    out = []
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    for key in node:
        try:
            value = node[key]
        except Exception:  # an unresolved interpolation: not a number to check
            continue
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            out += _non_finite_floats(value, path + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{path}={value} must be a finite number.")
    return out


def _on_gpu(runtime: RuntimeConfig) -> bool:
    """Whether this run computes on CUDA (auto: when torch sees a GPU)."""
    device = Device(runtime.device)
    if device == Device.auto:
        import torch

        return bool(torch.cuda.is_available())
    return device == Device.cuda


def _gpu_cap_problems(work: Workload, data: DataConfig) -> list[str]:
    """On GPU the caching allocator enforces the cap in whole segments: a cap below what it
    can honour for this run fails at its first allocation (runtime/allocator.py)."""
    if not _on_gpu(work.runtime):
        return []
    from splitgraph.runtime.allocator import min_cap
    from splitgraph.units import format_bytes

    cap = parse_bytes(work.pipeline.memory_cap)
    floor, why = min_cap(work, data)
    if cap >= floor:
        return []
    return [
        f"pipeline.memory_cap={work.pipeline.memory_cap} ({cap:,} bytes) is below what PyTorch's "
        f"CUDA caching allocator can honour for this run: {why}, so the cap must be at least "
        f"{format_bytes(floor)} ({floor:,} bytes). Raise the cap to {format_bytes(floor)} or "
        "more, or run on the CPU (runtime.device=cpu), where the cap applies to an exact "
        "accounting of the run's tensors."
    ]


@dataclass(frozen=True)
class _Shape:
    """The derived numbers several sections' rules share, computed once."""

    ranks: int  # the world size checked against (at least 1)
    stages: int  # pipeline ranks per replica
    virtual: int  # schedule.virtual_stages
    chunks: int  # model chunks in all: stages x virtual stages
    layers: int  # Linear layers of the model
    dp: int  # data-parallel replicas


def _csv_problems(path: str | None, ranks: int, microbatches: int, virtual: int) -> list[str]:
    """schedule=csv: the file is read and validated here, before anything starts."""
    if path is None:
        return ["schedule=csv reads its actions from a file: set schedule.path=FILE.csv."]
    from splitgraph.errors import ScheduleError
    from splitgraph.schedule.interop import load_csv

    try:
        load_csv(path, num_ranks=ranks, num_microbatches=microbatches, virtual=virtual)
    except (ScheduleError, ValueError) as e:
        return [f"schedule=csv: {e}"]
    return []


def validate(cfg: Any, world_size: int | None = None) -> None:
    """Check the rules that span fields; raise one ConfigError naming every problem.

    Pure and cheap: no process group, no data loading (file shapes are checked by the
    loader, which names the file). Every rank calls it before `init_process_group`. Each
    section's rules are one function returning its messages; this only concatenates them.
    """
    ws = world_size_from_env() if world_size is None else world_size
    errors = _world_problems(ws)
    ranks = max(ws, 1)  # check the rest as for one rank
    stages = num_stages(cfg.pipeline, cfg.parallel, ranks)
    virtual = cfg.schedule.virtual_stages
    shape = _Shape(
        ranks=ranks,
        stages=stages,
        virtual=virtual,
        chunks=stages * max(virtual, 1),
        layers=num_layers(cfg.model),
        dp=cfg.parallel.dp,
    )
    errors += _model_problems(cfg.model, cfg.data)
    errors += _pipeline_problems(Workload.of(cfg), cfg.data, shape)
    errors += _schedule_problems(cfg.schedule, cfg.pipeline.microbatches, shape)
    errors += _partition_problems(cfg.partition, shape)
    errors += _train_problems(cfg.train, cfg.trace)
    errors += _data_problems(cfg.data, cfg.train.batch_size)
    errors += _optim_problems(cfg.optim)
    errors += _runtime_problems(cfg.runtime, shape.ranks)
    errors += _checkpoint_problems(cfg.checkpoint)
    errors += _debug_problems(cfg.debug, cfg.checkpoint.every, shape.ranks)
    errors += _non_finite_floats(cfg)
    if errors:
        raise ConfigError(errors)


def _world_problems(ws: int) -> list[str]:
    if ws < 1:
        return [
            f"a launch of {ws} ranks: splitgraph needs at least 1 (--nproc / --nproc-per-node)."
        ]
    return []


def _model_problems(m: ModelConfig, data: DataConfig) -> list[str]:
    errors: list[str] = []
    unknown = [k for k in ("features", "outputs") if getattr(data, k) is None]
    if unknown:
        keys = " and ".join(f"data.{k}" for k in unknown)
        errors.append(
            f"{keys} {'is' if len(unknown) == 1 else 'are'} null: data=file reads them from "
            "data.path; other data sets need a number."
        )
    elif m.in_features < 1 or m.out_features < 1:
        errors.append(
            f"model.in_features={m.in_features} and model.out_features={m.out_features} "
            "must be >= 1 (they follow data.features and data.outputs)."
        )
    if any(w < 1 for w in m.hidden):
        errors.append(f"model.hidden={list(m.hidden)} has widths < 1: every layer needs >= 1 unit.")
    if not unknown and m.task == Task.classification and m.out_features < 2:
        errors.append(
            f"model.task=classification needs >= 2 classes; got data.outputs={m.out_features}."
        )
    return errors


def _replica_problems(stages: int | None, shape: _Shape) -> list[str]:
    """parallel.dp against the world size and pipeline.stages."""
    ws, dp = shape.ranks, shape.dp
    if dp < 1:
        return [f"parallel.dp={dp} must be >= 1 (1: a single pipeline, no replicas)."]
    if stages is not None and stages * dp != ws:
        fix = f"set pipeline.stages={ws // dp} (or leave it unset)" if ws % dp == 0 else ""
        if not fix:
            fix = f"set parallel.dp to a divisor of {ws}"
        return [
            f"pipeline.stages={stages} x parallel.dp={dp} = {stages * dp} ranks but the "
            f"world size is {ws}: splitgraph runs one stage per rank, once per data-parallel "
            f"replica. Launch with --nproc-per-node {stages * dp} or {fix}."
        ]
    if ws % dp:
        divisors = [d for d in range(1, ws + 1) if ws % d == 0]
        return [
            f"parallel.dp={dp} does not divide the world size {ws}: world size = parallel.dp "
            f"x pipeline.stages. Use parallel.dp in {divisors}, or launch a multiple of {dp} "
            "processes."
        ]
    return []


def _memory_cap_problems(work: Workload, data: DataConfig) -> list[str]:
    """pipeline.memory_cap: a size, and (GPU) one the caching allocator can honour."""
    cap = work.pipeline.memory_cap
    if cap is None:
        return []
    errors: list[str] = []
    try:
        parse_bytes(cap)
    except ValueError as e:
        errors.append(f"pipeline.memory_cap={cap!r}: {e}")
    else:
        errors += _gpu_cap_problems(work, data)
    if not work.runtime.track_memory and work.runtime.device != Device.cuda:
        errors.append(
            f"pipeline.memory_cap={cap!r} is enforced on CPU through the "
            "saved-activation accounting, which runtime.track_memory=false turns off. "
            "Set runtime.track_memory=true or drop the cap."
        )
    return errors


def _microbatch_problems(mb: int, batch: int, dp: int) -> list[str]:
    """pipeline.microbatches against the (per-replica) batch."""
    if mb < 1:
        return [f"pipeline.microbatches={mb} must be >= 1."]
    if dp <= 1 and mb > batch:
        return [
            f"pipeline.microbatches={mb} exceeds train.batch_size={batch}: "
            "a microbatch would be empty. Use at most one microbatch per sample."
        ]
    if dp > 1 and mb > batch // dp:
        return [
            f"pipeline.microbatches={mb} exceeds the per-replica batch "
            f"train.batch_size/parallel.dp = {batch}/{dp} = {batch // dp}: a "
            "microbatch would be empty. Use fewer microbatches or a larger batch."
        ]
    return []


def _pipeline_problems(work: Workload, data: DataConfig, shape: _Shape) -> list[str]:
    """Stages, replicas, memory cap, microbatches: how the work is cut across ranks."""
    from splitgraph.partition import STRATEGIES

    errors = _replica_problems(work.pipeline.stages, shape)
    stages, v, dp = shape.stages, shape.virtual, shape.dp
    batch = work.batch_size
    if stages < 1:
        errors.append(f"pipeline.stages={stages} must be >= 1.")
    if shape.chunks > shape.layers:
        what = f"{stages} stages" if v == 1 else f"{stages} ranks x {v} virtual stages"
        errors.append(
            f"{what} but the model has only {shape.layers} layers (model.hidden has "
            f"{len(work.model.hidden)} entries + the output layer): every stage needs >= 1 layer. "
            f"Use fewer stages or add layers to model.hidden."
        )
    errors += _memory_cap_problems(work, data)
    if dp > 1 and batch % dp:
        lo = max(batch // dp * dp, dp)
        errors.append(
            f"train.batch_size={batch} is not divisible by parallel.dp={dp}: each "
            f"replica takes an equal share of every minibatch. Use a multiple of {dp} (e.g. "
            f"train.batch_size={lo})."
        )
    errors += _pipeline_cost_problems(work.pipeline, work.costs, stages)
    strat = work.partition.strategy
    if strat in STRATEGIES and STRATEGIES[strat].costed and v > 1:
        *rest, last = [n for n, spec in STRATEGIES.items() if not spec.costed]
        errors.append(
            f"partition={strat} prices one stage per rank; schedule.virtual_stages={v} puts {v} "
            f"on each. Use partition={', '.join(rest)} or {last} with virtual stages."
        )
    errors += _microbatch_problems(work.pipeline.microbatches, batch, dp)
    if work.parallel.bucket_mb <= 0:
        errors.append(f"parallel.bucket_mb={work.parallel.bucket_mb} must be > 0 (MiB).")
    return errors


def _schedule_problems(s: ScheduleConfig, mb: int, shape: _Shape) -> list[str]:
    from splitgraph.schedule import SCHEDULES

    errors: list[str] = []
    sched = s.name
    if sched not in SCHEDULES:
        errors.append(
            f"schedule.name={sched!r} is not a schedule{_suggest(sched, tuple(SCHEDULES))}"
        )
    elif mb >= 1:
        errors.extend(SCHEDULES[sched].problems(shape.stages, shape.virtual, int(mb)))
    if sched == "csv" and mb >= 1:
        errors.extend(_csv_problems(s.path, shape.stages, int(mb), shape.virtual))
    if s.path is not None and sched != "csv":
        errors.append(f"schedule.path is only read with schedule=csv (got schedule={sched}).")
    rs = s.recompute_stages
    if rs is not None:
        if not s.recompute:
            errors.append(
                f"schedule.recompute_stages={list(rs)} is only read with schedule.recompute=true."
            )
        outside = [st for st in rs if not 0 <= st < shape.chunks]
        if outside:
            errors.append(
                f"schedule.recompute_stages={list(rs)} names stages {outside} outside "
                f"0..{shape.chunks - 1}."
            )
    return errors


def _partition_problems(part: PartitionConfig, shape: _Shape) -> list[str]:
    from splitgraph.partition import STRATEGIES

    errors: list[str] = []
    chunks, layers = shape.chunks, shape.layers
    strat = part.strategy
    if strat not in STRATEGIES:
        errors.append(
            f"partition.strategy={strat!r} is not a strategy{_suggest(strat, tuple(STRATEGIES))}"
        )
    bounds = part.boundaries
    if strat == "manual":
        if bounds is None:
            example = [round(i * layers / chunks) for i in range(1, chunks)]
            errors.append(
                "partition=manual needs partition.boundaries: the first layer of stages "
                f"1..{chunks - 1}, e.g. partition.boundaries={example} for {chunks} stages."
            )
        else:
            b = list(bounds)
            if len(b) != chunks - 1:
                errors.append(
                    f"partition.boundaries={b} has {len(b)} entries but {chunks} stages need "
                    f"{chunks - 1}."
                )
            if b != sorted(set(b)) or any(x <= 0 or x >= layers for x in b):
                errors.append(
                    f"partition.boundaries={b} must be strictly increasing and inside "
                    f"1..{layers - 1} (the model has {layers} layers)."
                )
    elif bounds is not None:
        errors.append(
            f"partition.boundaries={list(bounds)} is only read by partition=manual; "
            f"partition.strategy is {strat!r}. Drop it or use partition=manual."
        )
    return errors


def _train_problems(t: TrainConfig, trace: TraceConfig) -> list[str]:
    """The train section, and the trace window it measures."""
    errors: list[str] = []
    if t.batch_size < 1:
        errors.append(f"train.batch_size={t.batch_size} must be >= 1.")
    if (t.steps is None) == (t.epochs is None):
        errors.append(
            f"set exactly one of train.steps={t.steps} and train.epochs={t.epochs}; the other "
            "must be null (e.g. train.epochs=3 train.steps=null)."
        )
    for key in ("steps", "epochs"):
        count = getattr(t, key)
        if count is not None and count < 1:
            errors.append(f"train.{key}={count} must be >= 1.")
    if trace.warmup < 0 or trace.steps < 1:
        errors.append(
            f"trace.warmup={trace.warmup} must be >= 0 and trace.steps={trace.steps} "
            ">= 1 (or trace.enabled=false)."
        )
    if t.log_every < 1:
        errors.append(f"train.log_every={t.log_every} must be >= 1.")
    if t.eval_every is not None and t.eval_every < 1:
        errors.append(f"train.eval_every={t.eval_every} must be >= 1 step (or null: no evals).")
    if t.time_budget is not None and t.time_budget <= 0:
        errors.append(f"train.time_budget={t.time_budget} must be > 0 seconds (or null).")
    return errors


def _data_problems(d: DataConfig, batch: int) -> list[str]:
    errors: list[str] = []
    if not 0.0 <= d.test_fraction < 1.0:
        errors.append(f"data.test_fraction={d.test_fraction} must be in [0, 1).")
    if d.name == DataName.synthetic and 0.0 <= d.test_fraction < 1.0:
        n_train = d.samples - int(d.samples * d.test_fraction)
        if n_train < batch:
            errors.append(
                f"train.batch_size={batch} exceeds the {n_train} training samples "
                f"(data.samples={d.samples}, data.test_fraction={d.test_fraction}). "
                "Lower the batch or raise data.samples."
            )
    if d.name == DataName.file and not d.path:
        errors.append("data=file needs data.path=/path/to/data.pt (or .npz) holding X and y.")
    if d.max_memory is not None:
        errors += _positive_bytes("data.max_memory", d.max_memory, "bytes")
    if d.name == DataName.digits and (d.features != 64 or d.outputs != 10):
        errors.append(
            f"data=digits has 64 features and 10 classes; got data.features={d.features}, "
            f"data.outputs={d.outputs}. Leave them at the data=digits defaults."
        )
    return errors


def _optim_problems(o: OptimConfig) -> list[str]:
    errors: list[str] = []
    if o.lr <= 0:
        errors.append(f"optim.lr={o.lr} must be > 0.")
    if not 0.0 <= o.momentum < 1.0:
        errors.append(f"optim.momentum={o.momentum} must be in [0, 1).")
    if o.nesterov and o.momentum == 0:
        errors.append("optim.nesterov=true needs optim.momentum > 0.")
    if o.weight_decay < 0:
        errors.append(f"optim.weight_decay={o.weight_decay} must be >= 0.")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        errors.append(f"optim.betas={list(o.betas)} must be two numbers in [0, 1).")
    return errors


def _runtime_problems(r: RuntimeConfig, ranks: int) -> list[str]:
    errors: list[str] = []
    if r.timeout <= 0:
        errors.append(f"runtime.timeout={r.timeout} must be > 0 seconds.")
    if r.backend == Backend.nccl and r.device == Device.cpu:
        errors.append(
            "runtime.backend=nccl needs CUDA tensors but runtime.device=cpu. Use "
            "runtime.backend=gloo on CPU, or runtime.device=cuda."
        )
    if (
        r.backend == Backend.gloo
        and r.device == Device.cuda
        and ranks > 1
        and r.transport != Transport.staged
    ):
        errors.append(
            "runtime.backend=gloo cannot send CUDA tensors between ranks "
            "(runtime.device=cuda). Use runtime.backend=nccl (one GPU per rank), or "
            "runtime.transport=staged (ranks sharing a GPU, through host memory)."
        )
    if r.transport == Transport.staged and r.backend == Backend.nccl:
        errors.append(
            "runtime.transport=staged moves tensors through host memory over gloo; it cannot "
            "use runtime.backend=nccl. Leave runtime.backend=auto."
        )
    if r.nvml_interval < 0:
        errors.append(f"runtime.nvml_interval={r.nvml_interval} must be >= 0 (0 turns it off).")
    if r.threads is not None and r.threads < 1:
        errors.append(f"runtime.threads={r.threads} must be >= 1 (or null).")
    if r.hang_timeout is not None and not 0 < r.hang_timeout < r.timeout:
        errors.append(
            f"runtime.hang_timeout={r.hang_timeout} must be > 0 and below "
            f"runtime.timeout={r.timeout}, so the watchdog reports a hang before the process "
            "group times out (null: half of runtime.timeout)."
        )
    return errors


def _checkpoint_problems(c: CheckpointConfig) -> list[str]:
    errors: list[str] = []
    if c.every is not None and c.every < 1:
        errors.append(f"checkpoint.every={c.every} must be >= 1 (or null: no checkpoints).")
    if c.keep < 1:
        errors.append(f"checkpoint.keep={c.keep} must be >= 1.")
    if not str(c.resume).strip():
        errors.append("checkpoint.resume is empty: use auto, never, or a checkpoint path.")
    return errors


def _debug_problems(dbg: DebugConfig, checkpoint_every: int | None, ranks: int) -> list[str]:
    """Fault injection (splitgraph/faults.py)."""
    errors: list[str] = []
    if dbg.fail_at_step is not None:
        if not 0 <= dbg.fail_rank < ranks:
            errors.append(
                f"debug.fail_rank={dbg.fail_rank} is not a rank of this {ranks}-rank run."
            )
        if dbg.fail_at_step < 0:
            errors.append(f"debug.fail_at_step={dbg.fail_at_step} must be >= 0.")
    if dbg.fail_mode not in FAIL_MODES:
        errors.append(
            f"debug.fail_mode={dbg.fail_mode!r} is not a fault{_suggest(dbg.fail_mode, FAIL_MODES)}"
        )
    elif dbg.fail_mode == "kill_in_save" and checkpoint_every is None:
        errors.append(
            "debug.fail_mode=kill_in_save kills a rank while it writes a checkpoint, but "
            "checkpoint.every=null writes none. Set checkpoint.every."
        )
    if dbg.fail_attempt < 0:
        errors.append(f"debug.fail_attempt={dbg.fail_attempt} must be >= 0.")
    return errors


def _positive_bytes(key: str, value: Any, unit: str) -> list[str]:
    """The problem with a byte size that must be positive ("10GB", "8GiB"), if any."""
    try:
        if parse_bytes(value) <= 0:
            return [f"{key}={value!r} must be > 0 {unit}."]
    except ValueError as e:
        return [f"{key}={value!r}: {e}"]
    return []


def _pipeline_cost_problems(p: PipelineConfig, c: CostsConfig, stages: int) -> list[str]:
    """The planner's inputs: devices, link and profiling settings (splitgraph/cost/costs.py)."""
    errors: list[str] = []
    if p.devices is not None:
        devices = list(p.devices)
        if len(devices) != stages:
            errors.append(
                f"pipeline.devices has {len(devices)} entries but there are {stages} ranks: "
                "give one {speed: ..., memory: ...} per rank."
            )
        for r, d in enumerate(devices):
            if not d.speed > 0:
                errors.append(f"pipeline.devices[{r}].speed={d.speed} must be > 0.")
            if d.memory is not None:
                try:
                    parse_bytes(d.memory)
                except ValueError as e:
                    errors.append(f"pipeline.devices[{r}].memory={d.memory!r}: {e}")
    if p.bandwidth is not None:
        errors += _positive_bytes("pipeline.bandwidth", p.bandwidth, "bytes/s")
    if p.latency is not None and p.latency < 0:
        errors.append(f"pipeline.latency={p.latency} must be >= 0 seconds.")
    if c.repeats < 1 or c.warmup < 0:
        errors.append(f"costs.repeats={c.repeats} must be >= 1 and costs.warmup={c.warmup} >= 0.")
    if c.statistic not in ("median", "min"):
        errors.append(f"costs.statistic={c.statistic!r} must be 'median' or 'min'.")
    if not c.flops_per_s > 0:
        errors.append(f"costs.flops_per_s={c.flops_per_s} must be > 0.")
    return errors
