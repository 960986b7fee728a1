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

from splitgraph.config import Activation, Task, Workload, load_config, recompute_stages
from splitgraph.cost.memory_model import (
    ModelShape,
    predict_for_plan,
    stage_saved,
    stage_saved_bytes,
)
from splitgraph.data import microbatch_sizes
from splitgraph.model import torch_dtype
from splitgraph.partition import make_plan
from splitgraph.runtime.engine import schedule_for_run
from splitgraph.spawn import run_ranks
from tests.workers import TINY, make_cfg, saved_peak_worker

MANUAL = {1: [], 2: [2], 3: [1, 4]}
#: (schedule, microbatches, extra overrides): F/B, zero-bubble I/W, recomputation, chunks.
SCHEDULES = [
    ("naive", 1, []),
    ("gpipe", 3, []),
    ("gpipe", 8, []),
    ("1f1b", 3, []),
    ("1f1b", 5, []),
    ("1f1b", 8, []),
    ("zb1", 3, []),
    ("zb1", 8, []),
    ("1f1b", 5, ["schedule.recompute=true"]),
    ("gpipe", 3, ["schedule.recompute=true", "schedule.recompute_stages=[0]"]),
    ("zb1", 4, ["schedule.recompute=true"]),
]
ROTATION = [(a, t) for t in ("classification", "regression") for a in Activation.__members__]


def _cases(p: int, dtypes: tuple[str, ...] = ("float32", "float64")) -> list[dict[str, Any]]:
    """Schedules x bias x partition; activation, task and dtype rotate through the grid.

    p=3 (a middle stage that receives and sends) keeps every third case: launches of three
    ranks are the slow part on two cores."""
    cases = []
    rotation = itertools.cycle(ROTATION)
    dtype_rotation = itertools.cycle(dtypes)
    for (sched, m, extra), bias, part in itertools.product(
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
            *extra,
        ]
        if part == "manual":
            ov.append(f"partition.boundaries={MANUAL[p]}")
        tag = "-recompute" + ("0" if len(extra) > 1 else "") if extra else ""
        cid = (
            f"p{p}-{sched}{tag}-m{m}-{part}-{'bias' if bias else 'nobias'}-{dtype}-{act}-{task[:5]}"
        )
        cases.append({"id": cid, "overrides": ov})
    return cases[::3] if p == 3 else cases


@cache
def _base() -> Any:
    return load_config(TINY)


def predicted(p: int, overrides: list[str]) -> list[int]:
    cfg = make_cfg(_base(), overrides)
    work = Workload.of(cfg)
    plan = make_plan(work, p)
    sizes = microbatch_sizes(int(cfg.train.batch_size), int(cfg.pipeline.microbatches))
    sched, plan = schedule_for_run(work, p, plan)  # auto: built from the planner's costs
    es = torch.empty((), dtype=torch_dtype(cfg.runtime.dtype)).element_size()
    shape = ModelShape.of(cfg.model, es)
    recompute = recompute_stages(cfg.schedule, plan.num_stages)
    return predict_for_plan(shape, plan.bounds, sizes, sched, recompute)


@cache
def _measured(p: int) -> dict[str, list[list[int]]]:
    cases = _cases(p) + (INTERLEAVED if p == 2 else []) + V_CASES.get(p, [])
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


#: Two chunks per rank (stages 0 and 2 on rank 0): a stage's output is the next stage's
#: input on the other rank, and the walk adds both chunks' tensors on each rank.
INTERLEAVED = [
    {
        "id": f"p2-{name}2-m{m}-uniform-{act}",
        "overrides": [
            f"schedule.name={name}",
            "schedule.virtual_stages=2",
            f"pipeline.microbatches={m}",
            f"model.activation={act}",
            "runtime.dtype=float64",
            *extra,
        ],
    }
    for name, m, act, extra in (
        ("interleaved", 4, "relu", []),
        ("interleaved", 2, "gelu", ["model.bias=true"]),
        ("loopedbfs", 3, "tanh", []),
        ("interleaved", 4, "sigmoid", ["schedule.recompute=true"]),
    )
]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", INTERLEAVED, ids=[c["id"] for c in INTERLEAVED])
def test_prediction_equals_the_meter_with_two_chunks_per_rank(case: dict[str, Any]) -> None:
    got = _measured(2)[case["id"]]
    assert predicted(2, case["overrides"]) == [peak for peak, _ in got]


def _v(p: int, name: str, m: int, part: str, act: str, *extra: str) -> dict[str, Any]:
    ov = [
        f"schedule.name={name}",
        "schedule.virtual_stages=2",
        f"pipeline.microbatches={m}",
        f"partition.strategy={part}",
        f"model.activation={act}",
        "runtime.dtype=float64",
        *extra,
    ]
    tag = "-recompute" if "schedule.recompute=true" in extra else ""
    return {"id": f"p{p}-{name}2{tag}-m{m}-{part}-{act}", "overrides": ov}


