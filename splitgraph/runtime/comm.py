"""Point-to-point transfers between pipeline ranks: the runtime's only use of the network.

The vocabulary is one call, `post`, taking the transfers a schedule groups between two
compute actions. On gloo each becomes a plain `isend`/`irecv` (gloo's batched path has a
history of hangs); on NCCL the group is one `batch_isend_irecv`, so a send and a receive to
the same peer cannot block each other on NCCL's stream. Every work handle is returned to the
caller, who waits on it: receives before the compute that reads them, sends by the end of
the step. `verbose=True` prints each transfer with rank and step (`runtime.verbose=true`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Transfer:
    is_send: bool
    tensor: Tensor
    peer: int  # rank inside the pipeline group
    label: str  # the action, for messages


class P2P:
    def __init__(
        self, rank: int, group: Any = None, batched: bool = False, verbose: bool = False
    ) -> None:
        self.rank, self.group, self.batched, self.verbose = rank, group, batched, verbose
        self.step = 0
        self.bytes_sent = 0
        self.messages_sent = 0
        # Group-local rank -> global rank, computed once (dist.isend takes global ranks).
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        self._global = [
            dist.get_global_rank(group, r) if group is not None else r for r in range(world)
        ]

    def post(self, transfers: list[Transfer]) -> list[Any]:
        """Start the transfers; returns one work handle per transfer, in order."""
        if self.verbose:
            for t in transfers:
                arrow = "->" if t.is_send else "<-"
                print(
                    f"[p2p] step {self.step} rank {self.rank} {t.label} {arrow} rank {t.peer} "
                    f"{tuple(t.tensor.shape)}",
                    file=sys.stderr,
                    flush=True,
                )
        for t in transfers:
            if t.is_send:
                self.bytes_sent += t.tensor.numel() * t.tensor.element_size()
                self.messages_sent += 1
        if self.batched:
            ops = [
                dist.P2POp(
                    dist.isend if t.is_send else dist.irecv,
                    t.tensor,
                    self._global[t.peer],
                    self.group,
                )
                for t in transfers
            ]
            works = dist.batch_isend_irecv(ops)
            return list(works) if len(works) == len(ops) else [works[-1]] * len(ops)
        out = []
        for t in transfers:
            fn = dist.isend if t.is_send else dist.irecv
            out.append(fn(t.tensor, self._global[t.peer], group=self.group))
        return out
