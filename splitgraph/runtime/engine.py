"""`PipelineEngine`: one rank's share of the pipeline, from config to an optimizer step.

    config -> Plan -> Schedule (validated) -> this rank's StageModules + optimizer -> Executor

The engine is what `train.py`, the tests and the benchmarks drive; it never creates a
process group (it is handed one, or a DeviceMesh: `from_mesh`) and never reads files.
`rank` and `world_size` are this rank's place in its pipeline (the mesh's "pp" coordinate
and size), never the global rank. A step is:

    zero grads -> executor runs the action list (every microbatch, F and B, transfers)
               -> with data parallelism: each stage's gradients summed over its replicas
                  (started as soon as the stage's last backward is done; runtime/gradsync.py)
               -> each stage adds lambda*W to its weights' gradients (the L2 term s; local)
               -> optimizer.step()
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from splitgraph.config import (
    ModelConfig,
    NanCheck,
    ParallelConfig,
    Task,
    Transport,
    Workload,
    recompute_stages,
)
from splitgraph.data import microbatch_sizes
from splitgraph.errors import CheckpointError
from splitgraph.model import (
    StageModule,
    add_l2_grad_,
    build_mlp,
    compute_dtype,
    l2_term,
    torch_dtype,
)
from splitgraph.observe.memory import SavedTensorMeter
from splitgraph.observe.trace import NULL_TRACER, Tracer
from splitgraph.optim import make_optimizer
from splitgraph.partition import Plan, make_plan
from splitgraph.runtime.comm import P2P, schedule_channels
from splitgraph.runtime.executor import Executor
from splitgraph.runtime.gradsync import GradSync
from splitgraph.runtime.guard import FiniteGuard
from splitgraph.runtime.staged import StagedP2P
from splitgraph.schedule import SCHEDULES, Schedule, build_schedule


def placed(plan: Plan, schedule: Schedule, adopt: bool = False) -> Plan:
    """`plan` with the schedule's stage-to-rank map, which it must already have: a stage
    placed elsewhere than the schedule runs it would build the wrong layers on a rank.
    `adopt`: the schedule chose its own map (schedule=auto, and csv where the plan was
    made before the file was read), so a round-robin plan takes the schedule's."""
    if plan.num_stages != schedule.num_stages or plan.num_ranks != schedule.num_ranks:
        raise ValueError(
            f"the plan cuts {plan.num_stages} stages for {plan.num_ranks} ranks; schedule "
            f"{schedule.name} runs {schedule.num_stages} on {schedule.num_ranks}"
        )
    if plan.stage_to_rank == schedule.stage_to_rank:
        return plan
    if adopt and plan.placement is None:
        return replace(plan, placement=schedule.stage_to_rank)
    raise ValueError(
        f"the plan places stages 0..{plan.num_stages - 1} on ranks {list(plan.stage_to_rank)} "
        f"but schedule {schedule.name} runs them on {list(schedule.stage_to_rank)}: make the "
        "plan with partition.make_plan, which reads the schedule's placement"
    )


def schedule_for_run(
    work: Workload, pp: int, plan: Plan, microbatches: int | None = None
) -> tuple[Schedule, Plan]:
    """The run's schedule and its plan placed as the schedule places it, before anything
    is allocated (train.run, splitgraph-check, the engine): a generated schedule from
    (ranks, m, v), schedule=csv from its file (validated), schedule=auto from the planner's
    costs of this plan and each rank's memory cap (costs.auto_schedule). `microbatches`:
    per replica (default: from the config's batch, dp and pipeline.microbatches)."""
    m = microbatches
    if m is None:
        m = len(microbatch_sizes(work.local_batch, int(work.pipeline.microbatches)))
    name = str(work.schedule.name)
    if name == "auto":
        from splitgraph.cost.costs import auto_schedule

        sched = auto_schedule(work, pp, plan.bounds)
    else:
        v = int(work.schedule.virtual_stages)
        sched = build_schedule(name, pp, m, v, path=getattr(work.schedule, "path", None))
    return sched, placed(plan, sched, adopt=SCHEDULES[name].generate is None)


@dataclass
class StepStats:
    """This rank's share of the objective, so that summing over all ranks gives J = L + s:
    `loss` is its replica's share of L on the last stage's rank (else 0); `l2` is s of its
    stages, on data-parallel replica 0 only (the replicas hold the same weights)."""

    loss: float
    l2: float


