"""List scheduling: build an order by running the pipeline forward in time, one choice at a time.

Whenever a rank is free it starts the most urgent action whose data has arrived:

    1. a backward (B, or I when the backward is split): an earlier stage waits for its
       gradient, so it is on the critical path;
    2. a forward, if the activations the rank holds stay within its cap;
    3. a deferred weight gradient W: nobody waits for it, so it fills what would otherwise
       be idle time (and frees its activations when memory is short).

If nothing can start, the rank waits for the next arrival. The result is an ordinary action
list per rank, lowered, validated and simulated like any generator's.

The memory rule keeps it deadlock-free: a rank admits a new microbatch (the forward of its
first stage) only if everything that microbatch will need on this rank still fits,
`held + reserved + need <= cap`, so an admitted microbatch can always finish. With one
stage per rank or the V placement every channel carries one boundary, so the oldest
unfinished microbatch can always move and the scheduler cannot stall. With several
boundaries on a channel (round-robin chunks) a refused admission can block a message behind
it; `list_schedule` then returns None and the caller (auto) drops that candidate.

With several chunks per rank that reservation is cautious: in the V a microbatch's second
chunk runs long after its first, and reserving it from the start leaves room for few
microbatches under a tight cap (one, under 1F1B's bytes at p = 2). `Policy(reserve=False)`
keeps room for one later chunk only: a first-chunk forward runs if
`held + w + max(later chunk) <= cap`, a later chunk's forward if `held + w <= cap`. Later
chunks' inputs arrive in microbatch order, so the oldest one's room is there when it
comes; the rule is a heuristic nonetheless, and a run that stalls returns None.

`weight` prices each stage's microbatch in the cap's unit: in bytes, a stage's footprint is
the larger of what its F saves and what its I leaves for W (memory_model.py; without
sharing between stages, so the count errs high and the exact model has the last word).

`zb2` is this scheduler at unit costs with a cap of 2p-1 microbatches per stage; `auto`
runs it with the run's own costs and memory caps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from splitgraph.schedule.ir import Action, B, F, I, Message, W
from splitgraph.schedule.simulate import Costs

_EPS = 1e-12


@dataclass(frozen=True)
class Policy:
    """What a list schedule may do.

    `cap[r]`: the most activations rank r may hold, in the unit of `weight` (default: one
    stage's activations of one microbatch, so a cap of 3 holds three stage-microbatches).
    `split`: I + W instead of B. `late_backward` / `late_forward`: among ready backwards
    (forwards) of one rank, prefer the later stage (True) or the earlier one. `reserve`:
    admitting a microbatch reserves all its later chunks on the rank (True, never stalls
    on the V) or room for one later chunk (False; see the module docstring). `tight`
    (with `split`): run a full B instead of I where the W an I defers would leave no room
    for the rank's next microbatch; B frees at once what a pending W would hold.
    """

    cap: tuple[float, ...]
    split: bool = True
    weight: tuple[float, ...] | None = None
    late_backward: bool = True
    late_forward: bool = True
    reserve: bool = True
    tight: bool = False


def list_schedule(
    stage_to_rank: Sequence[int], num_microbatches: int, costs: Costs, policy: Policy
) -> list[list[Action]] | None:
    """Compute actions per rank, or None if the policy stalls (see the module docstring)."""
    return _Run(tuple(stage_to_rank), num_microbatches, costs, policy).run()


class _Run:
    def __init__(self, place: tuple[int, ...], m: int, costs: Costs, policy: Policy) -> None:
        self.place, self.m, self.costs, self.policy = place, m, costs, policy
        S, R = len(place), max(place) + 1
        self.S, self.R = S, R
        if len(policy.cap) != R:
            raise ValueError(f"Policy.cap has {len(policy.cap)} entries for {R} ranks")
        self.weight = policy.weight or (1.0,) * S
        self.stages_of = [[s for s in range(S) if place[s] == r] for r in range(R)]
        self.need = [sum(self.weight[s] for s in st) for st in self.stages_of]
        #: room kept for one later chunk (reserve=False)
        self.later = [max((self.weight[s] for s in st[1:]), default=0.0) for st in self.stages_of]
        self.next_f, self.next_b = [0] * S, [0] * S
        self.pending_w: list[deque[tuple[int, int]]] = [deque() for _ in range(R)]
        self.done_f: dict[tuple[int, int], float] = {}
        self.done_b: dict[tuple[int, int], float] = {}
        self.held, self.reserved = [0.0] * R, [0.0] * R
        self.free = [0.0] * R
        # per channel (src rank, dst rank, kind): messages sent and not yet consumed, in order
        self.channels: dict[tuple[int, int, str], deque[tuple[Message, float]]] = {}
        self.rows: list[list[Action]] = [[] for _ in range(R)]
        ends = [(place[b], place[b + 1]) for b in range(S - 1)]
        self._channel = {
            "act": [(lo, hi, "act") for lo, hi in ends],
            "grad": [(hi, lo, "grad") for lo, hi in ends],
        }

    def channel(self, kind: str, boundary: int) -> tuple[int, int, str]:
        return self._channel[kind][boundary]

    def arrival(self, msg: Message) -> float | None:
        """When `msg` can be read: only once it heads its channel (first in, first out)."""
        q = self.channels.get(self._channel[msg[0]][msg[1]])
        return q[0][1] if q and q[0][0] == msg else None

    def ready_backward(self, s: int, t: float) -> bool:
        k, r = self.next_b[s], self.place[s]
        if k >= self.next_f[s]:
            return False
        if s == self.S - 1:
            when: float | None = self.done_f[(s, k)]
        elif self.place[s + 1] == r:
            when = self.done_b.get((s + 1, k))
        else:
            when = self.arrival(("grad", s, k))
        return when is not None and when <= t + _EPS

    def ready_forward(self, s: int, t: float) -> bool:
        k, r = self.next_f[s], self.place[s]
        if k >= self.m:
            return False
        if s == 0:
            when: float | None = 0.0
        elif self.place[s - 1] == r:
            when = self.done_f.get((s - 1, k))
        else:
            when = self.arrival(("act", s - 1, k))
        if when is None or when > t + _EPS:
            return False
        cap = self.policy.cap[r] + _EPS
        first = s == self.stages_of[r][0]
        if not self.policy.reserve:
            return self.held[r] + self.weight[s] + (self.later[r] if first else 0.0) <= cap
        if not first:
            return True  # reserved when the microbatch was admitted
        return self.held[r] + self.reserved[r] + self.need[r] <= cap

    def choose(self, r: int, t: float) -> tuple[str, int, int] | None:
        pol = self.policy
        stages = self.stages_of[r]
        back = [s for s in stages if self.ready_backward(s, t)]
        if back:
            s = max(back) if pol.late_backward else min(back)
            return ("B", s, self.next_b[s])
        fwd = [s for s in stages if self.ready_forward(s, t)]
        if fwd:
            s = max(fwd) if pol.late_forward else min(fwd)
            return ("F", s, self.next_f[s])
        if self.pending_w[r]:
            s, k = self.pending_w[r][0]
            return ("W", s, k)
        return None

    def start(self, r: int, t: float, kind: str, s: int, k: int) -> int:
        """Start one action; returns how many of the split actions it counts for."""
        c, place, w = self.costs, self.place, self.weight
        if kind == "F":
            a = Action(s, F, k)
            if s == self.stages_of[r][0]:
                self.reserved[r] += self.need[r] - w[s]
            else:
                self.reserved[r] -= w[s]
            self.held[r] += w[s]
            self.next_f[s] += 1
            end = t + c.compute(F, s, k)
            self.done_f[(s, k)] = end
            if s > 0 and place[s - 1] != r:
                self.channels[self.channel("act", s - 1)].popleft()
            if s < self.S - 1 and place[s + 1] != r:
                msg: Message = ("act", s, k)
                q = self.channels.setdefault(self.channel("act", s), deque())
                q.append((msg, end + c.transfer(msg)))
        elif kind == "B":
            op = I if self.policy.split and not self.tight(r, s) else B
            a = Action(s, op, k)
            self.next_b[s] += 1
            end = t + c.compute(op, s, k)
            self.done_b[(s, k)] = end
            if s < self.S - 1 and place[s + 1] != r:
                self.channels[self.channel("grad", s)].popleft()
            if s > 0 and place[s - 1] != r:
                msg = ("grad", s - 1, k)
                q = self.channels.setdefault(self.channel("grad", s - 1), deque())
                q.append((msg, end + c.transfer(msg)))
            if op == I:
                self.pending_w[r].append((s, k))
            else:
                self.held[r] -= w[s]
        else:
            self.pending_w[r].popleft()
            a = Action(s, W, k)
            end = t + c.compute(W, s, k)
            self.held[r] -= w[s]
        self.rows[r].append(a)
        self.free[r] = end
        return 2 if a.op == B and self.policy.split else 1  # a B stands for an I and a W

    def tight(self, r: int, s: int) -> bool:
        """Whether deferring stage s's W would leave rank r no room to admit a microbatch."""
        if not self.policy.tight:
            return False
        first = self.stages_of[r][0]
        if self.next_f[first] >= self.m:
            return False  # nothing left to admit: deferring costs no room
        if self.policy.reserve:
            room = self.reserved[r] + self.need[r]
        else:
            room = self.weight[first] + self.later[r]
        return self.held[r] + room > self.policy.cap[r] + _EPS

    def run(self) -> list[list[Action]] | None:
        total = self.S * self.m * (3 if self.policy.split else 2)
        count, t = 0, 0.0
        while count < total:
            again = False  # another pass at t: only an action that ends at t can enable one
            for r in range(self.R):
                if self.free[r] > t + _EPS:
                    continue
                choice = self.choose(r, t)
                if choice is not None:
                    count += self.start(r, t, *choice)
                    again = again or self.free[r] <= t + _EPS
            if again:
                continue
            later = [f for f in self.free if f > t + _EPS]
            later += [when for q in self.channels.values() for _, when in q if when > t + _EPS]
            if not later:
                return None  # nothing runs and nothing is coming: the policy stalled
            t = min(later)
        return self.rows
