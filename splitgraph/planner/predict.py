"""What a plan is predicted to cost: per stage time, memory and traffic; the step and bubble.

    config -> ModelCosts (costs.py) -> Plan (partition/) -> Prediction
        per stage: layers, parameters, forward/backward seconds per microbatch, memory
        (parameters + gradients + optimizer state + peak saved activations under the
        schedule, the last exactly what the runtime's meter measures), bytes sent forward
        per microbatch, busy share of the step;
        the step: the simulator's step time and bubble for the chosen schedule.

`splitgraph-plan` prints it and writes it as plan.json; training compares it with what it
measured (splitgraph/planner/check.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitgraph.cost.costs import ModelCosts
from splitgraph.cost.memory_model import predict_for_plan
from splitgraph.partition import Plan
from splitgraph.schedule import Schedule, simulate
from splitgraph.units import format_bytes


@dataclass(frozen=True)
class StagePrediction:
    stage: int
    rank: int
    layers: tuple[int, int]  # first, last (inclusive)
    params: int
    forward_s: float  # one microbatch of the largest size
    backward_s: float
    static_bytes: int  # parameters + gradients + optimizer state
    saved_peak_bytes: int  # peak saved activations on the rank (exact)
    cap_bytes: int | None
    sends_bytes: int | None  # activation bytes per microbatch to the next stage (None: last)
    busy_s: float  # compute per step

    @property
    def memory_bytes(self) -> int:
        return self.static_bytes + self.saved_peak_bytes


@dataclass(frozen=True)
class Prediction:
    plan: Plan
    costs: ModelCosts
    stages: tuple[StagePrediction, ...]
    step_time: float
    bubble: float  # idle share of all ranks' time

    def share(self, stage: int) -> float:
        return self.stages[stage].busy_s / self.step_time if self.step_time > 0 else 0.0

    @property
    def peak_memory(self) -> int:
        return max(s.memory_bytes for s in self.stages)

    @property
    def fits(self) -> bool:
        return all(s.cap_bytes is None or s.memory_bytes <= s.cap_bytes for s in self.stages)

    def table(self) -> str:
        c = self.costs
        rows = [
            (
                "stage",
                "rank",
                "layers",
                "params",
                "F ms",
                "B ms",
                "memory = static + activations",
                "sends/mb",
                "busy",
            )
        ]
        for st in self.stages:
            first, last = st.layers
            cap = f" / {format_bytes(st.cap_bytes)}" if st.cap_bytes is not None else ""
            rows.append(
                (
                    str(st.stage),
                    str(st.rank),
                    str(first) if first == last else f"{first}-{last}",
                    f"{st.params:,}",
                    f"{st.forward_s * 1e3:.3f}",
                    f"{st.backward_s * 1e3:.3f}",
                    f"{format_bytes(st.memory_bytes)} = {format_bytes(st.static_bytes)} + "
                    f"{format_bytes(st.saved_peak_bytes)}{cap}",
                    "(loss)" if st.sends_bytes is None else format_bytes(st.sends_bytes),
                    f"{self.share(st.stage):.0%}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        sizes = c.sizes
        size_text = (
            str(sizes[0]) if len(set(sizes)) == 1 else "/".join(map(str, sorted(set(sizes))))
        )
        head = (
            f"plan: {self.plan.strategy}, {self.plan.num_layers} layers on "
            f"{self.plan.num_stages} stages; schedule {c.schedule_name}, {len(sizes)} "
            f"microbatches of {size_text}"
        )
        link = c.link
        link_text = (
            "no transfer cost"
            if link.bandwidth == float("inf")
            else f"{link.bandwidth / 1e9:.2f} GB/s + {link.latency * 1e6:.0f} us, {link.source}"
        )
        foot = [
            f"predicted step {self.step_time * 1e3:.3f} ms, bubble {self.bubble:.0%}"
            f"{'' if self.fits else '; DOES NOT FIT the memory cap'}",
            f"times: {c.time_source}; link: {link_text}; memory excludes allocator slack, "
            "workspaces and receive buffers",
        ]
        return "\n".join([head, *lines, *foot])

    def to_dict(self) -> dict[str, Any]:
        c = self.costs
        return {
            "plan": self.plan.to_dict(),
            "schedule": c.schedule_name,
            "microbatch_sizes": list(c.sizes),
            "step_time_s": self.step_time,
            "bubble": self.bubble,
            "fits": self.fits,
            "time_source": c.time_source,
            "link": {
                "bandwidth": c.link.bandwidth,
                "latency": c.link.latency,
                "source": c.link.source,
            },
            "stages": [
                {
                    "stage": st.stage,
                    "rank": st.rank,
                    "layers": list(st.layers),
                    "params": st.params,
                    "forward_s": st.forward_s,
                    "backward_s": st.backward_s,
                    "static_bytes": st.static_bytes,
                    "saved_peak_bytes": st.saved_peak_bytes,
                    "memory_bytes": st.memory_bytes,
                    "cap_bytes": st.cap_bytes,
                    "sends_bytes_per_microbatch": st.sends_bytes,
                    "busy_s": st.busy_s,
                    "share_of_step": self.share(st.stage),
                }
                for st in self.stages
            ],
            "layers": [
                {
                    "layer": layer.index,
                    "shape": [layer.out_features, layer.in_features],
                    "bias": layer.bias,
                    "forward_s": c.forward[layer.index],
                    "backward_s": c.backward[layer.index],
                }
                for layer in c.layers
            ],
        }


def predict(plan: Plan, costs: ModelCosts, schedule: Schedule | None = None) -> Prediction:
    """Predicted time and memory of `plan` under `costs` (its schedule and microbatches).

    `schedule`: the run's, where the config alone does not build it (schedule=auto, csv)."""
    k, b = plan.num_stages, plan.bounds
    sched = schedule if schedule is not None else costs.schedule(k)
    sim = simulate(sched, costs.sim_costs(b))
    saved = predict_for_plan(costs.shape, b, costs.sizes, sched, costs.recompute)
    stages = []
    for s in range(k):
        lo, hi = b[s], b[s + 1]
        f, bw = costs.stage_time(s, lo, hi)
        rank = plan.rank_of(s)
        stages.append(
            StagePrediction(
                stage=s,
                rank=rank,
                layers=(lo, hi - 1),
                params=plan.stage_params(s),
                forward_s=f,
                backward_s=bw,
                static_bytes=costs.static_bytes(lo, hi),
                saved_peak_bytes=saved[rank],
                cap_bytes=costs.cap(s),
                sends_bytes=None if s == k - 1 else costs.boundary_bytes(hi),
                busy_s=sim.busy[rank],
            )
        )
    return Prediction(plan, costs, tuple(stages), sim.step_time, sim.bubble_fraction)
