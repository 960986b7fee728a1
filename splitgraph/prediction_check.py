"""Training checks the planner: predicted vs measured, per stage, into summary.json.

* Saved activations: the memory model's per-rank peak (memory_model.py) against the
  meter's (runtime/memory.py). The accounting is deterministic, so they must be equal;
  `equal: false` is a bug in one of them.
* Times: each stage's predicted forward and backward seconds per microbatch (the layer
  profile, costs.py) against the same actions in this run. A forward or backward action
  starts by waiting for its input from the neighbouring rank; hooks on the stage module
  (forward pre-hook; a gradient hook on its output) mark when the compute itself starts,
  so `measured` is compute only and `wait` is the time spent waiting before it.
* The step: the simulator's step time for the plan against the run's median step.

Only the first `STEPS` steps after the first are timed (the executor's trace is switched
off again afterwards if this module switched it on), so long runs do not grow a trace.

`shared_plan` makes every rank use rank 0's plan: cost-based strategies measure, and two
nodes with separate profile caches could otherwise cut the model differently.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from splitgraph.partition import Plan, make_plan
from splitgraph.schedule.ir import Action, B, F

#: Steps timed after the first (which allocates and warms up).
STEPS = 50


def shared_plan(cfg: Any, world_size: int) -> Plan:
    """This rank's plan if alone; else rank 0's, broadcast to every rank."""
    plan = make_plan(cfg, world_size)
    if world_size > 1 and dist.is_initialized():
        box = [plan.bounds]
        dist.broadcast_object_list(box, src=0)
        plan = Plan(plan.layers, tuple(box[0]), plan.strategy, plan.num_ranks)
    return plan


class PredictionProbe:
    """Attach to an engine before training; `finish` after it (every rank calls both)."""

    def __init__(self, cfg: Any, engine: Any) -> None:
        self.cfg, self.engine = cfg, engine
        self.enabled = bool(cfg.costs.report)
        self.marks: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.handles: list[Any] = []
        self.own_trace = False
        if not self.enabled:
            return
        ex = engine.executor
        if ex.trace is None:
            ex.trace, self.own_trace = [], True
        self.trace: list[Any] = ex.trace  # kept even after the executor lets go of it
        self.trace_start = len(self.trace)
        self.limit = (STEPS + 1) * len(engine.sizes)
        for s, module in engine.stages.items():
            self.handles.append(module.register_forward_pre_hook(self._forward_mark(s)))
            self.handles.append(module.register_forward_hook(self._backward_mark(s)))

    def _forward_mark(self, stage: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            marks = self.marks[("F", stage)]
            marks.append(time.perf_counter())
            if len(marks) >= self.limit:
                self._stop_timing()

        return hook

    def _backward_mark(self, stage: int) -> Any:
        def hook(module: Any, args: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: self.marks[("B", stage)].append(time.perf_counter()))

        return hook

    def _stop_timing(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.own_trace:
            self.engine.executor.trace = None

    def _measured(self) -> dict[int, dict[str, list[float]]]:
        """Per stage: compute and wait seconds of each timed F and B (first step skipped)."""
        out: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        seen: dict[tuple[str, int], int] = defaultdict(int)
        full = max(self.engine.sizes)
        for label, t0, t1 in self.trace[self.trace_start :]:
            try:
                a = Action.parse(label)
            except ValueError:
                continue  # a group of transfers
            if a.op not in (F, B) or a.stage not in self.engine.stages:
                continue
            key = (a.op.value, a.stage)
            marks = [t for t in self.marks[key] if t0 <= t <= t1]
            seen[key] += 1
            if not marks or seen[key] <= len(self.engine.sizes):
                continue  # not hooked (timing over) or the first step
            if self.engine.sizes[a.mb] != full:
                continue  # compare like with like: the prediction is for the largest size
            out[a.stage][a.op.value].append(t1 - marks[0])
            out[a.stage][a.op.value + "_wait"].append(marks[0] - t0)
        return out

    def _spans(self) -> list[float]:
        """Seconds from this rank's first action to its last, per timed step (the executor
        traces one entry per program item, so a step is `len(program)` entries)."""
        per_step = len(self.engine.executor.program)
        entries = self.trace[self.trace_start :]
        steps = [entries[i : i + per_step] for i in range(0, len(entries), per_step)]
        return [st[-1][2] - st[0][1] for st in steps[1:] if len(st) == per_step]

    def finish(self, step_times: list[float]) -> dict[str, Any] | None:
        """Gather to rank 0 and return the comparison there (None elsewhere or if off)."""
        if not self.enabled:
            return None
        self._stop_timing()
        engine = self.engine
        local = {
            "rank": engine.rank,
            "stages": {s: dict(v) for s, v in self._measured().items()},
            "saved_peak": engine.meter.peak if engine.meter is not None else None,
            "span": _median(self._spans()),
        }
        link = self._link()
        if engine.world_size > 1 and dist.is_initialized():
            gathered: list[Any] = [None] * engine.world_size
            dist.gather_object(local, gathered if engine.rank == 0 else None, dst=0)
        else:
            gathered = [local]
        if engine.rank != 0:
            return None
        return _compare(self.cfg, engine, gathered, step_times, link)

    def _link(self) -> Any:
        """The configured link, else one measured between ranks 0 and 1 of this run."""
        from splitgraph.costs import Link, link_from_config

        engine = self.engine
        if self.cfg.pipeline.bandwidth is not None or engine.world_size == 1:
            return link_from_config(self.cfg, measure=False)
        from splitgraph.profiler import ping_pong

        got = ping_pong(engine.rank, 1 - engine.rank) if engine.rank < 2 else None
        box = [got]
        dist.broadcast_object_list(box, src=0)
        return Link(box[0]["bandwidth"], box[0]["latency"], "measured in this run (ranks 0-1)")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _compare(
    cfg: Any, engine: Any, gathered: list[Any], step_times: list[float], link: Any
) -> dict[str, Any]:
    from splitgraph.costs import model_costs
    from splitgraph.planner import predict

    costs = model_costs(cfg, engine.plan.num_stages, link=link, device=engine.device)
    pred = predict(engine.plan, costs)
    by_rank = {g["rank"]: g for g in gathered}
    stages = []
    for sp in pred.stages:
        got = by_rank[sp.rank]
        timing = got["stages"].get(sp.stage, {})
        stages.append(
            {
                "stage": sp.stage,
                "rank": sp.rank,
                "static_bytes": sp.static_bytes,  # parameters + gradients + optimizer state
                "saved_peak_bytes": {
                    "predicted": sp.saved_peak_bytes,
                    "measured": got["saved_peak"],
                    "equal": sp.saved_peak_bytes == got["saved_peak"],
                },
                "forward_s": {
                    "predicted": sp.forward_s,
                    "measured_median": _median(timing.get("F", [])),
                    "wait_median": _median(timing.get("F_wait", [])),
                    "samples": len(timing.get("F", [])),
                },
                "backward_s": {
                    "predicted": sp.backward_s,
                    "measured_median": _median(timing.get("B", [])),
                    "wait_median": _median(timing.get("B_wait", [])),
                    "samples": len(timing.get("B", [])),
                },
            }
        )
    steady = step_times[1:] if len(step_times) > 1 else step_times
    spans = [g["span"] for g in gathered if g["span"] is not None]
    return {
        "step_time_s": {
            "predicted": pred.step_time,  # the schedule: compute, transfers, bubble
            "measured_schedule_median": max(spans) if spans else None,  # slowest rank's span
            "measured_median": _median(steady),  # + optimizer, L2, all-reduce, logging
        },
        "bubble_predicted": pred.bubble,
        "time_source": costs.time_source,
        "link": {"bandwidth": link.bandwidth, "latency": link.latency, "source": link.source},
        "stages": stages,
        "saved_peaks_equal": all(s["saved_peak_bytes"]["equal"] for s in stages),
    }
