"""The schedule IR: a list of actions per rank. Generators write it, the validator and the
simulator check it, the runtime executes it and nothing else.

An action is (stage, op, microbatch) and prints as `"2F0"` (stage 2, forward, microbatch 0),
as in torch.distributed.pipelining:

    compute   F       forward of one microbatch through one stage
              B       full backward (gradients w.r.t. the stage input and its weights)
              I       backward w.r.t. the stage input only (zero-bubble's "B")
              W       the deferred weight gradients of an earlier I (zero-bubble's "W")
    transfer  SEND_F  send this stage's output activation to stage+1
              RECV_F  receive this stage's input activation from stage-1
              SEND_B  send the gradient w.r.t. this stage's input to stage-1
              RECV_B  receive the gradient w.r.t. this stage's output from stage+1

Generators emit compute actions only; `lower` adds the transfers between stages that live
on different ranks (a receive right before the compute that needs it, a send right after
the compute that produces it). Stages on the same rank hand tensors over locally.

Messages cross *boundaries*: boundary `b` joins stage `b` and stage `b + 1`. Activations
travel forward over it, gradients backward; `message(action)` names what a transfer carries,
so a send and its receive have the same key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum


class Op(str, Enum):
    F = "F"
    B = "B"
    I = "I"
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return _KIND[self][0]

    @property
    def is_comm(self) -> bool:
        return not _KIND[self][0]

    @property
    def is_send(self) -> bool:
        return _KIND[self][1]


F, B, I, W = Op.F, Op.B, Op.I, Op.W
SEND_F, RECV_F, SEND_B, RECV_B = Op.SEND_F, Op.RECV_F, Op.SEND_B, Op.RECV_B
#: op -> (is compute, is send), looked up rather than compared: the simulators ask often
_KIND = {op: (op in (F, B, I, W), op in (SEND_F, SEND_B)) for op in Op}

_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclass(frozen=True, slots=True)
class Action:
    stage: int
    op: Op
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.mb}"

    __repr__ = __str__

    @staticmethod
    def parse(text: str) -> Action:
        """`Action.parse("2F0")` -> stage 2, forward, microbatch 0."""
        match = _ACTION_RE.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not an action like '2F0' or '1SEND_B3'")
        return Action(int(match[1]), Op(match[2]), int(match[3]))


#: (kind, boundary, microbatch): what a transfer carries. kind is "act" or "grad".
Message = tuple[str, int, int]


def message(a: Action) -> Message:
    """The message a transfer sends or receives; its send and receive share this key."""
    if a.op == SEND_F:
        return ("act", a.stage, a.mb)
    if a.op == RECV_F:
        return ("act", a.stage - 1, a.mb)
    if a.op == SEND_B:
        return ("grad", a.stage - 1, a.mb)
    if a.op == RECV_B:
        return ("grad", a.stage, a.mb)
    raise ValueError(f"{a} is a compute action, not a transfer")


def peer_stage(a: Action) -> int:
    """The stage on the other end of a transfer."""
    return a.stage + 1 if a.op in (SEND_F, RECV_B) else a.stage - 1


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists (lowered: transfers included) plus what they were made for."""

    name: str
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_ranks(self) -> int:
        return len(self.actions)

    def rank_of(self, stage: int) -> int:
        return self.stage_to_rank[stage]

    def compute(self, rank: int) -> list[Action]:
        return [a for a in self.actions[rank] if a.op.is_compute]

    @property
    def split_backward(self) -> bool:
        """Whether the backward runs as I and W (the stages must keep W's inputs)."""
        return any(a.op in (I, W) for row in self.actions for a in row)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def grid(self, marks: dict[tuple[int, int], str] | None = None) -> str:
        return format_grid(self.actions, marks)

    def __str__(self) -> str:
        head = (
            f"schedule {self.name}: {self.num_stages} stages on {self.num_ranks} ranks, "
            f"{self.num_microbatches} microbatches"
        )
        return head + "\n" + self.grid()


