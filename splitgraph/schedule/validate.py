"""Check a schedule before anything runs; on failure show the grid with the bad action marked.

The rules, in the order they are checked:

1. every action sits on the rank that owns its stage;
2. every (stage, microbatch) has exactly one F and either one B or one I and one W;
3. on its rank, a microbatch's F precedes its B/I, and I precedes W; a stage whose
   neighbour is on the same rank runs after it (forward) or before it (backward);
4. every transfer a stage needs is present exactly once, receives before the compute that
   reads them and sends after the compute that writes them, and nothing is sent between
   stages of the same rank;
5. on each channel (sending rank, receiving rank, activations or gradients) sends and
   receives are posted in the same order: first in, first out, which is what NCCL needs and
   what lets the runtime match messages by channel alone;
6. a dry run under the strict transfer rules (see simulate) terminates: no deadlock.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from splitgraph.errors import ScheduleError
from splitgraph.schedule.ir import (
    RECV_B,
    RECV_F,
    SEND_B,
    SEND_F,
    Action,
    B,
    F,
    I,
    Schedule,
    W,
    message,
)
from splitgraph.schedule.simulate import Deadlock, channel_of, simulate


def _fail(sched: Schedule, rule: str, marks: dict[tuple[int, int], str]) -> ScheduleError:
    return ScheduleError(f"schedule {sched.name!r} is invalid: {rule}\n{sched.grid(marks)}")


def validate(sched: Schedule) -> None:
    """Raise ScheduleError (with the marked grid) unless the schedule is safe to run.

    The rules of the module docstring, one function each, in order: the first broken one
    raises, naming the action and marking it on the grid."""
    where = _check_ownership(sched)
    _check_compute(sched, where)
    _check_order(sched, where)
    _check_transfers(sched, where)
    _check_channels(sched, where)
    _check_terminates(sched)


#: where each action sits: (rank, index in that rank's list)
Where = dict[Action, tuple[int, int]]


def _back(where: Where, s: int, mb: int) -> Action:
    """The backward of (s, mb): B, or I where it is split into I and W."""
    return Action(s, B, mb) if Action(s, B, mb) in where else Action(s, I, mb)


def _check_ownership(sched: Schedule) -> Where:
    """1. every action on the rank that owns its stage, none twice; returns where each is."""
    S, M = sched.num_stages, sched.num_microbatches
    where: Where = {}
    for r, row in enumerate(sched.actions):
        for i, a in enumerate(row):
            if not (0 <= a.stage < S and 0 <= a.mb < M):
                raise _fail(sched, f"{a} is outside {S} stages x {M} microbatches", {(r, i): "?"})
            if sched.rank_of(a.stage) != r:
                owner = sched.rank_of(a.stage)
                raise _fail(
                    sched,
                    f"{a} is on rank {r} but stage {a.stage} lives on rank {owner}",
                    {(r, i): f"stage {a.stage} is on rank {owner}"},
                )
            if a in where:
                r0, i0 = where[a]
                raise _fail(sched, f"{a} appears twice", {(r0, i0): "first", (r, i): "again"})
            where[a] = (r, i)
    return where


def _check_compute(sched: Schedule, where: Where) -> None:
    """2. every microbatch's compute, exactly once."""
    missing = []
    for s in range(sched.num_stages):
        for mb in range(sched.num_microbatches):
            has = {op for op in (F, B, I, W) if Action(s, op, mb) in where}
            if F not in has:
                missing.append(f"{s}F{mb}")
            if B in has and has & {I, W}:
                missing.append(f"{s}B{mb} together with {s}I{mb}/{s}W{mb}")
            elif B not in has and has & {I, W} != {I, W}:
                missing.append(f"{s}B{mb} (or {s}I{mb} + {s}W{mb})")
    if missing:
        head = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise _fail(sched, f"missing or conflicting compute: {head}", {})


