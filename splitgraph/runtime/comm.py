"""Point-to-point transfers between pipeline ranks: the runtime's only use of the network.

Every message travels on a *channel*: (sending rank, receiving rank, kind), kind being
activations ("act") or gradients ("grad"). The validator guarantees that each channel's
receives are posted in the order of its sends; the runtime guarantees that no channel waits
behind another, which together rule out deadlock (see schedule/simulate.py, strict mode).
The runtime keeps its half by giving every channel a process group of its own: two ranks,
one direction, one kind (`channel_groups`). A 3-rank 1F1B pipeline has four:

    rank 0 --act--> rank 1 --act--> rank 2        (0,1,act) (1,2,act)
    rank 0 <-grad-- rank 1 <-grad-- rank 2        (1,0,grad) (2,1,grad)

* NCCL ignores tags and runs a communicator's operations in order on one stream; with an
  eagerly initialised group (train.py binds the NCCL group to its device) torch also treats
  unbatched send/recv on a group of more than two ranks as collectives "serialized with all
  other ops on this ProcessGroup". So a group spanning the pipeline for one (kind, direction),
  as this module had, put a middle rank's send to r+1 behind the receives from r-1 it posts
  at the start of the step, while r-1 waited for a gradient behind that send: a deadlock for
  1F1B and zb1 on 3+ ranks. A group per channel holds exactly one channel's operations, in
  the channel's order, so nothing queues behind anything else.
* With data parallelism there is one pipeline per replica. `dist.new_group` must be entered by
  every rank of the default group for every group (members or not) in one order (with a
  device-bound NCCL group it is an `ncclCommSplit` over the default communicator), so every
  rank creates every replica's copy of a channel together (`new_subgroups_by_enumeration`),
  channels in sorted order; the set comes from the schedule, which every rank holds whole.
* gloo matches messages by (peer, tag) in order and `isend` never blocks, so one group with a
  tag per kind would be correct (`P2P(channels=False)`); the channel groups serve gloo too, by
  default, for speed. A gloo group talks to each peer over one socket guarded by one mutex,
  which its transport thread holds while it reads an incoming message and a sender holds
  while it writes; when activations go one way and gradients the other at once (1F1B's steady
  state, interleaving), each side's sends queue behind its own reads, and the transport
  thread, finding the mutex taken, spins on the ready socket (measured: 3-8 ms of extra CPU
  per step on a 2-rank 1F1B). With a group per channel every socket carries one direction of
  one kind. The CPU tests thereby exercise the group structure and creation order NCCL
  depends on (tests/test_channels.py also runs it under NCCL's one-queue-per-group rule).

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

#: (sending rank, receiving rank, kind), ranks inside the pipeline (as schedule/simulate.py)
Channel = tuple[int, int, str]

#: (replicas, timeout, channel) -> this rank's group for it (None where this rank is not in
#: it); made once per default process group and kept, since creating a group is collective
_CHANNEL_GROUPS: dict[tuple[tuple[tuple[int, ...], ...], timedelta | None, Channel], Any] = {}
_CHANNEL_WORLD: list[Any] = [None]  # the default group the cache belongs to


@dataclass(frozen=True)
class Transfer:
    is_send: bool
    tensor: Tensor
    peer: int  # rank inside the pipeline group
    kind: str  # "act" or "grad"
    label: str  # the action, for messages


def neighbour_channels(ranks: int) -> list[Channel]:
    """Every channel a pipeline of `ranks` ranks can use without a schedule at hand: both
    kinds, both directions, between ranks r and r+1 (mod `ranks`: interleaved schedules
    send from the last rank to the first)."""
    pairs = {(r, (r + 1) % ranks) for r in range(ranks)} if ranks > 1 else set()
    pairs |= {(b, a) for a, b in pairs}
    return sorted((a, b, kind) for a, b in pairs for kind in ("act", "grad"))


def channel_groups(
    replicas: tuple[tuple[int, ...], ...],
    channels: list[Channel],
    backend: str | None = "nccl",
    timeout: timedelta | None = None,
) -> dict[Channel, Any]:
    """A two-rank process group per channel, for this rank's pipeline; returns those this
    rank belongs to.

    `replicas` lists every pipeline's global ranks (one tuple per data-parallel replica; one
    tuple without data parallelism); `channels` are in pipeline ranks. Collective over the
    default group: every rank must call it with the same arguments. Each channel missing from
    the cache is made for all replicas at once with `new_subgroups_by_enumeration` (every
    rank enters every `new_group` in the same order), channels in sorted order. Cached per
    `replicas` and `timeout`.
    """
    world = dist.group.WORLD
    if _CHANNEL_WORLD[0] is not world:  # a new default group: the old groups are gone
        _CHANNEL_GROUPS.clear()
        _CHANNEL_WORLD[0] = world
    for ch in sorted(set(channels)):
        if (replicas, timeout, ch) in _CHANNEL_GROUPS:
            continue
        src, dst, _ = ch
        pairs = [[pipe[src], pipe[dst]] for pipe in replicas]
        group, _ = dist.new_subgroups_by_enumeration(pairs, timeout=timeout, backend=backend)
        check_timeout(group, timeout, "channel")
        _CHANNEL_GROUPS[(replicas, timeout, ch)] = group
    return {
        ch: _CHANNEL_GROUPS[(replicas, timeout, ch)]
        for ch in channels
        if _CHANNEL_GROUPS[(replicas, timeout, ch)] is not None
    }


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
    one group, a tag per kind; NCCL always has them). `links`: the channels the schedule uses
    (`schedule_channels`); default: every neighbour channel (`neighbour_channels`).
    `timeout`: the channel groups' bound on a wait (`runtime.timeout`; None: the one `group`
    was made with).
    """

    def __init__(
        self,
        rank: int,
        group: Any = None,
        verbose: bool = False,
        replicas: tuple[tuple[int, ...], ...] | None = None,
        channels: bool | None = None,
        timeout: timedelta | None = None,
        links: list[Channel] | None = None,
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
        self._channels: dict[Channel, Any] | None = None
        if initialized and world > 1:
            backend = dist.get_backend(group)
            if channels is not False or backend == "nccl":
                replicas = replicas or (tuple(self._global),)
                if tuple(self._global) not in replicas:
                    raise ValueError(f"ranks {self._global} are not one of replicas {replicas}")
                wait = resolve_timeout(timeout, group)
                links = neighbour_channels(world) if links is None else links
                self._channels = channel_groups(replicas, links, backend, wait)

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
                works.append(fn(t.tensor, peer, group=self._channel_group(t)))
            else:
                works.append(fn(t.tensor, peer, group=self.group, tag=TAGS[t.kind]))
        return works

    def _channel_group(self, t: Transfer) -> Any:
        assert self._channels is not None
        ch = (self.rank, t.peer, t.kind) if t.is_send else (t.peer, self.rank, t.kind)
        group = self._channels.get(ch)
        if group is None:  # every rank made the groups from the same list: a bug, not input
            raise RuntimeError(
                f"{t.label}: no process group for channel {ch} (rank {ch[0]} -> rank {ch[1]}, "
                f"{ch[2]}); this P2P was made for {sorted(self._channels)}"
            )
        return group


def schedule_channels(sched: Any) -> list[Channel]:
    """The channels a schedule's transfers use (every rank computes the same list)."""
    from splitgraph.schedule.simulate import channel_order

    return sorted({ch for ch, _ in channel_order(sched).values()})
