"""torch.distributed.pipelining's schedule files: write ours, read theirs (validated first).

The format is the "compute_only" CSV that `PipelineScheduleMulti._dump_csv` writes and
`_load_csv` reads (torchtitan's `pipeline_parallel_schedule_csv`): one row per rank, one
cell per action in the rank's order, an action written as stage, op, microbatch::

    0F0,0F1,2F0,2F1,0F2,2B0,0F3,2B1,2F2,0B0,2F3,0B1,2B2,2B3,0B2,0B3
    1F0,1F1,3F0,3B0,3F1,3B1,1F2,1B0,1F3,1B1,3F2,3B2,3F3,3B3,1B2,1B3

torch writes an idle step (its None) as an empty cell and its runtime skips it; the file
says nothing else about time. Reading, splitgraph also skips what its runtime does on its
own: UNSHARD and RESHARD (FSDP) and REDUCE_GRAD (the gradient reduction after a stage's last
backward). An OVERLAP_F_B cell, `(0F3;3B1)OVERLAP_F_B` (DualPipeV), runs its actions one
after the other. Transfers (SEND_F, RECV_B, ...) mean a "compute_comms" file: refused, as
torch's own compute-only loader refuses them; splitgraph inserts its transfers itself.

Where each stage runs is read from the file (the rank whose row holds it), so a V file
loads with its V placement. The loaded schedule is validated like a generated one: a bad
file is refused with the step-by-rank grid and the offending action marked ERROR HERE.

Writing, `to_csv` emits exactly the compute actions of each rank (no empty cells): torch's
`_load_csv` reads it back, validates it and lowers it to its own transfers (tested).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from splitgraph.errors import ScheduleError
from splitgraph.schedule.ir import Action, Schedule, make_schedule
from splitgraph.schedule.validate import validate

#: torch's actions that are not computation and that splitgraph's runtime does itself
_IGNORED = ("UNSHARD", "RESHARD", "REDUCE_GRAD")
_TRANSFERS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
_OVERLAP = re.compile(r"^\((.*)\)OVERLAP_F_B$")


def to_csv(sched: Schedule) -> str:
    """The schedule as torch's compute-only CSV text (csv module, "\\r\\n" line ends)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    for rank in range(sched.num_ranks):
        writer.writerow([str(a) for a in sched.compute(rank)])
    return buf.getvalue()


def write_csv(sched: Schedule, path: str | Path) -> Path:
    """Write `to_csv` to `path`, refusing to overwrite a file (write it elsewhere, or delete it)."""
    out = Path(path)
    if out.exists():
        raise ValueError(f"--to-csv {out}: the file exists; choose a new path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(to_csv(sched), newline="")
    tmp.replace(out)
    return out


def parse_csv(text: str, source: str = "<csv>") -> list[list[Action]]:
    """Compute actions per rank from torch's compute-only CSV text (see the module docstring)."""
    rows: list[list[Action]] = []
    for line, cells in enumerate(csv.reader(io.StringIO(text)), start=1):
        acts: list[Action] = []
        for col, cell in enumerate(cells, start=1):
            text_cell = cell.strip()
            if not text_cell:
                continue  # torch's idle step
            overlap = _OVERLAP.match(text_cell)
            parts = overlap[1].split(";") if overlap else [text_cell]
            for part in (p.strip() for p in parts if p.strip()):
                kind = re.sub(r"^\d+", "", part).rstrip("0123456789")
                if kind in _IGNORED:
                    continue
                where = f"{source}, rank {line - 1} (line {line}), cell {col}"
                if kind in _TRANSFERS:
                    raise ScheduleError(
                        f"{where}: {part!r} is a transfer; this is a compute_comms file. Dump the "
                        "schedule with format='compute_only': splitgraph adds its own transfers."
                    )
                try:
                    acts.append(Action.parse(part))
                except ValueError as e:
                    raise ScheduleError(f"{where}: {e}") from None
        rows.append(acts)
    while rows and not rows[-1]:
        rows.pop()  # a trailing blank line is no rank
    if not rows:
        raise ScheduleError(f"{source}: no actions: a schedule file has one row per rank")
    return rows


def load_csv(
    path: str | Path,
    num_ranks: int | None = None,
    num_microbatches: int | None = None,
    virtual: int | None = None,
) -> Schedule:
    """Read, place and validate a torch.distributed.pipelining schedule file.

    The expected shape (ranks, microbatches, chunks per rank), when given, must match the
    file's; the stage of each action says where it runs."""
    file = Path(path)
    if not file.is_file():
        raise ScheduleError(f"schedule.path={str(path)!r}: no such file")
    rows = parse_csv(file.read_text(), str(file))
    return schedule_from_rows(rows, f"csv {file.name}", num_ranks, num_microbatches, virtual)


def csv_placement(path: str | Path) -> tuple[int, ...] | None:
    """The stage-to-rank map of a schedule file (the rank whose row holds each stage), read
    before the schedule is validated; None where the file cannot say (load_csv says why)."""
    try:
        rows = parse_csv(Path(path).read_text(), str(path))
    except (OSError, ScheduleError):
        return None
    owner: dict[int, int] = {}
    for r, acts in enumerate(rows):
        for a in acts:
            owner.setdefault(a.stage, r)
    if sorted(owner) != list(range(len(owner))):
        return None
    return tuple(owner[s] for s in range(len(owner)))


def schedule_from_rows(
    rows: list[list[Action]],
    name: str,
    num_ranks: int | None = None,
    num_microbatches: int | None = None,
    virtual: int | None = None,
) -> Schedule:
    """A validated Schedule from compute rows, placing each stage on the rank that runs it."""
    owner: dict[int, int] = {}
    for r, acts in enumerate(rows):
        for a in acts:
            if owner.setdefault(a.stage, r) != r:
                raise ScheduleError(
                    f"{name}: stage {a.stage} runs on rank {owner[a.stage]} and on rank {r}; "
                    "a stage lives on one rank"
                )
    stages = max(owner, default=-1) + 1
    missing = sorted(set(range(stages)) - set(owner))
    if missing:
        raise ScheduleError(f"{name}: stages {missing} have no actions (0..{stages - 1} do)")
    m = 1 + max((a.mb for acts in rows for a in acts), default=-1)
    have = {"ranks": len(rows), "microbatches": m, "chunks per rank": stages / len(rows)}
    want = {"ranks": num_ranks, "microbatches": num_microbatches, "chunks per rank": virtual}
    wrong = [
        f"{k} {have[k]:g} (expected {v})" for k, v in want.items() if v is not None and have[k] != v
    ]
    if wrong:
        raise ScheduleError(
            f"{name} does not fit this run: it has " + ", ".join(wrong) + ". Set "
            "pipeline.stages, pipeline.microbatches and schedule.virtual_stages to match it."
        )
    sched = make_schedule(name, rows, [owner[s] for s in range(stages)], m)
    validate(sched)
    return sched