def _check_order(sched: Schedule, where: Where) -> None:
    """3. on each rank: F before its B/I, I before W, neighbours on one rank in order."""
    S = sched.num_stages
    for s in range(S):
        for mb in range(sched.num_microbatches):
            f, b = Action(s, F, mb), _back(where, s, mb)
            if where[b] < where[f]:
                raise _fail(
                    sched,
                    f"{b} runs before its forward {f}",
                    {where[b]: f"before {f}", where[f]: "forward here"},
                )
            wa = Action(s, W, mb)
            if wa in where and where[wa] < where[b]:
                raise _fail(sched, f"{wa} runs before {b}", {where[wa]: f"before {b}"})
            if s > 0 and sched.rank_of(s - 1) == sched.rank_of(s):
                prev = Action(s - 1, F, mb)
                if where[prev] > where[f]:
                    raise _fail(
                        sched,
                        f"{f} reads {prev}'s output before it exists",
                        {where[f]: f"needs {prev} first"},
                    )
            if s < S - 1 and sched.rank_of(s + 1) == sched.rank_of(s):
                nxt = _back(where, s + 1, mb)
                if where[nxt] > where[b]:
                    raise _fail(
                        sched,
                        f"{b} reads the gradient of {nxt} before it exists",
                        {where[b]: f"needs {nxt} first"},
                    )


def _check_transfers(sched: Schedule, where: Where) -> None:
    """4. transfers present, placed around their compute, and only across ranks."""
    S = sched.num_stages
    for s in range(S):
        prev_remote = s > 0 and sched.rank_of(s - 1) != sched.rank_of(s)
        next_remote = s < S - 1 and sched.rank_of(s + 1) != sched.rank_of(s)
        for mb in range(sched.num_microbatches):
            f, b = Action(s, F, mb), _back(where, s, mb)
            for op, needed, anchor, before in (
                (RECV_F, prev_remote, f, True),
                (SEND_F, next_remote, f, False),
                (RECV_B, next_remote, b, True),
                (SEND_B, prev_remote, b, False),
            ):
                t = Action(s, op, mb)
                if t in where and not needed:
                    raise _fail(sched, f"{t} crosses no rank boundary", {where[t]: "not needed"})
                if needed and t not in where:
                    raise _fail(sched, f"{t} is missing", {where[anchor]: f"needs {t}"})
                if needed and (where[t] < where[anchor]) != before:
                    side = "before" if before else "after"
                    raise _fail(
                        sched,
                        f"{t} must come {side} {anchor}",
                        {where[t]: f"must be {side} {anchor}"},
                    )


def _check_channels(sched: Schedule, where: Where) -> None:
    """5. the same order on both ends of each channel (src rank, dst rank, kind)."""
    sends: dict[tuple[int, int, str], list[Action]] = defaultdict(list)
    recvs: dict[tuple[int, int, str], list[Action]] = defaultdict(list)
    for row in sched.actions:
        for a in row:
            if a.op.is_comm:
                (sends if a.op.is_send else recvs)[channel_of(sched, message(a))].append(a)
    for channel in sorted(set(sends) | set(recvs)):
        s_list, r_list = sends.get(channel, []), recvs.get(channel, [])
        src, dst, kind = channel
        what = "activation" if kind == "act" else "gradient"
        for k, (sa, ra) in enumerate(zip(s_list, r_list)):
            if message(sa) != message(ra):
                raise _fail(
                    sched,
                    f"rank {src} sends {sa} as its {what} message #{k} to rank {dst}, which "
                    f"receives {ra} at that point (each channel must deliver in send order)",
                    {where[sa]: f"send #{k}", where[ra]: f"receive #{k}"},
                )
        if Counter(map(message, s_list)) != Counter(map(message, r_list)):
            raise _fail(sched, f"unmatched {what} transfers from rank {src} to rank {dst}", {})


def _check_terminates(sched: Schedule) -> None:
    """6. a dry run under the strict transfer rules terminates: no deadlock."""
    try:
        simulate(sched, strict=True)
    except Deadlock as e:
        marks = {(r, i): e.reasons[r] for r, i in e.stuck.items()}
        raise _fail(sched, "deadlock: no rank can make progress", marks) from None