def lower(
    compute: Sequence[Sequence[Action]], stage_to_rank: Sequence[int]
) -> tuple[tuple[Action, ...], ...]:
    """Insert the transfers that cross ranks around the compute actions of each rank."""
    num_stages = len(stage_to_rank)
    out: list[tuple[Action, ...]] = []
    for rank, actions in enumerate(compute):
        lowered: list[Action] = []
        for a in actions:
            s, mb = a.stage, a.mb
            prev_remote = s > 0 and stage_to_rank[s - 1] != rank
            next_remote = s < num_stages - 1 and stage_to_rank[s + 1] != rank
            if a.op == F and prev_remote:
                lowered.append(Action(s, RECV_F, mb))
            if a.op in (B, I) and next_remote:
                lowered.append(Action(s, RECV_B, mb))
            lowered.append(a)
            if a.op == F and next_remote:
                lowered.append(Action(s, SEND_F, mb))
            if a.op in (B, I) and prev_remote:
                lowered.append(Action(s, SEND_B, mb))
        out.append(tuple(lowered))
    return tuple(out)


def make_schedule(
    name: str,
    compute: Sequence[Sequence[Action]],
    stage_to_rank: Sequence[int],
    num_microbatches: int,
) -> Schedule:
    return Schedule(
        name=name,
        num_stages=len(stage_to_rank),
        num_microbatches=num_microbatches,
        stage_to_rank=tuple(stage_to_rank),
        actions=lower(compute, stage_to_rank),
    )


def one_stage_per_rank(name: str, num_ranks: int, num_stages: int) -> None:
    """Refuse a stage count other than the rank count, for the single-chunk schedules."""
    if num_stages != num_ranks:
        raise ValueError(f"{name} runs one stage per rank: {num_stages} stages on {num_ranks}")


def chunks_per_rank(name: str, num_ranks: int, num_stages: int) -> int:
    """v, the model chunks each rank holds; refuses stages that do not spread evenly."""
    if num_stages % num_ranks:
        raise ValueError(f"{name}: {num_stages} stages do not spread evenly over {num_ranks}")
    return num_stages // num_ranks


def round_robin(num_ranks: int, num_stages: int) -> tuple[int, ...]:
    """Stage s on rank s % p (torch.distributed.pipelining's "loop" style)::

    p = 2, 4 stages     rank 0: 0 . 2 .     rank 1: . 1 . 3
    """
    return tuple(s % num_ranks for s in range(num_stages))


def v_shape(num_ranks: int, num_stages: int) -> tuple[int, ...]:
    """Stages go down the ranks and back up (torch.distributed.pipelining's "v" style): with
    two chunks per rank, stage s and stage 2p-1-s share rank s, so the first and the last
    stage live on rank 0 and the turn (stages p-1 and p) on rank p-1 hands over locally::

        p = 3, 6 stages     rank 0: 0 . . . . 5     rank 1: . 1 . . 4 .     rank 2: . . 2 3 . .
    """
    chunks_per_rank("v placement", num_ranks, num_stages)
    out = []
    for s in range(num_stages):
        k, i = divmod(s, num_ranks)
        out.append(i if k % 2 == 0 else num_ranks - 1 - i)
    return tuple(out)


def format_grid(
    actions: Sequence[Sequence[Action]], marks: dict[tuple[int, int], str] | None = None
) -> str:
    """Step-by-rank table of the action lists; `marks[(rank, index)]` flags a cell.

    step  rank 0    rank 1
       0  0F0       1RECV_F0
       1  0SEND_F0  1F0       <-- rank 1: ...
    """
    marks = marks or {}
    ranks = len(actions)
    rows = max((len(a) for a in actions), default=0)
    cells = [
        [str(actions[r][i]) if i < len(actions[r]) else "" for r in range(ranks)]
        for i in range(rows)
    ]
    for r, i in marks:
        if i < rows:
            cells[i][r] = "*" + cells[i][r]
    header = ["step", *[f"rank {r}" for r in range(ranks)]]
    width = [max([len(header[0]), len(str(rows))])]
    width += [max([len(header[r + 1])] + [len(c[r]) for c in cells]) for r in range(ranks)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, width)).rstrip()]
    for i, row in enumerate(cells):
        line = "  ".join([str(i).rjust(width[0])] + [c.ljust(w) for c, w in zip(row, width[1:])])
        notes = [f"rank {r}: {msg}" for (r, j), msg in sorted(marks.items()) if j == i]
        if notes:
            line += "  <-- ERROR HERE: " + "; ".join(notes)
        lines.append(line.rstrip())
    for (r, i), msg in sorted(marks.items()):
        if i >= rows:
            lines.append(f"(rank {r}, after its last action: {msg})")
    return "\n".join(lines)


def parse_actions(rows: Iterable[str]) -> list[list[Action]]:
    """Per-rank lists from strings like `"0F0 0F1 0B0 0B1"` (one string per rank)."""
    return [[Action.parse(t) for t in row.split()] for row in rows]
