"""torch.distributed.pipelining interop: its orders are ours, action for action; its CSV
files load here and ours load there.

torch computes a schedule's order (`pipeline_order`) in the schedule's constructor from the
stage count alone; the stage objects are only asked for their index, the stage count, the
group's size and rank, and the module (for a torch.compile check). Fake stages carrying those
let the installed torch build its orders without a process group. Classes or attributes an
older torch lacks are skipped by name, never silently: each skip says what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitgraph.errors import ScheduleError
from splitgraph.schedule import build_schedule
from splitgraph.schedule.interop import load_csv, parse_csv, to_csv, write_csv
from splitgraph.schedule.ir import Action, B, F, parse_actions

tpp = pytest.importorskip("torch.distributed.pipelining.schedules")


class _FakeStage:
    """What torch's schedule constructors read from a stage, and nothing else."""

    def __init__(self, index: int, num_stages: int, group_size: int) -> None:
        self.stage_index, self.num_stages = index, num_stages
        self.group_size, self.group_rank = group_size, 0
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.submod = torch.nn.Identity()
        self.stage_index_to_group_rank: dict[int, int] = {}


def _torch_class(name: str) -> Any:
    cls = getattr(tpp, name, None)
    if cls is None:
        pytest.skip(f"torch {torch.__version__} has no {name}")
    return cls


def _rank0_stages(p: int, v: int, style: str) -> list[_FakeStage]:
    try:
        from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no generate_stage_to_rank_mapping")
    place = generate_stage_to_rank_mapping(p, p * v, style=style)
    return [_FakeStage(s, p * v, p) for s in range(p * v) if place[s] == 0]


def torch_order(name: str, p: int, v: int, m: int, style: str = "loop") -> list[list[str]]:
    """Rank by rank, the compute actions of torch's own order (None bubbles and its
    UNSHARD/RESHARD/REDUCE_GRAD dropped: splitgraph's runtime does those itself)."""
    cls = _torch_class(name)
    if issubclass(cls, tpp.PipelineScheduleSingle):
        sched = cls(_FakeStage(0, p, p), m)
    else:
        sched = cls(_rank0_stages(p, v, style), m)
    order = getattr(sched, "pipeline_order", None)
    if not order:
        pytest.skip(f"torch {torch.__version__}'s {name} exposes no pipeline_order")
    out = []
    for rank in range(p):
        acts = [a for a in order[rank] if a is not None]
        out.append([str(a) for a in acts if str(a.computation_type.value) in "FBIW"])
    return out


def ours(name: str, p: int, v: int, m: int) -> list[list[str]]:
    sched = build_schedule(name, p, m, v)
    return [[str(a) for a in sched.compute(r)] for r in range(p)]


@pytest.mark.parametrize(("p", "m"), [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 3, 4, 8)])
def test_gpipe_is_torchs(p: int, m: int) -> None:
    assert ours("gpipe", p, 1, m) == torch_order("ScheduleGPipe", p, 1, m)


@pytest.mark.parametrize(("p", "m"), [(p, m) for p in (1, 2, 3, 4) for m in (4, 5, 8) if m >= p])
def test_1f1b_is_torchs(p: int, m: int) -> None:
    """torch 2.13's Schedule1F1B._get_pipeline_order numbers the last rank's forwards from 1
    (with no warm-up it increments the counter before the first append: F1 B0 F2 B1 ... Fm):
    an off-by-one in the picture only, its runtime keeps its own counters. That rank is
    compared with torch's forwards renumbered; a torch that fixed it matches as is."""
    theirs, mine = torch_order("Schedule1F1B", p, 1, m), ours("1f1b", p, 1, m)
    assert mine[:-1] == theirs[:-1]
    last = [Action.parse(a) for a in theirs[-1]]
    renumbered = [str(Action(a.stage, a.op, a.mb - 1)) if a.op == F else str(a) for a in last]
    assert mine[-1] in (theirs[-1], renumbered)


@pytest.mark.parametrize(
    ("p", "v", "m"),
    [(2, 2, 4), (2, 2, 6), (4, 2, 8), (4, 2, 10), (4, 2, 3), (3, 3, 6), (4, 3, 12), (2, 4, 2)],
)
def test_interleaved_is_torchs_for_every_m_torch_runs(p: int, v: int, m: int) -> None:
    """Including m not a multiple of p where torch runs it (m=10 on 4 ranks: 2 rounds of 5;
    m=3: 1 round). For m torch refuses (9 on 4 ranks) ours still runs: test_schedules_v."""
    assert ours("interleaved", p, v, m) == torch_order("ScheduleInterleaved1F1B", p, v, m)


@pytest.mark.parametrize(("p", "v", "m"), [(2, 2, 4), (4, 2, 8), (3, 3, 5), (2, 2, 1)])
def test_loopedbfs_is_torchs(p: int, v: int, m: int) -> None:
    assert ours("loopedbfs", p, v, m) == torch_order("ScheduleLoopedBFS", p, v, m)


