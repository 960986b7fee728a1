"""The memory model predicts the meter's saved-activation peak exactly, per rank, for every
schedule, activation, bias, task, dtype, partition and (uneven) microbatch size.

One process group launch per world size runs every case (gloo); the predictions are
computed here, in the test process, from the plan and the schedule alone.
"""

from __future__ import annotations

import itertools
from functools import cache
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from splitgraph.config import Activation, Task, load_config
from splitgraph.data import microbatch_sizes
from splitgraph.memory_model import (
    ModelShape,
    predict_for_plan,
    stage_saved,
    stage_saved_bytes,
)
from splitgraph.partition import make_plan
from splitgraph.runtime.dist import torch_dtype
from splitgraph.runtime.spawn import run_ranks
from splitgraph.schedule import build_schedule
from tests.workers import TINY, saved_peak_worker

MANUAL = {1: [], 2: [2], 3: [1, 4]}
SCHEDULES = [("naive", 1), ("gpipe", 3), ("gpipe", 8), ("1f1b", 3), ("1f1b", 5), ("1f1b", 8)]
ROTATION = [(a, t) for t in ("classification", "regression") for a in Activation.__members__]


def _cases(p: int, dtypes: tuple[str, ...] = ("float32", "float64")) -> list[dict[str, Any]]:
    """Schedules x bias x partition; activation, task and dtype rotate through the grid.

    p=3 (a middle stage that receives and sends) keeps every third case: launches of three
    ranks are the slow part on two cores."""
    cases = []
    rotation = itertools.cycle(ROTATION)
    dtype_rotation = itertools.cycle(dtypes)
    for (sched, m), bias, part in itertools.product(
        SCHEDULES, (False, True), ("uniform", "params", "manual")
    ):
        act, task = next(rotation)
        dtype = next(dtype_rotation)
        ov = [
            f"schedule.name={sched}",
            f"pipeline.microbatches={m}",
            f"model.bias={str(bias).lower()}",
            f"runtime.dtype={dtype}",
            f"partition.strategy={part}",
            f"model.activation={act}",
            f"model.task={task}",
        ]
        if part == "manual":
            ov.append(f"partition.boundaries={MANUAL[p]}")
        cid = f"p{p}-{sched}-m{m}-{part}-{'bias' if bias else 'nobias'}-{dtype}-{act}-{task[:5]}"
        cases.append({"id": cid, "overrides": ov})
    return cases[::3] if p == 3 else cases


@cache
def _base() -> Any:
    return load_config(TINY)


def predicted(p: int, overrides: list[str]) -> list[int]:
    cfg = OmegaConf.merge(_base(), OmegaConf.from_dotlist(overrides))
    plan = make_plan(cfg, p)
    sizes = microbatch_sizes(int(cfg.train.batch_size), int(cfg.pipeline.microbatches))
    sched = build_schedule(str(cfg.schedule.name), p, len(sizes))
    es = torch.empty((), dtype=torch_dtype(cfg.runtime.dtype)).element_size()
    return predict_for_plan(ModelShape.from_config(cfg, es), plan.bounds, sizes, sched)


@cache
def _measured(p: int) -> dict[str, list[list[int]]]:
    cases = _cases(p) + (_cases(1, ("bfloat16",))[:12] if p == 1 else [])
    if p == 1:
        per_rank = [saved_peak_worker(0, 1, cases)]
    else:
        per_rank = run_ranks(saved_peak_worker, p, cases, timeout=150)
    return {cid: [r[cid] for r in per_rank] for cid in per_rank[0]}


#: p=3 has a first, a middle and a last stage; more ranks add nothing to the accounting.
ALL = [(p, c) for p in (1, 2, 3) for c in _cases(p)]


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("p", "case"), ALL, ids=[c["id"] for _, c in ALL])
def test_prediction_equals_the_meter(p: int, case: dict[str, Any]) -> None:
    got = _measured(p)[case["id"]]
    assert [current for _, current in got] == [0] * p  # everything released by the step
    assert predicted(p, case["overrides"]) == [peak for peak, _ in got]


@pytest.mark.timeout(200)
def test_bfloat16_single_rank() -> None:
    measured = _measured(1)
    cases = _cases(1, ("bfloat16",))[:12]
    assert cases and all(c["id"] in measured for c in cases)
    for c in cases:
        assert predicted(1, c["overrides"]) == [measured[c["id"]][0][0]], c["id"]


def test_grid_covers_schedules_activations_tasks_and_uneven_microbatches() -> None:
    ids = " ".join(c["id"] for _, c in ALL)
    for word in ("naive", "gpipe", "1f1b", "bias", "nobias", "float32", "float64", "manual"):
        assert word in ids
    for act, task in ROTATION:
        assert f"{act}-{task[:5]}" in ids
    assert microbatch_sizes(12, 5) == [3, 3, 2, 2, 2] and microbatch_sizes(12, 8)[-1] == 1


def test_hand_counts_per_op() -> None:
    """Per sample: the linear saves its input; relu/tanh/sigmoid their output (shared with the
    next linear); gelu its input; the loss log-probs + int64 label (+ one scalar per
    microbatch) or, for MSE, its input and the target."""
    dims = (6, 5, 4)
    relu = ModelShape(dims, Activation.relu, Task.classification, 8)
    assert stage_saved(relu, 0, 2, 0, 1) == {
        ("a0", 0): 6 * 8,
        ("a1", 0): 5 * 8,
        ("logp", 0): 4 * 8,
        ("target", 0): 8,
        ("total_weight", 0): 8,
    }
    gelu = ModelShape(dims, Activation.gelu, Task.regression, 4)
    assert stage_saved(gelu, 0, 2, 3, 2) == {
        ("a0", 3): 2 * 6 * 4,
        ("z0", 3): 2 * 5 * 4,
        ("a1", 3): 2 * 5 * 4,
        ("o", 3): 2 * 4 * 4,
        ("target", 3): 2 * 4 * 4,
    }
    # stage 1 alone: its received input is saved by its linear
    assert stage_saved(relu, 1, 2, 0, 1)[("a1", 0)] == 5 * 8
    assert stage_saved_bytes(gelu, 0, 2, 2) == 2 * (6 + 5 + 5 + 4 + 4) * 4


def test_a_tensor_shared_by_two_stages_on_one_rank_counts_once() -> None:
    """Stage s-1's ReLU output is stage s's input when both live on one rank (handed over
    without a copy): the walk counts it once, as the meter's dedup does."""
    from splitgraph.memory_model import predict_saved_peak, saved_fn
    from splitgraph.schedule.ir import Action, B, F, make_schedule

    shape = ModelShape((6, 5, 4), Activation.relu, Task.classification, 8)
    compute = [[Action(0, F, 0), Action(1, F, 0), Action(1, B, 0), Action(0, B, 0)]]
    sched = make_schedule("local", compute, [0, 0], 1)
    peak = predict_saved_peak(sched, saved_fn(shape, [0, 1, 2], [1]))
    assert peak == [(6 + 5 + 4) * 8 + 8 + 8]
