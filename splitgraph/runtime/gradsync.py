"""Data parallelism: sum each stage's gradients over its replicas, bucketed, once per step.

Why a sum and not a mean: every replica weights its microbatch losses by 1/B with B the
*global* batch (not its own B/dp rows), so its gradient is already its share of the
full-batch mean and the sum over replicas is exactly the single-device gradient of L. That
is the usual "average the replica means" (sum_d g_d / dp with g_d the mean over B/dp rows)
with the 1/dp folded into the loss, and it needs no division pass (gloo has no AVG).
The L2 term's gradient lambda*W is added by the engine after the sum, once.

Buckets: a stage's gradients are flattened into buckets of at most `bucket_bytes` (a
parameter larger than that gets one to itself), each summed with one async all_reduce and
copied back when the engine waits (`finish`). With `overlap`, a stage's buckets start as
soon as its last backward (B, or W for zero-bubble) of the step is done, so they run while
the rank's other stages (interleaved schedules) and the pipeline's drain still compute;
without it they start after the whole schedule has run on this rank.

Order: every data-parallel peer of a stage holds the same stages and runs the same action
list, so the all-reduces are issued in the same order on every member of a dp group, as a
collective needs (NCCL included).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def buckets(params: Sequence[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters grouped so that each group holds at most `bucket_bytes`."""
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if out and size + nbytes <= bucket_bytes:
            out[-1].append(p)
            size += nbytes
        else:
            out.append([p])
            size = nbytes
    return out


class GradSync:
    def __init__(
        self,
        stage_params: dict[int, list[nn.Parameter]],
        group: Any,
        bucket_bytes: int,
        overlap: bool = True,
    ) -> None:
        self.group, self.overlap = group, overlap
        self.buckets = {s: buckets(ps, bucket_bytes) for s, ps in sorted(stage_params.items())}
        self._pending: list[tuple[Any, torch.Tensor, list[nn.Parameter]]] = []
        self._launched: set[int] = set()
        #: seconds this rank spent, last step, starting all-reduces and blocked waiting for them
        self.launch_s = 0.0
        self.wait_s = 0.0
        #: bytes of the flattened buckets in flight at once (all of them, at `finish`): a
        #: second copy of this rank's gradients that the memory cap counts
        self.in_flight_bytes = 0
        self.in_flight_peak_bytes = 0

    @property
    def num_buckets(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def stage_done(self, stage: int) -> None:
        """The executor's hook: `stage` has its final gradients for this step."""
        if self.overlap:
            self._launch(stage)

    def finish(self) -> None:
        """Start what has not started, wait for every bucket, copy the sums back into .grad."""
        for s in self.buckets:
            if s not in self._launched:
                self._launch(s)
        t0 = time.perf_counter()
        for work, flat, params in self._pending:
            work.wait()
            offset = 0
            for p in params:
                n = p.numel()
                assert p.grad is not None
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        self.wait_s = time.perf_counter() - t0
        self._pending.clear()
        self._launched.clear()
        self.in_flight_bytes = 0

    def begin_step(self) -> None:
        """A fresh step (also forgets one that failed half-way)."""
        self._pending.clear()
        self._launched.clear()
        self.launch_s = self.wait_s = 0.0
        self.in_flight_bytes = 0

    def _launch(self, stage: int) -> None:
        if stage in self._launched:
            raise RuntimeError(f"stage {stage}'s gradients were all-reduced twice in one step")
        t0 = time.perf_counter()
        self._launched.add(stage)
        for params in self.buckets[stage]:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            for p, g in zip(params, grads):
                p.grad = g
            self.in_flight_bytes += flat.numel() * flat.element_size()
            self.in_flight_peak_bytes = max(self.in_flight_peak_bytes, self.in_flight_bytes)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append((work, flat, params))
        self.launch_s += time.perf_counter() - t0
