"""Exercise 3: the memory footprint of training versus prediction, per stage, per schedule.

Prediction (inference) keeps the parameters and nothing for a backward pass: run under
`torch.no_grad()`, autograd saves no tensor. Training keeps, per stage,

    parameters            sum of the stage's weights (+ biases) x bytes per element
    gradients             the same again (one .grad per parameter)
    optimizer state       SGD: 0; SGD with momentum: 1x the parameters (momentum_buffer);
                          Adam: 2x the parameters (exp_avg, exp_avg_sq) + one float32 `step`
                          scalar per parameter tensor (float64 if that is torch's default dtype)
    saved activations     what autograd keeps between forward and backward: per sample and layer,
                          times the microbatches in flight at the peak, which the schedule sets
                          (GPipe: all m; 1F1B: min(p - i, m) on stage i)

The first three are exact formulas (`predict_state`). Saved activations are predicted by the
memory model (`predict_saved`, from splitgraph/cost/memory_model.py); `run` takes any function
`(workload, plan, schedule, sizes) -> bytes per stage` as `predict_saved`, and prints `n/a` without.

Measured: for each schedule, one launch of `nproc` ranks (`run_ranks`, gloo) runs one training
step through `PipelineEngine`, whose `SavedTensorMeter` counts the peak saved-for-backward bytes
exactly; parameter, gradient and optimizer-state bytes are read from the tensors after the step.
Inference is measured on each stage's slice in this process: the stage's forward under
`torch.no_grad()` inside a `SavedTensorMeter`, fed the real activations of the layers before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from splitgraph.config import OptimName, Workload, load_config, validate
from splitgraph.data import microbatch_sizes
from splitgraph.exercises import first_batch, table
from splitgraph.model import build_mlp, torch_dtype
from splitgraph.observe.memory import SavedTensorMeter
from splitgraph.partition import Plan, make_plan
from splitgraph.schedule import SCHEDULES, Schedule, build_schedule
from splitgraph.schedule.simulate import peak_inflight
from splitgraph.units import format_bytes

#: The schedules compared: those with one stage per rank (a stage's memory is a rank's).
ONE_STAGE_PER_RANK = tuple(name for name, spec in SCHEDULES.items() if not spec.virtual)


def predict_saved(work: Workload, plan: Plan, sched: Schedule, sizes: Sequence[int]) -> list[int]:
    """The memory model's saved-activation peak per stage (one stage per rank here)."""
    from splitgraph.config import recompute_stages
    from splitgraph.cost.memory_model import ModelShape, predict_for_plan

    es = torch.empty((), dtype=torch_dtype(work.runtime.dtype)).element_size()
    recompute = recompute_stages(work.schedule, plan.num_stages)
    shape = ModelShape.of(work.model, es)
    return predict_for_plan(shape, plan.bounds, sizes, sched, recompute)


#: (workload, plan, schedule, microbatch sizes) -> predicted peak saved-activation bytes per
#: stage.
SavedPredictor = Callable[[Workload, Plan, Schedule, Sequence[int]], Sequence[int]]


@dataclass(frozen=True)
class StageMemory:
    """One stage under one schedule; `*_pred` are predictions, the rest measured (bytes)."""

    stage: int
    rank: int
    layers: str
    inflight: int  # peak microbatches in flight on this stage (from the schedule)
    params_pred: int
    params: int
    grads_pred: int
    grads: int
    optim_pred: int
    optim: int
    saved_pred: int | None
    saved: int
    inference_saved: int

    @property
    def training(self) -> int:
        return self.params + self.grads + self.optim + self.saved

    @property
    def training_pred(self) -> int | None:
        if self.saved_pred is None:
            return None
        return self.params_pred + self.grads_pred + self.optim_pred + self.saved_pred

    @property
    def inference(self) -> int:
        return self.params + self.inference_saved


@dataclass(frozen=True)
class MemoryResult:
    nproc: int
    dtype: str
    optimizer: str
    batch_size: int
    overrides: list[str]
    schedules: dict[str, dict[str, Any]]  # name -> {"sizes": [...], "stages": [StageMemory]}

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "schedules"}
        out["schedules"] = {
            name: {
                "sizes": s["sizes"],
                "stages": [
                    {
                        **asdict(st),
                        "training": st.training,
                        "training_pred": st.training_pred,
                        "inference": st.inference,
                    }
                    for st in s["stages"]
                ],
            }
            for name, s in self.schedules.items()
        }
        return out