#: The V placement (stage s and 2p-1-s on rank s): rank 0 holds the first and the last
#: stage, and the turn (stages p-1 and p) hands its tensor over on rank p-1 without a copy,
#: so one tensor is both chunks' (counted once). Run in the launches above (p = 2 and 3).
V_CASES = {
    2: [
        _v(2, "zbv", 4, "uniform", "relu"),
        _v(2, "vhalf", 5, "params", "gelu", "model.bias=true"),  # 12 rows: uneven
        _v(2, "vmin", 3, "manual", "tanh", "partition.boundaries=[1,3,4]"),
        _v(2, "zbv", 8, "uniform", "sigmoid", "schedule.recompute=true"),
        # auto: with transfers nearly free, a V list schedule mixing B with I + W
        _v(2, "auto", 8, "params", "relu", "costs.times=flops", "pipeline.bandwidth=1TB"),
    ],
    3: [
        _v(3, "zbv", 5, "uniform", "gelu", "model.bias=true"),
        _v(3, "vhalf", 6, "params", "relu"),
        _v(3, "vmin", 8, "uniform", "tanh", "model.task=regression"),
        _v(3, "auto", 5, "uniform", "gelu", "costs.times=flops"),  # chunks back to back
    ],
}
V_ALL = [(p, c) for p, cs in V_CASES.items() for c in cs]


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("p", "case"), V_ALL, ids=[c["id"] for _, c in V_ALL])
def test_prediction_equals_the_meter_with_the_v_placement(p: int, case: dict[str, Any]) -> None:
    got = _measured(p)[case["id"]]
    assert [current for _, current in got] == [0] * p
    assert predicted(p, case["overrides"]) == [peak for peak, _ in got]
    cfg = make_cfg(_base(), case["overrides"])
    if "auto" not in case["id"]:
        plan = make_plan(Workload.of(cfg), p)
        assert plan.stage_to_rank[0] == plan.stage_to_rank[-1] == 0  # the V, not round robin


def test_bf16_autocast_is_measured_not_predicted() -> None:
    from splitgraph.cost.memory_model import predictable

    assert predictable(load_config(["runtime.dtype=float32"]).runtime)
    assert not predictable(load_config(["runtime.dtype=bfloat16"]).runtime)


def test_grid_covers_schedules_activations_tasks_and_uneven_microbatches() -> None:
    ids = " ".join(c["id"] for _, c in ALL)
    for word in (
        "naive",
        "gpipe",
        "1f1b",
        "zb1",
        "recompute",
        "bias",
        "nobias",
        "float32",
        "float64",
        "manual",
    ):
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
    from splitgraph.cost.memory_model import plan_walk, predict_saved_peak
    from splitgraph.schedule.ir import Action, B, F, make_schedule

    shape = ModelShape((6, 5, 4), Activation.relu, Task.classification, 8)
    compute = [[Action(0, F, 0), Action(1, F, 0), Action(1, B, 0), Action(0, B, 0)]]
    sched = make_schedule("local", compute, [0, 0], 1)
    peak = predict_saved_peak(sched, plan_walk(shape, [0, 1, 2], [1]))
    assert peak == [(6 + 5 + 4) * 8 + 8 + 8]


def test_zbv_saves_nine_tensors_where_1f1b_saves_six() -> None:
    """docs/schedules.md's accounting ("Bytes, not microbatches"), p = 2, m = 4, the wide
    bench model (T = 64 rows x 1024 floats): 1F1B's rank 0 holds 2 microbatches of layers
    0-1 (a0, a1, a2 each: 6T); zbv's rank 0 holds 3 of chunk 0 (a0, a1: 6T) and one pending
    W of chunk 3 (a3, dz3, a4 and the 10-wide dz4): 9T and a sliver, 2p chunk-microbatches."""
    from splitgraph.cost.costs import model_costs
    from splitgraph.cost.memory_model import plan_walk, predict_saved_peak
    from splitgraph.schedule import build_schedule

    wide = ["data.features=1024", "partition=params", "model.hidden=[1024,1024,1024,1024]"]
    peaks = {}
    for name, v in (("1f1b", 1), ("zbv", 2)):
        over = [*wide, f"pipeline.stages={2 * v}", "pipeline.microbatches=4", f"schedule={name}"]
        work = Workload.of(load_config(over))
        plan = make_plan(work, 2)
        mc = model_costs(work, plan.num_stages, times=False)
        walk = plan_walk(mc.shape, plan.bounds, mc.sizes)
        peaks[name] = predict_saved_peak(build_schedule(name, 2, 4, v), walk)
    T = 64 * 1024 * 4
    assert peaks["1f1b"][0] == 6 * T
    assert peaks["zbv"][0] == 9 * T + 64 * 10 * 4  # + dz4, 10 wide
