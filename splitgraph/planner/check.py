"""Training checks the planner: predicted vs measured, into summary.json's `prediction`.

* Saved activations, per rank: the memory model's peak (memory_model.py) against the
  meter's (observe/memory.py). The accounting is deterministic, so they must be equal;
  `equal: false` is a bug in one of them. (Not priced under bf16 autocast: see
  `memory_model.predictable`.)
* Times, per stage: the cost model's forward and backward seconds per microbatch (the layer
  profile, costs.py) against the run's own, measured from its trace (observe/trace.py:
  compute only, the wait for a neighbour's data excluded).
* The step: the simulator's step time for the plan and the cost model, against the run's
  schedule span (first action to last, all ranks) and its median step (which adds the
  optimizer, the L2 term and the metrics all-reduce).

`shared_plan` makes every rank use rank 0's plan: cost-based strategies measure, and two
nodes with separate profile caches could otherwise cut the model differently.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

import torch.distributed as dist

from splitgraph.config import Workload
from splitgraph.partition import Plan, make_plan


def shared_plan(work: Workload, world_size: int) -> Plan:
    """This rank's plan if alone; else rank 0's, broadcast to every rank."""
    plan = make_plan(work, world_size)
    if world_size > 1 and dist.is_initialized():
        box = [plan.bounds]
        dist.broadcast_object_list(box, src=0)
        plan = replace(plan, bounds=tuple(box[0]))  # the placement is the schedule's
    return plan


def same_schedule_everywhere(schedule: Any) -> None:
    """Every rank runs the schedule rank 0 runs, or every rank stops with the same error.

    schedule=auto builds its order from the planner's costs on each rank; one node's ranks
    read one profile cache, but nodes with caches of their own could build different
    orders, which would pair the wrong transfers. One all_gather of a digest decides."""
    import hashlib

    from splitgraph.errors import ConfigError

    text = repr((schedule.stage_to_rank, schedule.actions))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, digest)
    differ = [r for r, d in enumerate(every) if d != every[0]]
    if differ:
        raise ConfigError(
            f"schedule={schedule.name.split()[0]} built a different schedule on ranks "
            f"{differ} than on rank 0: their layer costs or link differ (each node profiles "
            "and caches its own). Set costs.times=flops and pipeline.bandwidth (with "
            "pipeline.latency), or share costs.cache_dir between the nodes."
        )


def measure_link(engine: Any) -> Any:
    """The configured link, else one measured between ranks 0 and 1 of this run (every rank
    calls this: it broadcasts).

    The measurement goes through the engine's own transport (`engine.p2p`): tensors on the
    engine's device, on its backend and channel groups (activations 0 -> 1, gradients back),
    staged through host memory when ranks share a GPU. An NCCL group cannot send the CPU
    tensors a plain `dist.send` would use, and a gloo group cannot send CUDA ones."""
    from splitgraph.cost.costs import link_from_config
    from splitgraph.cost.link import Link

    work = engine.work
    if work.pipeline.bandwidth is not None or engine.world_size == 1:
        return link_from_config(work.pipeline, work.costs, measure=False)
    from splitgraph.cost.profiler import ping_pong

    # Replica 0's first two pipeline ranks (global ranks 0 and 1) measure; the rest wait.
    first = engine.dp_rank == 0 and engine.rank < 2
    got = None
    if first:
        send, recv, restore = _p2p_pair(engine)
        try:
            got = ping_pong(
                engine.rank, 1 - engine.rank, send=send, recv=recv, device=engine.device
            )
        finally:
            restore()
    box = [got]
    dist.broadcast_object_list(box, src=0)
    what = f"{engine.transport} over {dist.get_backend()} on {engine.device.type}"
    return Link(box[0]["bandwidth"], box[0]["latency"], f"measured in this run (ranks 0-1, {what})")


def _p2p_pair(engine: Any) -> tuple[Any, Any, Any]:
    """send/recv through `engine.p2p` between pipeline ranks 0 and 1, and a function that puts
    back its traffic counters (the summary's comm figures are the training's)."""
    from splitgraph.runtime.comm import Transfer

    p2p = engine.p2p
    counters = (p2p.bytes_sent, p2p.messages_sent)

    def kind(sender: int) -> str:  # 0 -> 1 carries activations, 1 -> 0 gradients
        return "act" if sender == 0 else "grad"

    def send(t: Any, peer: int) -> None:
        p2p.post([Transfer(True, t, peer, kind(engine.rank), "link")])[0].wait()

    def recv(t: Any, peer: int) -> None:
        p2p.post([Transfer(False, t, peer, kind(peer), "link")])[0].wait()

    def restore() -> None:
        p2p.bytes_sent, p2p.messages_sent = counters

    return send, recv, restore


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def compare(
    engine: Any,
    memories: list[dict[str, Any]],
    timeline: dict[str, Any] | None,
    step_times: list[float],
    link: Any,
) -> dict[str, Any]:
    """Rank 0: the prediction for this run's plan (the engine's workload), set against what
    the run measured."""
    from splitgraph.config import recompute_stages
    from splitgraph.cost.costs import model_costs
    from splitgraph.cost.memory_model import ModelShape, predict_for_plan, predictable

    plan, sched, sizes, work = engine.plan, engine.schedule, engine.sizes, engine.work
    # replica 0's ranks are the pipeline's ranks 0..pp-1 (the replicas measure the same)
    measured_saved = {
        m["rank"]: m["saved_activation_peak_bytes"] for m in memories if m.get("replica", 0) == 0
    }
    out: dict[str, Any] = {}
    if predictable(work.runtime):
        shape = ModelShape.of(work.model, engine.dtype.itemsize)
        recompute = recompute_stages(work.schedule, plan.num_stages)
        predicted = predict_for_plan(shape, plan.bounds, sizes, sched, recompute)
        out["saved_peak_bytes_per_rank"] = [
            {
                "rank": r,
                "predicted": predicted[r],
                "measured": measured_saved.get(r),
                "equal": predicted[r] == measured_saved.get(r),
            }
            for r in range(plan.num_ranks)
        ]
        out["saved_peaks_equal"] = all(x["equal"] for x in out["saved_peak_bytes_per_rank"])
    else:
        out["saved_peak_bytes_per_rank"] = None
        out["note"] = "saved bytes under bf16 autocast are measured, not predicted"
    if plan.num_stages != plan.num_ranks:
        out["times"] = "not predicted: the cost model prices one stage per rank"
        return out
    from splitgraph.planner.predict import predict

    costs = model_costs(work, plan.num_stages, link=link, device=engine.device)
    pred = predict(plan, costs, sched)
    measured_costs = (timeline or {}).get("costs_per_stage_s") or {}
    stages = []
    for sp in pred.stages:
        f = measured_costs.get("forward", [None] * plan.num_stages)[sp.stage]
        b = measured_costs.get("backward", [None] * plan.num_stages)[sp.stage]
        stages.append(
            {
                "stage": sp.stage,
                "rank": sp.rank,
                "static_bytes": sp.static_bytes,  # parameters + gradients + optimizer state
                "forward_s": {"predicted": sp.forward_s, "measured": f},
                "backward_s": {"predicted": sp.backward_s, "measured": b},
            }
        )
    steady = step_times[1:] if len(step_times) > 1 else step_times
    span = ((timeline or {}).get("measured") or {}).get("schedule_span_median_s")
    out.update(
        {
            "step_time_s": {
                "predicted": pred.step_time,  # the schedule: compute, transfers, bubble
                "measured_schedule_median": span,  # the same span, measured from the trace
                "measured_median": _median(steady),  # + optimizer, L2, all-reduce, logging
            },
            "bubble_predicted": pred.bubble,
            "time_source": costs.time_source,
            "link": {"bandwidth": link.bandwidth, "latency": link.latency, "source": link.source},
            "stages": stages,
        }
    )
    return out
