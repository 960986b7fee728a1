"""Event simulation of a schedule: per-rank timelines, step time, bubble, activations held.

Two transfer semantics:

* ``strict=True`` (the validator's dry run): messages travel on *channels*, one per (sending
  rank, receiving rank, kind), kind being activations or gradients. A message moves once both
  its send and its receive are posted and the message before it on the channel has moved. The
  runtime guarantees exactly this on both backends (see runtime/comm.py: a tag per channel on
  gloo, a process group per channel on NCCL, so no channel waits behind another), so a
  schedule that finishes here cannot deadlock at run time.
* ``strict=False`` (timing): a message arrives `comm` seconds after its send was posted, as
  gloo behaves (it buffers a message that arrives before its receive).

Posting never blocks a rank; a compute waits only for the data it reads.

Either way the simulation is a fixed point over ranks: each rank runs its list in order
until it needs something not yet produced; the result does not depend on the order in which
ranks are visited. If no rank can move and some have actions left, the schedule deadlocks
and `Deadlock` names each stuck rank's action.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from splitgraph.schedule.ir import Action, B, F, I, Message, Op, Schedule, W, message


@dataclass(frozen=True)
class Costs:
    """Seconds (or any unit) per action, per stage, for a microbatch of relative size 1.

    `backward` is a full backward B; zero-bubble's I and W default to splitting it in half.
    `comm[b]` is the time to move one microbatch's activation (or gradient) over boundary b.
    `mb_scale[i]` scales microbatch i (uneven microbatches); default 1. `post` is the time a
    rank spends posting a group of transfers (the runtime's own overhead).
    """

    forward: Sequence[float]
    backward: Sequence[float]
    backward_input: Sequence[float] | None = None
    weight: Sequence[float] | None = None
    comm: Sequence[float] | None = None
    mb_scale: Sequence[float] | None = None
    post: float = 0.0

    @staticmethod
    def uniform(
        num_stages: int, f: float = 1.0, b: float = 2.0, w: float | None = None, comm: float = 0.0
    ) -> Costs:
        """Equal stages: F=f, B=b (I = b - w and W = w when w is given, else half each)."""
        wv = b / 2 if w is None else w
        return Costs(
            forward=[f] * num_stages,
            backward=[b] * num_stages,
            backward_input=[b - wv] * num_stages,
            weight=[wv] * num_stages,
            comm=[comm] * max(num_stages - 1, 0),
        )

    def scale(self, mb: int) -> float:
        return 1.0 if self.mb_scale is None else float(self.mb_scale[mb])

    def compute(self, op: Op, stage: int, mb: int) -> float:
        if op == F:
            base = self.forward[stage]
        elif op == B:
            base = self.backward[stage]
        elif op == I:
            base = (self.backward_input or [b / 2 for b in self.backward])[stage]
        elif op == W:
            base = (self.weight or [b / 2 for b in self.backward])[stage]
        else:
            raise ValueError(f"{op} is not a compute op")
        return base * self.scale(mb)

    def transfer(self, msg: Message) -> float:
        _, boundary, mb = msg
        return 0.0 if self.comm is None else self.comm[boundary] * self.scale(mb)


def idle_share(busy: Sequence[float], span: float) -> float:
    """The bubble: the idle share of all ranks' time over the schedule's span,

        1 - sum(busy) / (ranks x span),

    where a rank is busy while it computes (F, B, I, W; a wait for a neighbour's data inside
    an action is idle) and the span runs from the schedule's first action to its last, on any
    rank. The step's fixed costs after the span (weight decay, the step sum, the optimizer)
    are not part of it. At equal stage costs without transfers it is the README's closed form,
    (p-1)/(m+p-1) for GPipe and 1F1B. The one definition behind every bubble splitgraph
    prints: the simulator's, the trace's, the log's, summary.json's and timeline.png's.
    """
    if span <= 0 or not busy:
        return 0.0
    return 1.0 - sum(busy) / (len(busy) * span)


@dataclass(frozen=True)
class Event:
    """One compute action on the simulated timeline; the Action is kept, written out only
    where it is shown (render_ascii, the timeline pictures)."""

    rank: int
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    events: list[list[Event]]  # per rank, compute actions only, in execution order
    step_time: float
    busy: list[float]  # per rank: seconds of compute
    peak_inflight: list[int]  # per stage: most microbatches whose activations are held
    #: per rank: most activations held at once, in whole-model microbatches (see peak_activation)
    peak_activation: list[float] = field(default_factory=list)

    @property
    def num_ranks(self) -> int:
        return len(self.events)

    @property
    def bubble(self) -> list[float]:
        """Per rank: the idle share of the step."""
        return [idle_share([b], self.step_time) for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        """The bubble (`idle_share`) of the simulated schedule."""
        return idle_share(self.busy, self.step_time)

    @property
    def span_idle(self) -> list[float]:
        """Per rank: idle time between its own first start and last end.

        The zero-bubble papers' bubble: what a rank cannot hide by starting the next step
        early. `step_time - busy` adds the wait before a rank's first action (the fill, at
        least one forward per hop) and after its last."""
        return [
            (evs[-1].end - evs[0].start) - b if evs else 0.0
            for evs, b in zip(self.events, self.busy)
        ]

    def summary(self) -> dict[str, object]:
        return {
            "step_time": self.step_time,
            "bubble_fraction": self.bubble_fraction,
            "bubble_per_rank": self.bubble,
            "span_idle_per_rank": self.span_idle,
            "peak_inflight_per_stage": self.peak_inflight,
            "peak_activation_per_rank": self.peak_activation,
        }


class Deadlock(Exception):
    """No rank can move and some have actions left; `stuck[rank] = index` of each's next action."""

    def __init__(self, stuck: dict[int, int], reasons: dict[int, str]) -> None:
        self.stuck, self.reasons = stuck, reasons
        super().__init__("deadlock: " + "; ".join(f"rank {r}: {m}" for r, m in reasons.items()))