# -- the exact formulas ---------------------------------------------------------------------


def optimizer_state_elements(optim_cfg: Any, params: int, tensors: int) -> tuple[int, int]:
    """(elements in the parameters' dtype, float `step` scalars) of the optimizer's state."""
    name = OptimName(optim_cfg.name)
    if name == OptimName.sgd:
        return (params if float(optim_cfg.momentum) != 0.0 else 0), 0
    return 2 * params, tensors


def predict_state(optim: Any, dtype: Any, plan: Plan, stage: int) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes of `stage`: exact, from the layer shapes
    (`optim`: the optim section; `dtype`: runtime.dtype)."""
    elem = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    layers = [plan.layers[i] for i in plan.stage_range(stage)]
    params = sum(layer.params for layer in layers)
    tensors = sum(2 if layer.bias else 1 for layer in layers)
    like_params, scalars = optimizer_state_elements(optim, params, tensors)
    step_bytes = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    return params * elem, params * elem, like_params * elem + scalars * step_bytes


def schedule_overrides(name: str, microbatches: int) -> list[str]:
    """The overrides that select schedule `name` (naive runs one microbatch)."""
    m = 1 if name == "naive" else microbatches
    return [f"schedule={name}", f"pipeline.microbatches={m}"]


# -- measurement ----------------------------------------------------------------------------


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure_rank(rank: int, world: int, runs: list[list[str]]) -> list[dict[str, Any]]:
    """Inside `run_ranks`: one training step per override list; this rank's measured bytes."""
    from splitgraph.runtime.engine import PipelineEngine

    out = []
    for overrides in runs:
        cfg = load_config(overrides)
        work = Workload.of(cfg)
        engine = PipelineEngine(work, rank, world)
        x, y = first_batch(cfg.data, work, cfg.train.seed, engine.dtype)
        engine.step(x, y)
        assert engine.meter is not None, "runtime.track_memory must stay on for exercise 3"
        state = engine.optimizer.state
        out.append(
            {
                "stages": sorted(engine.stages),
                "params": tensor_bytes(engine.parameters()),
                "grads": tensor_bytes(p.grad for p in engine.parameters()),
                "optim": sum(tensor_bytes(state[p].values()) for p in engine.parameters()),
                "saved": engine.meter.peak,
            }
        )
    return out


def measure_inference(work: Workload, x: Tensor, plan: Plan) -> list[int]:
    """Saved bytes of each stage's forward under no_grad, on the inputs `x` (minibatch 0;
    single process)."""
    dtype = torch_dtype(work.runtime.dtype)
    h = x
    saved = []
    for s in range(plan.num_stages):
        r = plan.stage_range(s)
        stage = build_mlp(work.model, r.start, r.stop, dtype)
        meter = SavedTensorMeter(stage.parameters())
        with torch.no_grad(), meter:
            h = stage(h)
        saved.append(meter.peak)
    return saved


