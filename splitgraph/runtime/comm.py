"""Point-to-point transfers between pipeline ranks: the runtime's only use of the network.

Every message travels on a *channel*: (sending rank, receiving rank, kind), kind being
activations ("act") or gradients ("grad"). The validator guarantees that each channel's
receives are posted in the order of its sends; the runtime guarantees that no channel waits
behind another, which together rule out deadlock (see schedule/simulate.py, strict mode):

* gloo matches messages by (peer, tag) in order, and `isend` never blocks: one tag per kind.
* NCCL ignores tags and runs a communicator's operations in order on one stream, so two
  channels sharing a communicator could block each other (a pending send to a peer holding
  up a receive from it). Each (kind, direction) gets its own process group instead: four,
  created once, so a communicator only ever carries one channel per pair of ranks.

The vocabulary is one call, `post`, taking the transfers a schedule groups between two
compute actions; every work handle goes back to the caller, who waits on it (receives before
the compute that reads them, sends by the end of the step). `verbose=True` prints each
transfer with rank and step (`runtime.verbose=true`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor

TAGS = {"act": 1, "grad": 2}

_CHANNEL_GROUPS: dict[tuple[int, ...], dict[tuple[str, bool], Any]] = {}


@dataclass(frozen=True)
class Transfer:
    is_send: bool
    tensor: Tensor
    peer: int  # rank inside the pipeline group
    kind: str  # "act" or "grad"
    label: str  # the action, for messages


def channel_groups(members: tuple[int, ...]) -> dict[tuple[str, bool], Any]:
    """(kind, sending to a higher rank) -> its own NCCL process group over `members`.

    Collective: every rank of the default group must call it with the same members, once.
    """
    if members not in _CHANNEL_GROUPS:
        _CHANNEL_GROUPS[members] = {
            (kind, up): dist.new_group(ranks=list(members), backend="nccl")
            for kind in ("act", "grad")
            for up in (True, False)
        }
    return _CHANNEL_GROUPS[members]


class P2P:
    def __init__(self, rank: int, group: Any = None, verbose: bool = False) -> None:
        self.rank, self.group, self.verbose = rank, group, verbose
        self.step = 0
        self.bytes_sent = 0
        self.messages_sent = 0
        initialized = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(group) if initialized else 1
        # Group-local rank -> global rank, computed once (dist.isend takes global ranks).
        self._global = [
            dist.get_global_rank(group, r) if group is not None else r for r in range(world)
        ]
        self._channels = None
        if initialized and world > 1 and dist.get_backend(group) == "nccl":
            self._channels = channel_groups(tuple(self._global))

    def post(self, transfers: list[Transfer]) -> list[Any]:
        """Start the transfers; returns one work handle per transfer, in order."""
        works = []
        for t in transfers:
            if self.verbose:
                arrow = "->" if t.is_send else "<-"
                print(
                    f"[p2p] step {self.step} rank {self.rank} {t.label} {arrow} rank {t.peer} "
                    f"{tuple(t.tensor.shape)}",
                    file=sys.stderr,
                    flush=True,
                )
            peer = self._global[t.peer]
            fn = dist.isend if t.is_send else dist.irecv
            if t.is_send:
                self.bytes_sent += t.tensor.numel() * t.tensor.element_size()
                self.messages_sent += 1
            if self._channels is not None:
                up = (self.rank < t.peer) == t.is_send  # the sender is the lower rank
                works.append(fn(t.tensor, peer, group=self._channels[(t.kind, up)]))
            else:
                works.append(fn(t.tensor, peer, group=self.group, tag=TAGS[t.kind]))
        return works