def _needs(a_stage: int, a_op: Op, a_mb: int, sched: Schedule) -> Message | None:
    """The cross-rank message a compute action reads, if any."""
    rank = sched.rank_of(a_stage)
    if a_op == F and a_stage > 0 and sched.rank_of(a_stage - 1) != rank:
        return ("act", a_stage - 1, a_mb)
    if a_op in (B, I) and a_stage < sched.num_stages - 1 and sched.rank_of(a_stage + 1) != rank:
        return ("grad", a_stage, a_mb)
    return None


def simulate(sched: Schedule, costs: Costs | None = None, strict: bool = False) -> SimResult:
    """Run the schedule on a model of the machine; raise `Deadlock` if it cannot finish.

    strict=False: a message arrives `comm` after its send is posted (gloo buffers it).
    strict=True: a message moves only once its receive is posted too, and after the message
    before it on its channel (src rank, dst rank, kind); this is the NCCL runtime's contract.
    Either way posting never blocks a rank and a compute waits for the data it reads.
    """
    costs = costs or Costs.uniform(sched.num_stages, 1.0, 1.0)
    R = sched.num_ranks
    acts = sched.actions
    pos = [0] * R
    clock = [0.0] * R
    events: list[list[Event]] = [[] for _ in range(R)]
    busy = [0.0] * R
    sent: dict[Message, float] = {}
    received: dict[Message, float] = {}
    order = channel_order(sched)  # message -> (channel, index on channel)
    channel_done: dict[tuple[int, int, str], list[float]] = {}

    def arrival(msg: Message) -> float | None:
        if msg not in sent:
            return None
        if not strict:
            return sent[msg] + costs.transfer(msg)
        if msg not in received:
            return None
        channel, k = order[msg]
        finished = channel_done.setdefault(channel, [])
        if len(finished) < k:  # an earlier message on the channel has not moved yet
            return None
        if len(finished) == k:
            start = max(sent[msg], received[msg], finished[-1] if finished else 0.0)
            finished.append(start + costs.transfer(msg))
        return finished[k]

    progress = True
    while progress:
        progress = False
        for r in range(R):
            while pos[r] < len(acts[r]):
                a = acts[r][pos[r]]
                if a.op.is_comm:
                    if costs.post and (pos[r] == 0 or acts[r][pos[r] - 1].op.is_compute):
                        clock[r] += costs.post  # one post per group of transfers
                    (sent if a.op.is_send else received).setdefault(message(a), clock[r])
                    pos[r] += 1
                    progress = True
                    continue
                start = clock[r]
                need = _needs(a.stage, a.op, a.mb, sched)
                if need is not None:
                    t = arrival(need)
                    if t is None:
                        break
                    start = max(start, t)
                dur = costs.compute(a.op, a.stage, a.mb)
                events[r].append(Event(r, a, start, start + dur))
                busy[r] += dur
                clock[r] = start + dur
                pos[r] += 1
                progress = True
    stuck = {r: pos[r] for r in range(R) if pos[r] < len(acts[r])}
    if stuck:
        raise _deadlock(sched, stuck, sent)
    return SimResult(
        events=events,
        step_time=max(clock, default=0.0),
        busy=busy,
        peak_inflight=peak_inflight(sched),
        peak_activation=peak_activation(sched),
    )


