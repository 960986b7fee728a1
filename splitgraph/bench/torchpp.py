"""The peer: the same pipeline run by `torch.distributed.pipelining` instead of splitgraph.

`TorchPipeline` builds one rank's share from the same pieces splitgraph uses: the plan's
uniform layer slices (`build_mlp(cfg, start, stop)`: the same seeded weights under the same
global names), the same optimizer (`make_optimizer`), the same L2 term (lambda W added to
each stage's weight gradients after the schedule) and the same loss scaling. splitgraph's
microbatch k contributes `loss_sum_k / B` to L; the peer's `loss_fn` returns exactly that,
and `scale_grads=False` stops its schedules from dividing the gradients by m again (with
the default `scale_grads=True` they expect a per-microbatch *mean* loss instead).

Stage s runs on rank s % p in both systems (the peer's "loop" placement for interleaving),
and for zbv on the V's rank (s, then 2p-1-s: the peer's "v" placement; the plan places it so).
"""

from __future__ import annotations

import torch
from torch import Tensor

from splitgraph.config import Task, Workload
from splitgraph.model import StageModule, add_l2_grad_, build_mlp, loss_sum
from splitgraph.optim import make_optimizer
from splitgraph.partition import make_plan

#: splitgraph schedule -> (the peer's schedule class, model chunks per rank)
PEER_SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved": ("ScheduleInterleaved1F1B", 2),
    "zbv": ("ScheduleZBVZeroBubble", 2),
}


def peer_problem(schedule: str, ranks: int, microbatches: int, batch: int) -> str | None:
    """Why the peer (torch 2.13) cannot run this configuration, in its own words."""
    m = microbatches
    if schedule == "1f1b" and m < ranks:
        return f"Schedule1F1B needs microbatches >= stages ({m} < {ranks})"
    if schedule == "interleaved":
        rounds = max(1, m // ranks)
        if m % rounds:
            return f"ScheduleInterleaved1F1B needs m ({m}) to be a multiple of m // p ({rounds})"
    if batch % m:
        return f"the batch ({batch}) must split into {m} equal microbatches"
    return None


class TorchPipeline:
    """One rank's share of the pipeline, run by torch.distributed.pipelining."""

    def __init__(self, work: Workload, rank: int, world: int, dtype: torch.dtype) -> None:
        from torch.distributed import pipelining as pp

        name = work.schedule.name
        cls_name, _ = PEER_SCHEDULES[name]
        plan = make_plan(work, world)
        m = work.pipeline.microbatches
        batch = work.batch_size
        task = Task(work.model.task)
        problem = peer_problem(name, world, m, batch)
        if problem:
            raise ValueError(problem)

        def loss_fn(out: Tensor, y: Tensor) -> Tensor:
            return loss_sum(out, y, task) / batch  # splitgraph's scaling: see the docstring

        self.modules: dict[int, StageModule] = {}
        stages = []
        for s in plan.stages_of(rank):
            r = plan.stage_range(s)
            self.modules[s] = build_mlp(work.model, r.start, r.stop, dtype)
            stages.append(
                pp.PipelineStage(self.modules[s], s, plan.num_stages, torch.device("cpu"))
            )
        cls = getattr(pp, cls_name)
        self.schedule = cls(
            stages if PEER_SCHEDULES[name][1] > 1 else stages[0],
            m,
            loss_fn=loss_fn,
            scale_grads=False,
        )
        self.holds_first = 0 in self.modules
        self.holds_last = plan.num_stages - 1 in self.modules
        self.weight_decay = work.optim.weight_decay
        self.optimizer = make_optimizer(work.optim, self.parameters())

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for mod in self.modules.values() for p in mod.parameters()]

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for mod in self.modules.values() for n, p in mod.named_parameters()}

    def forward_backward(self, x: Tensor | None, y: Tensor | None) -> float:
        """Gradients of J in `.grad` (as PipelineEngine.forward_backward); returns this
        rank's share of L (the summed microbatch losses on the last stage's rank, else 0)."""
        for p in self.parameters():
            p.grad = None
        losses: list[Tensor] = []
        self.schedule.step(
            *((x,) if self.holds_first else ()),
            target=y if self.holds_last else None,
            losses=losses if self.holds_last else None,
            return_outputs=False,
        )
        for mod in self.modules.values():
            add_l2_grad_(mod, self.weight_decay)
        return float(sum(t.detach().double() for t in losses)) if losses else 0.0

    def step(self, x: Tensor | None, y: Tensor | None) -> float:
        loss = self.forward_backward(x, y)
        self.optimizer.step()
        return loss