@pytest.mark.parametrize(("p", "m"), [(p, m) for p in (2, 3, 4) for m in (1, 2, 3, 4, 8, 9)])
def test_zbv_is_torchs(p: int, m: int) -> None:
    assert ours("zbv", p, 2, m) == torch_order("ScheduleZBVZeroBubble", p, 2, m, style="v")


@pytest.mark.parametrize(
    ("name", "p", "v", "m"),
    [
        ("1f1b", 3, 1, 4),
        ("zb1", 2, 1, 4),
        ("zb2", 3, 1, 5),
        ("interleaved", 2, 2, 3),
        ("loopedbfs", 2, 2, 4),
        ("zbv", 2, 2, 4),
        ("vhalf", 3, 2, 4),
        ("vmin", 2, 2, 5),
    ],
)
def test_our_csv_loads_in_torch_and_back_here(
    tmp_path: Path, name: str, p: int, v: int, m: int
) -> None:
    """torch's _load_csv validates the file (counts, order, one rank per stage), infers the
    placement and lowers it to its own sends and receives; then ours reads it back."""
    sched = build_schedule(name, p, m, v)
    path = write_csv(sched, tmp_path / f"{name}.csv")
    runtime = _torch_class("_PipelineScheduleRuntime")
    style = "v" if sched.stage_to_rank != tuple(s % p for s in range(p * v)) else "loop"
    theirs = runtime(_rank0_stages(p, v, style), m)
    theirs._load_csv(str(path), format="compute_only")
    assert [theirs.stage_index_to_group_rank[s] for s in range(p * v)] == list(sched.stage_to_rank)
    assert [[str(a) for a in theirs.pipeline_order[r] if a is not None] for r in range(p)] == [
        [str(a) for a in sched.compute(r)] for r in range(p)
    ]
    back = load_csv(path, num_ranks=p, num_microbatches=m, virtual=v)
    assert back.actions == sched.actions and back.stage_to_rank == sched.stage_to_rank


def test_torchs_csv_with_bubbles_loads_here(tmp_path: Path) -> None:
    """torch's own dump: idle steps are empty cells; they are skipped, the order kept."""
    cls = _torch_class("ScheduleInterleaved1F1B")
    theirs = cls(_rank0_stages(2, 2, "loop"), 4)
    path = tmp_path / "torch.csv"
    try:
        theirs._dump_csv(str(path), format="compute_only")
    except TypeError:  # a torch whose _dump_csv writes the compute-only order and takes no format
        theirs._dump_csv(str(path))
    text = path.read_text()
    assert ",," in text  # torch wrote its bubbles
    assert load_csv(path, 2, 4, 2).actions == build_schedule("interleaved", 2, 4, 2).actions


def test_csv_text_is_torchs_format() -> None:
    text = to_csv(build_schedule("1f1b", 2, 2))
    assert text == "0F0,0F1,0B0,0B1\r\n1F0,1B0,1F1,1B1\r\n"


def test_csv_reading_skips_torch_only_actions_and_expands_overlap() -> None:
    rows = parse_csv("0F0,,0UNSHARD,(0F1;1B0)OVERLAP_F_B,0REDUCE_GRAD\r\n1F0,1B0\r\n")
    assert rows == parse_actions(["0F0 0F1 1B0", "1F0 1B0"])
    assert rows[0][2].op == B


def test_a_bad_file_is_refused_with_the_grid_marked(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("0B0,0F0,0F1,0B1\n1F0,1B0,1F1,1B1\n")
    with pytest.raises(ScheduleError) as info:
        load_csv(path)
    text = str(info.value)
    assert "0B0 runs before its forward 0F0" in text and "<-- ERROR HERE" in text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0F0,0SEND_F0\n1RECV_F0,1F0\n", "compute_comms file"),
        ("0F0,0X0\n", "is not an action"),
        ("0F0,1F0,0B0,1B0\n1F0\n", "stage 1 runs on rank 0 and on rank 1"),
        ("0F0,0B0\n2F0,2B0\n", r"stages \[1\] have no actions"),
        ("\n\n", "no actions"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "x.csv"
    path.write_text(text)
    with pytest.raises(ScheduleError, match=why):
        load_csv(path)


def test_a_file_for_another_run_is_refused_naming_both_shapes(tmp_path: Path) -> None:
    path = write_csv(build_schedule("1f1b", 2, 4), tmp_path / "a.csv")
    with pytest.raises(ScheduleError, match=r"ranks 2 \(expected 4\), microbatches 4 \(expected 8"):
        load_csv(path, num_ranks=4, num_microbatches=8)


def test_write_csv_never_overwrites(tmp_path: Path) -> None:
    path = write_csv(build_schedule("1f1b", 2, 2), tmp_path / "a.csv")
    with pytest.raises(ValueError, match="the file exists"):
        write_csv(build_schedule("gpipe", 2, 2), path)
    assert path.read_bytes() == to_csv(build_schedule("1f1b", 2, 2)).encode()