def _deadlock(sched: Schedule, stuck: dict[int, int], sent: dict[Message, float]) -> Deadlock:
    """Why each stuck rank (rank -> index of its blocked action) cannot go on."""
    reasons = {}
    for r, i in stuck.items():
        a = sched.actions[r][i]
        need = _needs(a.stage, a.op, a.mb, sched)
        src = _source_rank(a, sched)
        if need is not None and need in sent:
            reasons[r] = f"{a} waits for an earlier message from rank {src} on its channel"
        else:
            reasons[r] = f"{a} waits for data from rank {src}"
    return Deadlock(stuck, reasons)


def channel_order(sched: Schedule) -> dict[Message, tuple[tuple[int, int, str], int]]:
    """Each message's channel (src rank, dst rank, kind) and its place in the sender's order."""
    out: dict[Message, tuple[tuple[int, int, str], int]] = {}
    count: dict[tuple[int, int, str], int] = {}
    for row in sched.actions:
        for a in row:
            if a.op.is_send:
                msg = message(a)
                channel = channel_of(sched, msg)
                out[msg] = (channel, count.get(channel, 0))
                count[channel] = count.get(channel, 0) + 1
    return out


def channel_of(sched: Schedule, msg: Message) -> tuple[int, int, str]:
    """(src rank, dst rank, kind): messages on one channel must be received in send order."""
    kind, boundary, _ = msg
    lo, hi = sched.rank_of(boundary), sched.rank_of(boundary + 1)
    return (lo, hi, kind) if kind == "act" else (hi, lo, kind)


def _source_rank(a: Action, sched: Schedule) -> int:
    return sched.rank_of(a.stage - 1 if a.op == F else a.stage + 1)


def peak_inflight(sched: Schedule) -> list[int]:
    """Per stage: the most microbatches forwarded but not yet fully backwarded at once."""
    peak = [0] * sched.num_stages
    live = [0] * sched.num_stages
    split = {(a.stage, a.mb) for row in sched.actions for a in row if a.op == W}
    for row in sched.actions:
        for a in row:
            if a.op == F:
                live[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], live[a.stage])
            elif a.op == B or (a.op == W and (a.stage, a.mb) in split):
                live[a.stage] -= 1
    return peak


def peak_activation(sched: Schedule, weight: Sequence[float] | None = None) -> list[float]:
    """Per rank: the most activations held at once, in whole-model microbatches.

    A stage's activations of a microbatch are held from its F to its B (or W, when the
    backward is split: W is what needs them last) and weigh `weight[stage]`, by default
    1/S of the model (equal stages). In this unit 1F1B's first rank holds 1 (p microbatches
    of 1/p of the model), whatever p and however many chunks a rank holds, so schedules
    with different numbers of stages compare directly; the exact bytes of a real model are
    memory_model's."""
    S = sched.num_stages
    w = [1.0 / S] * S if weight is None else [float(x) for x in weight]
    out = []
    for row in sched.actions:
        split = {(a.stage, a.mb) for a in row if a.op == W}
        live = peak = 0.0
        for a in row:
            if a.op == F:
                live += w[a.stage]
                peak = max(peak, live)
            elif a.op == B or (a.op == W and (a.stage, a.mb) in split):
                live -= w[a.stage]
        out.append(peak)
    return out


def render_ascii(result: SimResult, unit: float = 1.0) -> str:
    """The classic diagram: ranks as rows, one cell per `unit` of time, `.` idle.

    Meant for unit costs (docstrings, tests, terminals). Cells read "F0" (forward of
    microbatch 0); where a rank holds several stages they keep the stage, "2F0".
    """
    steps = round(result.step_time / unit)
    stages = [{e.action.stage for e in evs} for evs in result.events]
    qualify = any(len(s) > 1 for s in stages)
    rows = []
    for evs in result.events:
        cells = ["."] * steps
        for e in evs:
            a = e.action
            label = str(a) if qualify else f"{a.op.value}{a.mb}"
            for t in range(round(e.start / unit), round(e.end / unit)):
                cells[t] = label
        rows.append(cells)
    width = max((len(c) for row in rows for c in row), default=1)
    return "\n".join(
        f"rank {r} | " + " ".join(c.ljust(width) for c in row).rstrip()
        for r, row in enumerate(rows)
    )
