"""A per-device memory cap, enforced honestly: an accounting on CPU, the allocator on GPU.

`pipeline.memory_cap` ("64MiB") bounds what one process may hold. On CPU there is no allocator
to refuse, so the cap applies to an exact, deterministic accounting per rank:

    parameters + gradients + optimizer state (+ all-reduce buckets) + peak bytes saved for backward

(conservative: gradients and saved activations are counted as if they coexisted). With data
parallelism (parallel.dp > 1) each rank also holds its gradients flattened into all-reduce
buckets while they are summed (runtime/gradsync.py): a second copy of its gradients. Before the
first step the parameter, gradient, optimizer and bucket bytes are known (the same arithmetic
as the planner's `ModelCosts.static_bytes`) and the saved-activation peak
is predicted by the memory model (`splitgraph.cost.memory_model`, exact except under bf16
autocast), so a run that cannot fit stops before it allocates a single activation; after the
first step the peak is measured (every step has the same shapes, so the first step's peak is
every step's) and checked again. Every rank checks every rank's figures at both points (one
`all_gather_object` each), so all ranks stop together with the same `OutOfMemory`, naming
the bytes needed and the cap. Inputs, received boundary buffers and the interpreter are not
counted: peak RSS is reported beside the accounting for that reason.

On GPU the caching allocator enforces the cap (`set_per_process_memory_fraction`), and a
`torch.cuda.OutOfMemoryError` becomes the same `OutOfMemory`, needing at least the bytes
allocated plus the request it refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from splitgraph.config import OptimName, PipelineConfig
from splitgraph.errors import ConfigError, OutOfMemory
from splitgraph.units import format_bytes, parse_bytes

#: the exit status of a run stopped by the memory cap (2 is a configuration error)
EXIT_OOM = 3


def cap_bytes(pipeline: PipelineConfig) -> int | None:
    """pipeline.memory_cap in bytes (None: no cap)."""
    cap = pipeline.memory_cap
    return None if cap is None else parse_bytes(cap)


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def predicted_optimizer_bytes(optim_cfg: Any, params: list[torch.Tensor]) -> int:
    """Optimizer state as torch allocates it at the first step (`optimizer_bytes_for`)."""
    return optimizer_bytes_for(optim_cfg, _nbytes(params), len(params))


def optimizer_bytes_for(optim_cfg: Any, param_bytes: int, tensors: int) -> int:
    """SGD keeps a momentum buffer (when momentum > 0); Adam keeps two moments per parameter
    and a float32 step counter per parameter tensor. From counts, so it prices a model
    before it exists (splitgraph/reliability/preflight.py)."""
    name = OptimName(optim_cfg.name)
    if name == OptimName.sgd:
        return param_bytes if float(optim_cfg.momentum) > 0 else 0
    return 2 * param_bytes + 4 * tensors


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (exact, once it has stepped)."""
    return sum(
        _nbytes([v]) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)
    )


def predicted_saved_peak(engine: Any) -> int | None:
    """The memory model's saved-activation peak for this rank's actions (None under bf16
    autocast, where it is not exact)."""
    from splitgraph.config import recompute_stages
    from splitgraph.cost.memory_model import ModelShape, predict_for_plan, predictable

    if not predictable(engine.work.runtime):
        return None
    shape = ModelShape.of(engine.work.model, engine.dtype.itemsize)
    recompute = recompute_stages(engine.work.schedule, engine.plan.num_stages)
    peaks = predict_for_plan(shape, engine.plan.bounds, engine.sizes, engine.schedule, recompute)
    return int(peaks[engine.rank])


def accounting(engine: Any, cap: int | None, measured: bool) -> dict[str, Any]:
    """This rank's accounted bytes: before a step with the optimizer state and the
    saved-activation peak predicted, once a step has run with both measured."""
    params = engine.parameters()
    p = _nbytes(params)
    sync = getattr(engine, "gradsync", None)
    if measured:
        grads = _nbytes([q.grad for q in params if q.grad is not None])
        opt = optimizer_state_bytes(engine.optimizer)
        buckets = sync.in_flight_peak_bytes if sync is not None else 0
        saved = engine.meter.peak if engine.meter is not None else None
    else:
        grads = p
        opt = predicted_optimizer_bytes(engine.work.optim, params)
        buckets = p if sync is not None else 0  # every gradient, flattened, at `finish`
        saved = predicted_saved_peak(engine)
    total = p + grads + opt + buckets + (saved or 0)
    return {
        "rank": dist.get_rank() if dist.is_initialized() else engine.rank,
        "params": p,
        "grads": grads,
        "optimizer": opt,
        "allreduce_buckets": buckets,
        "saved_peak": saved,
        "saved_peak_source": "measured" if measured else "predicted" if saved is not None else None,
        "total": total,
        "cap": cap,
    }


