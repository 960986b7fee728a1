"""The per-layer cost model the planner decides with: bytes, FLOPs, times, link, devices.

Per layer `i` (weight out x in, optional bias), for a microbatch of `n` rows:

    parameters      params * e                   e: element size of runtime.dtype
    gradients       params * e                   (.grad, one per parameter)
    optimizer       params * e * k               k: SGD 0, SGD+momentum 1, Adam 2
                    (+ 4 bytes per tensor for Adam: torch's float32 `step` per parameter)
    saved for B     memory_model.stage_saved     exact, what the meter measures
    FLOPs forward   2 n in out (+ n out bias, + n out phi)
    FLOPs backward  2 n in out for dW (+ 2 n in out for dx unless layer 0, + n out bias)
    boundary        n out e bytes forward (activation) and backward (its gradient)
    times           measured forward/backward on this device (profiler.py), or FLOPs/speed

A stage's time is the sum of its layers' times divided by its device's `speed`; a message
over a cut costs `latency + bytes / bandwidth`. `ModelCosts` turns a split into the
simulator's `Costs`, and into the memory each rank needs under a schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from splitgraph.config import (
    CostsConfig,
    OptimName,
    PipelineConfig,
    TimeSource,
    Workload,
    recompute_stages,
)
from splitgraph.cost.link import Link
from splitgraph.cost.memory_model import ModelShape, Walk, predict_for_plan, predict_saved_peak
from splitgraph.data import microbatch_sizes
from splitgraph.model import torch_dtype
from splitgraph.plan import LayerSpec, layer_specs
from splitgraph.schedule import Costs, Schedule, build_schedule
from splitgraph.units import parse_bytes

log = logging.getLogger(__name__)


def optimizer_slots(optim_cfg: Any) -> int:
    """Optimizer state per parameter, in parameter-sized tensors: SGD 0, momentum 1, Adam 2."""
    if OptimName(optim_cfg.name) == OptimName.adam:
        return 2
    return 1 if float(optim_cfg.momentum) > 0 else 0


def optimizer_scalar_bytes(optim_cfg: Any) -> int:
    """Optimizer state per parameter *tensor* beside the slots: Adam keeps its step count as a
    float32 scalar tensor per parameter (torch's default; 4 bytes), SGD nothing."""
    return 4 if OptimName(optim_cfg.name) == OptimName.adam else 0


def flops(layer: LayerSpec, n: int, last: bool) -> tuple[int, int]:
    """(forward, backward) FLOPs of one layer for `n` rows (multiply-add = 2)."""
    mm = 2 * n * layer.in_features * layer.out_features
    vec = n * layer.out_features
    fwd = mm + (vec if layer.bias else 0) + (0 if last else vec)
    bwd = mm + (mm if layer.index > 0 else 0) + (vec if layer.bias else 0) + (0 if last else vec)
    return fwd, bwd


@dataclass(frozen=True)
class Device:
    speed: float = 1.0
    memory: int | None = None  # bytes; None: no cap


@dataclass(frozen=True)
class ModelCosts:
    """Everything the planner knows about the model on these devices, at microbatch `n`.

    `forward[i]`, `backward[i]`: seconds of layer i for one microbatch of `n` rows on a
    device of speed 1 (the one profiled). `sizes`: the microbatch sizes of a step.
    """

    layers: tuple[LayerSpec, ...]
    shape: ModelShape
    sizes: tuple[int, ...]
    forward: tuple[float, ...]
    backward: tuple[float, ...]
    link: Link
    devices: tuple[Device, ...]
    optimizer_slots: int
    time_source: str = "measured"
    optimizer_scalar_bytes: int = 0  # per parameter tensor (Adam's step: 4)
    schedule_name: str = "1f1b"
    recompute: frozenset[int] = frozenset()  # stages that recompute their forward in backward
    virtual_stages: int = 1  # stages per rank (schedule.virtual_stages: interleaved, V)
    _memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return self.sizes[0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_stages(self) -> int:
        return len(self.devices)

    # -- time ---------------------------------------------------------------------------

    def stage_time(self, stage: int, start: int, stop: int) -> tuple[float, float]:
        """(forward, backward) seconds of layers [start, stop) on stage `stage`'s device."""
        speed = self.devices[stage].speed
        f = sum(self.forward[start:stop]) / speed
        b = sum(self.backward[start:stop]) / speed
        return (f, b + f) if stage in self.recompute else (f, b)  # recomputed: F again in B

    def boundary_bytes(self, cut: int) -> int:
        """Bytes of one microbatch's activation crossing a cut before layer `cut`."""
        return self.n * self.layers[cut].in_features * self.shape.element_size

    def comm(self, cut: int) -> float:
        return self.link.time(self.boundary_bytes(cut))

    def sim_costs(self, bounds: Sequence[int]) -> Costs:
        """The simulator's per-stage costs for a split (uneven microbatches scale linearly)."""
        times = [self.stage_time(s, bounds[s], bounds[s + 1]) for s in range(len(bounds) - 1)]
        return Costs(
            forward=[f for f, _ in times],
            backward=[b for _, b in times],
            comm=[self.comm(c) for c in bounds[1:-1]],
            mb_scale=[k / self.n for k in self.sizes],
        )

    # -- memory -------------------------------------------------------------------------

    def param_bytes(self, start: int, stop: int) -> int:
        return sum(layer.params for layer in self.layers[start:stop]) * self.shape.element_size

    def param_tensors(self, start: int, stop: int) -> int:
        return sum(1 + int(layer.bias) for layer in self.layers[start:stop])

    def static_bytes(self, start: int, stop: int) -> int:
        """Parameters + gradients + optimizer state of layers [start, stop): what the
        runtime's memory cap counts (`runtime.memcap.accounting`), to the byte."""
        slots = self.param_bytes(start, stop) * (2 + self.optimizer_slots)
        return slots + self.optimizer_scalar_bytes * self.param_tensors(start, stop)

    def schedule(self, stages: int | None = None) -> Schedule:
        """The schedule over `stages` stages (default: one per device), on
        `stages / virtual_stages` ranks, as the runtime builds it."""
        k = self.num_stages if stages is None else stages
        v = max(int(self.virtual_stages), 1)
        if k % v:
            raise ValueError(
                f"{k} stages do not spread over ranks of {v} stages each "
                f"(schedule.virtual_stages={v})"
            )
        key = ("schedule", k)
        if key not in self._memo:
            self._memo[key] = build_schedule(self.schedule_name, k // v, len(self.sizes), v)
        return self._memo[key]

    def saved_peak(self, stage: int, start: int, stop: int) -> int:
        """Peak saved-activation bytes of `stage` holding [start, stop), under the schedule.

        One stage per rank: a stage's peak does not depend on the other stages' layers, so
        the strategies can price each (stage, layers) pair alone.
        """
        key = ("saved", stage, start, stop)
        if key not in self._memo:
            sched = self.schedule()
            walk = Walk(self.shape, lambda _: (start, stop), self.sizes, self.recompute)
            self._memo[key] = predict_saved_peak(sched, walk, only=stage)[sched.rank_of(stage)]
        return int(self._memo[key])

    def stage_memory(self, stage: int, start: int, stop: int) -> int:
        """Bytes stage `stage` needs: static + its peak saved activations (an upper bound on
        the peak of their sum: gradients do not exist yet while GPipe's forwards run)."""
        return self.static_bytes(start, stop) + self.saved_peak(stage, start, stop)

    def cap(self, stage: int) -> int | None:
        return self.devices[stage].memory

    def auto_input(self, bounds: Sequence[int], ranks: int, split_overhead: float = 1.0) -> Any:
        """schedule=auto's input for a plan (`bounds`, ranks x chunks stages): the planner's
        per-stage costs, each rank's memory in bytes (static bytes of the stages the
        schedule puts on it + the exact saved-activation peak) and its cap.

        The profiler measures B, not I and W: each is priced at B/2 x `split_overhead`. Not
        used here: the machine calibration of docs/prediction.md (per-action overhead, compute
        factor, the split backward timed as the executor runs it), so auto can misjudge a
        schedule whose action count or I/W split differs (results/schedules/README.md).
        Returns a schedule.auto.AutoInput; `plan_auto(...)` builds the schedule."""
        from splitgraph.cost.memory_model import plan_walk
        from splitgraph.schedule.auto import AutoInput

        stages = len(bounds) - 1
        if stages % ranks:
            raise ValueError(f"{stages} stages do not spread over {ranks} ranks")
        if stages > ranks and len({d.speed for d in self.devices}) > 1:
            raise ValueError(
                "schedule=auto with several chunks per rank prices every stage at one speed; "
                "pipeline.devices gives different speeds (the stage's rank depends on the "
                "placement auto chooses)"
            )
        one_speed = replace(self, devices=(self.devices[0],) * stages, _memo={})
        sim = (self if stages == ranks else one_speed).sim_costs(bounds)
        half = [b / 2 * split_overhead for b in sim.backward]
        costs = Costs(sim.forward, sim.backward, half, half, sim.comm, sim.mb_scale)
        walk = plan_walk(self.shape, bounds, self.sizes, self.recompute)
        static = [self.static_bytes(bounds[s], bounds[s + 1]) for s in range(stages)]

        def memory(sched: Schedule) -> list[float]:
            saved = predict_saved_peak(sched, walk)
            return [saved[r] + sum(static[s] for s in sched.stages_of(r)) for r in range(ranks)]

        def footprint(s: int) -> float:  # the most one microbatch holds from F to W
            return float(
                max(
                    max(sum(walk.saved(s, k).values()), sum(walk.deferred(s, k).values()))
                    for k in range(len(self.sizes))
                )
            )

        caps = [self.devices[r].memory if r < len(self.devices) else None for r in range(ranks)]
        cap = None
        if any(c is not None for c in caps):
            cap = [float("inf") if c is None else float(c) for c in caps]
        weights = [footprint(s) for s in range(stages)]
        return AutoInput(
            ranks,
            len(self.sizes),
            costs,
            stages // ranks,
            cap,
            memory,
            "bytes",
            weights=weights,
            static=[float(x) for x in static],
        )


#: What schedule=auto prices a transfer with when pipeline.bandwidth is unset and this host's
#: link was never measured: the order of gloo over loopback on a 2-core host (measured
#: here: 1.0 GB/s, 254 us per message). A guess, said so in the log: set pipeline.bandwidth
#: and pipeline.latency for the real link (NCCL over NVLink is 100x faster).
A_PRIORI_LINK = Link(1e9, 2.5e-4, "a-priori default (pipeline.bandwidth unset, link not measured)")


def auto_link(p: PipelineConfig, costs: CostsConfig) -> Link:
    """The link schedule=auto prices transfers with, the same on every rank of a node:
    pipeline.bandwidth/latency if set, else the node's cached measurement (the planner's:
    `splitgraph-plan`, `bench.schedules`), else `A_PRIORI_LINK`. It measures nothing: every
    rank reads it before the process group, and a measurement racing the others would
    give them different numbers (ranks that still differ, on nodes with caches of their
    own, stop at `same_schedule_everywhere`)."""
    if p.bandwidth is not None:
        return link_from_config(p, costs, measure=False)
    from splitgraph.cost.profiler import cached_link

    link = cached_link(costs) or A_PRIORI_LINK
    if p.latency is not None:
        link = Link(link.bandwidth, float(p.latency), link.source + ", configured latency")
    return link


def auto_input_for_run(work: Workload, ranks: int, bounds: Sequence[int]) -> Any:
    """schedule=auto's input for a training run: the planner's costs of this plan (`bounds`,
    ranks x schedule.virtual_stages stages) at each replica's microbatch sizes, transfers
    priced by `auto_link`, each rank's pipeline.memory_cap (exact bytes)."""
    stages = len(bounds) - 1
    link = auto_link(work.pipeline, work.costs)
    log.info("schedule=auto prices transfers with %s", link)
    return model_costs(work, stages, link=link).auto_input(bounds, ranks)


def auto_schedule(work: Workload, ranks: int, bounds: Sequence[int]) -> Schedule:
    """schedule=auto for a training run: `plan_auto` on `auto_input_for_run`. Deterministic
    for equal costs; the layer times come from costs.times (measured: the node's shared
    profile cache), the link from `auto_link`."""
    from splitgraph.schedule.auto import plan_auto

    return plan_auto(auto_input_for_run(work, ranks, bounds)).schedule


def devices_from_config(p: PipelineConfig, stages: int) -> tuple[Device, ...]:
    """`pipeline.devices` (speed, memory), else identical devices capped by memory_cap."""
    default_cap = parse_bytes(p.memory_cap) if p.memory_cap is not None else None
    if p.devices is None:
        return tuple(Device(1.0, default_cap) for _ in range(stages))
    return tuple(
        Device(float(d.speed), parse_bytes(d.memory) if d.memory is not None else default_cap)
        for d in p.devices
    )


def link_from_config(p: PipelineConfig, costs: CostsConfig, measure: bool = True) -> Link:
    """`pipeline.bandwidth`/`latency` if set, else the measured (cached) gloo link."""
    if p.bandwidth is not None:
        return Link(float(parse_bytes(p.bandwidth)), float(p.latency or 0.0), "configured")
    if not measure:
        return Link(float("inf"), float(p.latency or 0.0), "none (pipeline.bandwidth unset)")
    from splitgraph.cost.profiler import measured_link

    link = measured_link(costs)
    if p.latency is not None:
        link = Link(link.bandwidth, float(p.latency), link.source + ", configured latency")
    return link


def model_costs(
    work: Workload,
    stages: int | None = None,
    link: Link | None = None,
    device: torch.device | str = "cpu",
    times: bool = True,
) -> ModelCosts:
    """The cost model for `work` on `stages` stages: profiles (or FLOP-prices) every layer at
    the run's microbatch size, reads the devices and the link (measured if not configured
    and `link` is not given). `times=False` skips the times (memory-only questions)."""
    k = work.num_stages(1) if stages is None else stages
    dtype = torch_dtype(work.runtime.dtype)
    es = torch.empty((), dtype=dtype).element_size()
    layers = layer_specs(work.model)
    # each data-parallel replica cuts its own B/dp rows into the microbatches
    sizes = tuple(microbatch_sizes(work.local_batch, work.pipeline.microbatches))
    source = TimeSource(work.costs.times)
    if not times:
        fwd = bwd = (0.0,) * len(layers)
        link = link or link_from_config(work.pipeline, work.costs, measure=False)
    elif source == TimeSource.flops:
        rate = work.costs.flops_per_s
        pairs = [flops(layer, sizes[0], layer.index == len(layers) - 1) for layer in layers]
        fwd = tuple(f / rate for f, _ in pairs)
        bwd = tuple(b / rate for _, b in pairs)
    else:
        from splitgraph.cost.profiler import profile_layers

        times = profile_layers(work.model, work.costs, sizes[0], dtype, torch.device(device))
        fwd = tuple(t[0] for t in times)
        bwd = tuple(t[1] for t in times)
    return ModelCosts(
        layers=layers,
        shape=ModelShape.of(work.model, es),
        sizes=sizes,
        forward=fwd,
        backward=bwd,
        link=link if link is not None else link_from_config(work.pipeline, work.costs),
        devices=devices_from_config(work.pipeline, k),
        optimizer_slots=optimizer_slots(work.optim),
        optimizer_scalar_bytes=optimizer_scalar_bytes(work.optim),
        time_source=source.value if times else "none",
        schedule_name=work.schedule.name,
        recompute=frozenset(recompute_stages(work.schedule, k)),
        virtual_stages=int(work.schedule.virtual_stages),
    )


def predicted_saved_peaks(costs: ModelCosts, bounds: Sequence[int]) -> list[int]:
    """Per-rank saved-activation peaks of a whole plan (the meter's number, exactly)."""
    return predict_for_plan(
        costs.shape, bounds, costs.sizes, costs.schedule(len(bounds) - 1), costs.recompute
    )