def _build_stages(
    model: ModelConfig,
    plan: Plan,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[int, StageModule]:
    """This rank's stages with their seeded weights."""
    stages = {}
    for s in plan.stages_of(rank):
        r = plan.stage_range(s)
        stages[s] = build_mlp(model, r.start, r.stop, dtype, device)
    return stages


def _grad_sync(stages: dict[int, StageModule], dp_group: Any, parallel: ParallelConfig) -> GradSync:
    return GradSync(
        {s: list(st.parameters()) for s, st in stages.items()},
        dp_group,
        int(parallel.bucket_mb * 2**20),
        overlap=parallel.overlap,
    )


class PipelineEngine:
    def __init__(
        self,
        work: Workload,
        rank: int = 0,
        world_size: int = 1,
        group: Any = None,
        device: torch.device | str = "cpu",
        transport: str | None = None,
        *,
        plan: Plan | None = None,  # agreed by all ranks (cost-based strategies)
        dp_group: Any = None,
        replicas: tuple[tuple[int, ...], ...] | None = None,
        channels: bool | None = None,
        tracer: Tracer | None = None,
        nan_check: NanCheck | None = None,
        schedule: Schedule | None = None,  # agreed by all ranks (schedule=auto)
    ) -> None:
        """`dp_group`: this rank's data-parallel peers (None: one replica); `replicas`: every
        pipeline's global ranks; `channels`: see runtime/comm.P2P. `tracer`: records the
        steps' actions (runtime/trace.py; None: nothing); `nan_check`: the numerical guard's
        granularity (runtime/guard.py; None: no guard). Prefer `from_mesh`."""
        import torch.distributed as dist

        self.work, self.rank, self.world_size = work, rank, world_size
        self.device = torch.device(device)
        self.dtype = torch_dtype(work.runtime.dtype)  # parameters and data
        self.compute_dtype = compute_dtype(work.runtime.dtype)  # activations between stages
        self.transport = transport or (
            "staged" if Transport(work.runtime.transport) == Transport.staged else "direct"
        )
        self.task = Task(work.model.task)
        self.batch_size = work.batch_size  # the global minibatch B
        self.weight_decay = work.optim.weight_decay
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        if self.batch_size % self.dp:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by dp={self.dp}")
        #: rows of each minibatch this replica runs: [dp_rank * local, (dp_rank + 1) * local)
        self.local_batch = self.batch_size // self.dp
        self.plan: Plan = plan if plan is not None else make_plan(work, world_size)
        self.sizes = microbatch_sizes(self.local_batch, work.pipeline.microbatches)
        if schedule is None:
            schedule, self.plan = schedule_for_run(work, world_size, self.plan, len(self.sizes))
        adopt = SCHEDULES[work.schedule.name].generate is None  # auto, csv
        self.schedule: Schedule = schedule
        self.plan = placed(self.plan, schedule, adopt)
        self.stages: dict[int, StageModule] = _build_stages(
            work.model, self.plan, rank, self.dtype, self.device
        )
        self.recompute = recompute_stages(work.schedule, self.plan.num_stages) & set(self.stages)
        self.optimizer = make_optimizer(work.optim, self.parameters())
        self.meter = SavedTensorMeter(self.parameters()) if work.runtime.track_memory else None
        p2p_class = StagedP2P if self.transport == "staged" else P2P
        self.p2p = p2p_class(
            rank,
            group,
            verbose=work.runtime.verbose,
            replicas=replicas,
            channels=channels,
            timeout=timedelta(seconds=work.runtime.timeout),  # every wait's bound
            links=schedule_channels(self.schedule),
        )
        #: each stage's gradients summed over its replicas (data parallel)
        self.gradsync: GradSync | None = None
        if self.dp > 1:
            self.gradsync = _grad_sync(self.stages, dp_group, work.parallel)
        #: the numerical guard the executor reports to; train.py reads its events
        self.guard: FiniteGuard | None = None
        if nan_check is not None:
            self.guard = FiniteGuard(self.stages, rank, nan_check == NanCheck.microbatch)
        self.tracer: Tracer = tracer if tracer is not None else NULL_TRACER
        self.executor = Executor(
            self.schedule,
            rank,
            self.stages,
            self.p2p,
            self.task,
            self.device,
            self.compute_dtype,
            self.meter,
            recompute=self.recompute,
            autocast=self.compute_dtype != self.dtype,
            tracer=self.tracer,
            guard=self.guard,
            on_grads_final=self.gradsync.stage_done if self.gradsync is not None else None,
        )

    @classmethod
    def from_mesh(
        cls,
        work: Workload,
        mesh: Any,
        device: torch.device | str = "cpu",
        transport: str | None = None,
        channels: bool | None = None,
        plan: Plan | None = None,
        tracer: Tracer | None = None,
        nan_check: NanCheck | None = None,
        schedule: Schedule | None = None,
    ) -> PipelineEngine:
        """The engine of this rank in a ("dp", "pp") DeviceMesh (runtime/mesh.py)."""
        from splitgraph.runtime.mesh import MeshGroups

        g = MeshGroups.from_mesh(mesh)
        return cls(
            work,
            g.pp_rank,
            g.pp_size,
            g.pp_group,
            device,
            transport,
            plan=plan,
            dp_group=g.dp_group if g.dp_size > 1 else None,
            replicas=g.replicas,
            channels=channels,
            tracer=tracer,
            nan_check=nan_check,
            schedule=schedule,
        )

    # -- what this rank holds ---------------------------------------------------------

    @property
    def holds_first(self) -> bool:
        return 0 in self.stages

    @property
    def holds_last(self) -> bool:
        return self.plan.num_stages - 1 in self.stages

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for st in self.stages.values() for p in st.parameters()]

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Global names (`layers.<i>.weight`), as in the single-device model."""
        return {n: p for st in self.stages.values() for n, p in st.named_parameters()}

    # -- a training step --------------------------------------------------------------

    def forward_backward(
        self, x: Tensor | None, y: Tensor | None, fail_at: int | None = None
    ) -> StepStats:
        """Gradients of J for one minibatch, left in `.grad`; no update.

        `x`, `y`: this replica's rows of the minibatch (`local_batch` of them; all B rows
        without data parallelism). After the all-reduce every replica holds the gradient of
        the whole minibatch."""
        self.tracer.step = self.p2p.step
        for p in self.parameters():
            p.grad = None
        if self.gradsync is not None:
            self.gradsync.begin_step()
        loss = self.executor.run(
            x if self.holds_first else None,
            y if self.holds_last else None,
            self.sizes,
            fail_at=fail_at,
            batch=self.batch_size,
        )
        if self.gradsync is not None:
            with self.tracer.span("DP", "DP"):  # blocked on the gradient all-reduce
                self.gradsync.finish()
        l2 = 0.0
        with self.tracer.span("weight decay", "L2"):
            for st in self.stages.values():
                l2 += float(l2_term(st, self.weight_decay))
                add_l2_grad_(st, self.weight_decay)  # after the sum: lambda*W once, not dp times
        return StepStats(
            loss=float(loss) if loss is not None else 0.0, l2=l2 if self.dp_rank == 0 else 0.0
        )

    def step(self, x: Tensor | None, y: Tensor | None, fail_at: int | None = None) -> StepStats:
        stats = self.forward_backward(x, y, fail_at=fail_at)
        self.update()
        return stats

    def update(self) -> None:
        """The optimizer step after `forward_backward` (train.py checks gradients in between)."""
        recording = self.tracer.active
        with self.tracer.span("OPT", "OPT"):
            self.optimizer.step()
        if recording:
            self.tracer.flush()
        self.p2p.step += 1

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's parameters under global names, on the CPU."""
        out: dict[str, Tensor] = {}
        for st in self.stages.values():
            out.update({k: v.detach().cpu().clone() for k, v in st.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Take this rank's layers from a full (single-device) state dict; refuse mismatches."""
        problems = []
        for name, p in self.named_parameters().items():
            if name not in state:
                problems.append(f"{name} is missing")
            elif tuple(state[name].shape) != tuple(p.shape):
                problems.append(
                    f"{name} has shape {tuple(state[name].shape)}, the model {tuple(p.shape)}"
                )
        if problems:
            raise CheckpointError(
                f"{source} does not fit this model: "
                + "; ".join(problems[:6])
                + (" ..." if len(problems) > 6 else "")
            )
        with torch.no_grad():
            for name, p in self.named_parameters().items():
                p.copy_(state[name].to(dtype=p.dtype, device=p.device))
