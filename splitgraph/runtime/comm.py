"""Point-to-point transfers between pipeline ranks: the runtime's only use of the network.

Every message travels on a *channel*: (sending rank, receiving rank, kind), kind being
activations ("act") or gradients ("grad"). The validator guarantees that each channel's
receives are posted in the order of its sends; the runtime guarantees that no channel waits
behind another, which together rule out deadlock (see schedule/simulate.py, strict mode):

* NCCL ignores tags and runs a communicator's operations in order on one stream, so two
  channels sharing a communicator could block each other (a pending send to a peer holding
  up a receive from it). Each (kind, direction) gets its own process group instead: four,
  created once, so a communicator only ever carries one channel per pair of ranks.
  With data parallelism there is one pipeline per replica, hence four groups per replica;
  `dist.new_group` must be entered by every rank of the default group for every group
  (members or not) in one order, so every rank creates every replica's groups, the same way
  (`channel_groups`).
* gloo matches messages by (peer, tag) in order and `isend` never blocks, so one group with a
  tag per kind would be correct (`P2P(channels=False)`); the channel groups serve gloo too, by
  default, for speed. A gloo group talks to each peer over one socket guarded by one mutex,
  which its transport thread holds while it reads an incoming message and a sender holds
  while it writes; when activations go one way and gradients the other at once (1F1B's steady
  state, interleaving), each side's sends queue behind its own reads, and the transport
  thread, finding the mutex taken, spins on the ready socket (measured: 3-8 ms of extra CPU
  per step on a 2-rank 1F1B). With a group per (kind, direction) every socket carries one
  direction of one kind. The CPU tests thereby exercise the creation order NCCL depends on.

The vocabulary is one call, `post`, taking the transfers a schedule groups between two
compute actions; every work handle goes back to the caller, who waits on it (receives before
the compute that reads them, sends by the end of the step). `verbose=True` prints each
transfer with rank and step (`runtime.verbose=true`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger("splitgraph")

TAGS = {"act": 1, "grad": 2}

#: (replicas, timeout) -> this rank's channel groups
_CHANNEL_GROUPS: dict[tuple[Any, ...], dict[tuple[str, bool], Any]] = {}


@dataclass(frozen=True)
class Transfer:
    is_send: bool
    tensor: Tensor
    peer: int  # rank inside the pipeline group
    kind: str  # "act" or "grad"
    label: str  # the action, for messages


def channel_groups(
    replicas: tuple[tuple[int, ...], ...],
    backend: str | None = "nccl",
    timeout: timedelta | None = None,
) -> dict[tuple[str, bool], Any]:
    """(kind, sending to a higher rank) -> its own process group over this rank's pipeline.

    `replicas` lists every pipeline's global ranks (one tuple per data-parallel replica;
    one tuple without data parallelism). Collective over the default group: every rank must
    call it with the same `replicas`, so each of the four channels is made for all replicas
    at once with `new_subgroups_by_enumeration` (every rank enters every `new_group` in the
    same order) and this rank keeps its own pipeline's. Cached per `replicas` and `timeout`.
    """
    key = (replicas, timeout)  # every rank asks with the same: the same groups, in order
    if key not in _CHANNEL_GROUPS:
        mine: dict[tuple[str, bool], Any] = {}
        for kind in ("act", "grad"):
            for up in (True, False):
                group, _ = dist.new_subgroups_by_enumeration(
                    [list(r) for r in replicas], timeout=timeout, backend=backend
                )
                mine[(kind, up)] = group
                check_timeout(group, timeout, "channel")
        _CHANNEL_GROUPS[key] = mine
    return _CHANNEL_GROUPS[key]


def group_timeout(group: Any) -> timedelta | None:
    """The timeout `group` was made with (None: the default group), read through a private
    torch API (torch has no public getter), or None where that API is absent. Used only to
    verify; groups get their timeout through `new_group(timeout=...)` (`resolve_timeout`)."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


_WARNED: set[str] = set()


def _warn_once(key: str, text: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", text)


def resolve_timeout(timeout: timedelta | None, group: Any = None) -> timedelta | None:
    """The timeout a new group gets: `timeout` when the caller knows the run's bound
    (`runtime.timeout`), else the one `group` (None: the default group) was made with. If
    neither is known, None, which is torch's default (30 min on gloo, 10 on NCCL): said once,
    with what it means."""
    if timeout is not None:
        return timeout
    found = group_timeout(group)
    if found is None:
        _warn_once(
            "unknown",
            "the process group's timeout cannot be read (no public torch API; the private "
            "one is absent): new groups get torch's default timeout (30 min on gloo, 10 on "
            "NCCL), so a dead peer may take that long to surface; pass the timeout explicitly",
        )
    return found


def check_timeout(group: Any, want: timedelta | None, what: str) -> None:
    """After creating `group` with timeout `want`: warn once if it holds another one."""
    got = group_timeout(group) if group is not None else None
    if want is not None and got is not None and got != want:
        _warn_once(
            what,
            f"the {what} process groups have a timeout of {got.total_seconds():g} s, not the "
            f"{want.total_seconds():g} s asked for: a wait on them may last that long",
        )


class P2P:
    """`rank` and every `Transfer.peer` are ranks inside `group` (the pipeline group).

    `replicas`: every pipeline's global ranks when there are several (data parallelism).
    `channels`: one process group per channel (None: on every backend; False: gloo shares
    one group, a tag per kind; NCCL always has them). `timeout`: the channel groups' bound on
    a wait (`runtime.timeout`; None: the one `group` was made with).
    """

    def __init__(
        self,
        rank: int,
        group: Any = None,
        verbose: bool = False,
        replicas: tuple[tuple[int, ...], ...] | None = None,
        channels: bool | None = None,
        timeout: timedelta | None = None,
    ) -> None:
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
        if initialized and world > 1:
            backend = dist.get_backend(group)
            if channels is not False or backend == "nccl":
                replicas = replicas or (tuple(self._global),)
                if tuple(self._global) not in replicas:
                    raise ValueError(f"ranks {self._global} are not one of replicas {replicas}")
                wait = resolve_timeout(timeout, group)
                self._channels = channel_groups(replicas, backend, wait)

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