def run(
    overrides: Sequence[str],
    nproc: int,
    schedules: Sequence[str] = ONE_STAGE_PER_RANK,
    predict_saved: SavedPredictor | None = None,
    timeout: float = 300.0,
) -> MemoryResult:
    """Predict and measure every schedule's per-stage memory on `nproc` ranks."""
    from splitgraph.spawn import run_ranks

    base = load_config(list(overrides))
    runs, cfgs, plans, scheds, sizes_of = [], {}, {}, {}, {}
    for name in schedules:
        ov = [
            *overrides,
            *schedule_overrides(name, base.pipeline.microbatches),
            "runtime.track_memory=true",
        ]
        cfgs[name] = cfg = load_config(ov)
        validate(cfg, nproc)
        plans[name] = make_plan(Workload.of(cfg), nproc)
        sizes_of[name] = microbatch_sizes(cfg.train.batch_size, cfg.pipeline.microbatches)
        scheds[name] = build_schedule(name, nproc, len(sizes_of[name]))
        runs.append(ov)
    per_rank = run_ranks(measure_rank, nproc, runs, timeout=timeout)
    work = Workload.of(base)
    x, _ = first_batch(base.data, work, base.train.seed, torch_dtype(work.runtime.dtype))
    inference = measure_inference(work, x, make_plan(work, nproc))
    result: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(schedules):
        cfg, plan, sched, sizes = cfgs[name], plans[name], scheds[name], sizes_of[name]
        inflight = peak_inflight(sched)
        predicted_saved = (
            list(predict_saved(Workload.of(cfg), plan, sched, sizes))
            if predict_saved is not None
            else None
        )
        stages = []
        for s in range(plan.num_stages):
            m = per_rank[plan.rank_of(s)][k]
            assert m["stages"] == [s], "one stage per rank"
            params_p, grads_p, optim_p = predict_state(cfg.optim, cfg.runtime.dtype, plan, s)
            r = plan.stage_range(s)
            stages.append(
                StageMemory(
                    stage=s,
                    rank=plan.rank_of(s),
                    layers=f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}",
                    inflight=inflight[s],
                    params_pred=params_p,
                    params=m["params"],
                    grads_pred=grads_p,
                    grads=m["grads"],
                    optim_pred=optim_p,
                    optim=m["optim"],
                    saved_pred=None if predicted_saved is None else int(predicted_saved[s]),
                    saved=m["saved"],
                    inference_saved=inference[s],
                )
            )
        result[name] = {"sizes": list(sizes), "stages": stages}
    return MemoryResult(
        nproc=nproc,
        dtype=str(base.runtime.dtype.value),
        optimizer=_optimizer_text(base.optim),
        batch_size=int(base.train.batch_size),
        overrides=list(overrides),
        schedules=result,
    )


def _optimizer_text(optim_cfg: Any) -> str:
    name = OptimName(optim_cfg.name)
    if name == OptimName.sgd:
        return f"sgd(momentum={float(optim_cfg.momentum):g})"
    return "adam"


# -- the table ------------------------------------------------------------------------------


def _pair(pred: int | None, meas: int) -> str:
    """`measured (= predicted)`, or both when they differ, or `measured (n/a)`."""
    if pred is None:
        return f"{meas:,} (n/a)"
    return f"{meas:,} (=)" if pred == meas else f"{meas:,} (pred {pred:,})"


def render(result: MemoryResult) -> str:
    lines = [
        f"{result.nproc} stages (one per rank), batch {result.batch_size}, {result.dtype}, "
        f"{result.optimizer}; bytes measured (= when the prediction is identical)",
        "",
    ]
    head = (
        "stage",
        "layers",
        "params",
        "grads",
        "optimizer",
        "in flight",
        "saved activations",
        "training",
        "inference",
        "train/infer",
    )
    for name, s in result.schedules.items():
        lines.append(f"schedule {name}, microbatches {s['sizes']}")
        body = []
        for st in s["stages"]:
            body.append(
                (
                    str(st.stage),
                    st.layers,
                    _pair(st.params_pred, st.params),
                    _pair(st.grads_pred, st.grads),
                    _pair(st.optim_pred, st.optim),
                    str(st.inflight),
                    _pair(st.saved_pred, st.saved),
                    format_bytes(st.training),
                    format_bytes(st.inference) + ("" if st.inference_saved == 0 else " (!)"),
                    f"{st.training / st.inference:.2f}x",
                )
            )
        lines += [table(head, body, right=(2, 3, 4, 5, 6, 7, 8, 9)), ""]
    lines.append(
        "inference = parameters only: the forward under torch.no_grad() saved "
        + ("0 bytes on every stage" if _no_inference_saved(result) else "SOME BYTES (see (!))")
    )
    predicted = any(
        st.saved_pred is not None for s in result.schedules.values() for st in s["stages"]
    )
    lines.append(
        "training  = parameters + gradients + optimizer state + peak saved activations; "
        + (
            "saved activations predicted by splitgraph.cost.memory_model"
            if predicted
            else "saved activations not predicted (n/a)"
        )
    )
    return "\n".join(lines)


def _no_inference_saved(result: MemoryResult) -> bool:
    return all(st.inference_saved == 0 for s in result.schedules.values() for st in s["stages"])
