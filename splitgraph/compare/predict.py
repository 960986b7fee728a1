"""Each variant's memory per device, predicted before it runs, and set against the runtime's.

The harness prices a variant with the planner's cost model, not with the runtime's code:

    parameters, gradients, optimizer state   costs.ModelCosts.static_bytes of the rank's layers
    all-reduce buckets (parallel.dp > 1)     a second copy of the rank's gradients
    saved activations                        memory_model.predict_for_plan under its schedule

which are the parts the runtime's memory cap counts (reliability/memcap.py: measured after the
first step). `mismatches` sets the two side by side, part by part and rank by rank, so the
report can say "predicted = accounted" or name what differs. A variant whose prediction is
over the cap is refused without a launch unless `compare.confirm_refusals` (then the runtime
refuses it itself before its first step, and its record is compared the same way).

    global rank g of a dp x pp layout = replica g // pp, pipeline rank g % pp (runtime/mesh.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitgraph.config import Workload

#: the accounted parts, in the runtime's record order (runtime/memcap.accounting)
PARTS = ("params", "grads", "optimizer", "allreduce_buckets", "saved_peak", "total")


def per_rank(work: Workload, nproc: int) -> list[dict[str, Any]]:
    """The accounting every global rank of this training workload will report, predicted."""
    from splitgraph.config import recompute_stages
    from splitgraph.cost.costs import model_costs
    from splitgraph.cost.memory_model import ModelShape, predict_for_plan, predictable
    from splitgraph.partition import STRATEGIES, make_plan
    from splitgraph.schedule import build_schedule

    dp = work.dp
    pp = nproc // dp
    spec = STRATEGIES.get(work.partition.strategy)
    timed = spec is not None and "times" in spec.costs  # else no profiling
    costs = model_costs(work, pp, times=timed)  # sizes: each replica's B/dp rows
    plan = make_plan(work, pp, costs)
    sched = build_schedule(work.schedule.name, pp, len(costs.sizes), work.schedule.virtual_stages)
    saved: list[int | None] = [None] * pp
    if predictable(work.runtime):
        shape = ModelShape.of(work.model, costs.shape.element_size)
        recompute = recompute_stages(work.schedule, plan.num_stages)
        saved = list(predict_for_plan(shape, plan.bounds, costs.sizes, sched, recompute))
    pipeline = []
    for r in range(pp):
        ranges = [plan.stage_range(s) for s in plan.stages_of(r)]
        params = sum(costs.param_bytes(g.start, g.stop) for g in ranges)
        static = sum(costs.static_bytes(g.start, g.stop) for g in ranges)
        buckets = params if dp > 1 else 0
        pipeline.append(
            {
                "params": params,
                "grads": params,
                "optimizer": static - 2 * params,
                "allreduce_buckets": buckets,
                "saved_peak": saved[r],
                "total": static + buckets + (saved[r] or 0),
            }
        )
    return [{"rank": g, **pipeline[g % pp]} for g in range(dp * pp)]


def static_bytes(record: dict[str, Any]) -> int:
    """What no batch size changes: parameters, gradients, optimizer state, all-reduce buckets."""
    return int(record["total"]) - int(record.get("saved_peak") or 0)


def mismatches(predicted: list[dict[str, Any]], accounted: list[dict[str, Any]]) -> list[str]:
    """Each part where the runtime's record differs from the prediction ("rank 1 optimizer:
    predicted 96 B, accounted 100 B"); empty when they agree to the byte."""
    if not accounted:
        return []
    by_rank = {int(a["rank"]): a for a in accounted}
    if sorted(by_rank) != [int(p["rank"]) for p in predicted]:
        return [f"ranks: predicted {len(predicted)}, accounted {sorted(by_rank)}"]
    out = []
    for p in predicted:
        a = by_rank[int(p["rank"])]
        for part in PARTS:
            want, got = p.get(part), a.get(part, 0 if part == "allreduce_buckets" else None)
            if want is not None and want != got:
                out.append(f"rank {p['rank']} {part}: predicted {want:,} B, accounted {got} B")
    return out