def check(records: list[dict[str, Any]], cap: int | None, phase: str, note: str = "") -> None:
    """Raise OutOfMemory (the same on every rank) if any rank's accounted total exceeds the cap
    (`note`: a sentence added to the remedy)."""
    if cap is None:
        return
    over = [r for r in records if r["total"] > cap]
    if not over:
        return
    worst = max(over, key=lambda r: r["total"])
    saved = worst["saved_peak"]
    buckets = worst.get("allreduce_buckets") or 0
    parts = (
        f"parameters {format_bytes(worst['params'])} + gradients {format_bytes(worst['grads'])} "
        f"+ optimizer state {format_bytes(worst['optimizer'])}"
        + (f" + all-reduce buckets {format_bytes(buckets)}" if buckets else "")
        + (
            f" + saved activations {format_bytes(saved)}"
            + (f" ({worst['saved_peak_source']})" if worst.get("saved_peak_source") else "")
            if saved is not None
            else ""
        )
    )
    raise OutOfMemory(
        f"out of memory {phase}: rank {worst['rank']} needs {worst['total']:,} bytes "
        f"({format_bytes(worst['total'])}: {parts}) but pipeline.memory_cap is {cap:,} bytes "
        f"({format_bytes(cap)}). {_hint(worst, cap)}{note}",
        needed=int(worst["total"]),
        cap=cap,
        rank=int(worst["rank"]),
        phase=phase,
        records=records,
    )


def _hint(record: dict[str, Any], cap: int) -> str:
    if record["total"] - (record["saved_peak"] or 0) > cap:
        dp = (
            " (data parallelism copies them to every replica, and its all-reduce buckets "
            "add a second copy of the gradients)"
            if record.get("allreduce_buckets")
            else ""
        )
        return (
            "Parameters, gradients and optimizer state alone exceed it, whatever the batch"
            f"{dp}: split the layers over more stages, or use an optimizer with less state."
        )
    return (
        "The saved activations push it over: more stages, more microbatches (1F1B), a "
        "smaller batch or recomputation lower them."
    )


def check_all_ranks(engine: Any, cap: int | None, measured: bool, phase: str) -> list[dict]:
    """Every rank's accounting, gathered to every rank, then checked against the cap."""
    mine = accounting(engine, cap, measured)
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank of every replica
        records: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(records, mine)
    else:
        records = [mine]
    if engine.device.type != "cuda":  # on GPU the allocator enforces the cap
        check(records, cap, phase)
    return records


# -- GPU: the caching allocator's limit ---------------------------------------------------


def cuda_fraction(cap: int, total: int) -> float:
    """The fraction of the device that `set_per_process_memory_fraction` needs for `cap`."""
    if cap > total:
        raise ConfigError(
            f"pipeline.memory_cap={format_bytes(cap)} exceeds this GPU's "
            f"{format_bytes(total)}: lower the cap or leave it unset."
        )
    return cap / total


def apply_cuda_cap(cap: int | None, device: torch.device) -> None:
    if cap is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(cuda_fraction(cap, total), device)


def lift_cuda_cap(device: torch.device) -> None:
    """Give the allocator the whole device again (after training, for the cost report)."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)


_REQUEST = re.compile(r"Tried to allocate ([0-9.]+) ?([KMGT]?i?B)")


def from_cuda_oom(
    exc: BaseException,
    allocated: int,
    cap: int | None,
    rank: int,
    step: int | None = None,
    phase: str | None = None,
) -> OutOfMemory:
    """Turn the allocator's error into OutOfMemory; needed >= allocated + the refused request.
    `phase`: where it happened ("at step 3", "building the engine ..."; default from `step`)."""
    m = _REQUEST.search(str(exc))
    request = parse_bytes(m.group(1) + m.group(2)) if m else 0
    needed = allocated + request
    phase = phase or (f"at step {step}" if step is not None else "before training")
    cap_text = f"{cap:,} bytes ({format_bytes(cap)})" if cap is not None else "the device"
    return OutOfMemory(
        f"out of memory {phase}: rank {rank} needs at least {needed:,} bytes "
        f"({format_bytes(needed)}: {format_bytes(allocated)} allocated + a request of "
        f"{format_bytes(request)}) but the cap is {cap_text}.",
        needed=needed,
        cap=cap,
        rank=rank,
        phase=phase,
        records=[],
    )


def write_oom(run_dir: Path, err: OutOfMemory) -> Path:
    """What the harness reads when rank 0 may not write summary.json: the rank that ran out
    on a GPU, or every rank refusing alone before the process group (named for the rank over)."""
    path = Path(run_dir) / f"oom_rank{err.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # several ranks may write the same verdict, and torchrun may stop one mid-write: a file
    # of this process's own, renamed into place, is never seen half-written
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(err.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
