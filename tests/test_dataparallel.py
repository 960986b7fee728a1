"""Data x pipeline parallelism: the layout, the sharding, the all-reduce, and the proof that
a 2D step equals single-device full-batch training.

The gloo grid is one launch of 4 ranks running every case (dp=2 x pp=2 with every schedule
and two partitions, dp=4 x pp=1, dp=1 x pp=4); each case is its own test.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from splitgraph.config import load_config, num_stages, validate
from splitgraph.data import replica_rows
from splitgraph.runtime.executor import _compile, _last_weight_grad
from splitgraph.runtime.gradsync import buckets
from splitgraph.runtime.mesh import Layout
from splitgraph.schedule import Costs, build_schedule, simulate
from splitgraph.schedule.allreduce import (
    Link,
    allreduce_time,
    stage_allreduce_times,
    with_allreduce,
)
from splitgraph.spawn import run_ranks
from tests.dp_workers import dp_grid_worker
from tests.reference import worst
from tests.test_config import problems
from tests.test_e2e import SMALL, launch_script, torchrun

# -- layout, sharding, buckets ---------------------------------------------------------------


def test_layout_is_devicemesh_row_major() -> None:
    lay = Layout(dp=2, pp=3)
    assert [lay.coords(r) for r in range(6)] == [(d, p) for d in range(2) for p in range(3)]
    assert all(lay.rank_at(*lay.coords(r)) == r for r in range(6))
    assert lay.pipeline(1) == (3, 4, 5)
    with pytest.raises(ValueError, match="rank 6 is outside"):
        lay.coords(6)
    text = Layout(dp=2, pp=4).describe(ranks_per_node=6)
    assert "replica 0: ranks [0, 1, 2, 3] on node 0\n" in text + "\n"
    assert "replica 1: ranks [4, 5, 6, 7] on nodes [0, 1] (its activations cross" in text


def test_replicas_cover_the_minibatch_once_in_order() -> None:
    idx = torch.randperm(12)
    parts = [replica_rows(idx, d, 3) for d in range(3)]
    assert torch.equal(torch.cat(parts), idx) and all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match=r"divisible by parallel\.dp"):
        replica_rows(idx, 0, 5)


def test_buckets_respect_the_cap_and_keep_order() -> None:
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (4, 4, 20, 1, 1)]
    got = buckets(params, bucket_bytes=64)  # 8 doubles per bucket
    assert [[p.numel() for p in b] for b in got] == [[4, 4], [20], [1, 1]]
    assert [p for b in got for p in b] == params


def test_grads_are_final_after_each_stages_last_b_or_w() -> None:
    for name, v, last_op in (("1f1b", 1, "B"), ("zb1", 1, "W"), ("interleaved", 2, "B")):
        sched = build_schedule(name, 2, 4, v)
        for rank in range(2):
            program = _compile(sched.actions[rank])
            final = _last_weight_grad(program)
            assert sorted(final.values()) == [s for s in range(2 * v) if s % 2 == rank]
            for index, stage in final.items():
                a = program[index]
                assert not isinstance(a, tuple) and a.stage == stage and a.op.value == last_op
                later = [b for b in program[index + 1 :] if not isinstance(b, tuple)]
                assert not any(b.stage == stage and b.op.value in "BW" for b in later)


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "world", "needles"),
    [
        (["parallel.dp=3"], 4, ["parallel.dp=3 does not divide the world size 4", "[1, 2, 4]"]),
        (
            ["parallel.dp=2", "pipeline.stages=4"],
            4,
            ["pipeline.stages=4 x parallel.dp=2 = 8 ranks", "world size is 4", "stages=2"],
        ),
        (["parallel.dp=0"], 4, ["parallel.dp=0 must be >= 1"]),
        (["parallel.dp=4", "train.batch_size=254"], 4, ["not divisible by parallel.dp=4"]),
        (
            ["parallel.dp=4", "pipeline.microbatches=65"],
            4,
            ["pipeline.microbatches=65", "256/4 = 64"],
        ),
        (["parallel.dp=2"], 1, ["parallel.dp=2 does not divide the world size 1"]),
        (["parallel.bucket_mb=0"], 1, ["parallel.bucket_mb=0"]),
    ],
)
def test_validate_names_the_numbers(overrides: list[str], world: int, needles: list[str]) -> None:
    text = problems(overrides, world)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"


def test_stages_default_to_world_over_dp() -> None:
    cfg = load_config(["parallel.dp=2"])
    validate(cfg, 4)
    assert num_stages(cfg.pipeline, cfg.parallel, 4) == 2
    validate(load_config(["parallel.dp=2", "pipeline.stages=2"]), 4)
    validate(load_config(["parallel.dp=4"]), 4)  # pure data parallel: one stage


def test_check_command_prints_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    from splitgraph.train.cli import check_main

    assert check_main(["--nproc", "4", "parallel.dp=2", "schedule=interleaved"]) == 0
    out = capsys.readouterr().out
    assert "replica 1: ranks [2, 3]" in out and "128 rows" in out and "4 layers on 4 stages" in out


# -- the all-reduce in the prediction -----------------------------------------------------


def test_ring_allreduce_time() -> None:
    assert allreduce_time(1e9, 1, 1e9, 1e-5) == 0.0
    assert allreduce_time(1e9, 2, 1e9) == pytest.approx(1.0)  # 2(dp-1)/dp = 1
    assert allreduce_time(1e9, 4, 1e9, 1e-5) == pytest.approx(1.5 + 6e-5)
    link = Link("test", 1e9, 1e-5)
    one, three = stage_allreduce_times([5e7, 2e8], 4, link, bucket_bytes=7e7)
    assert one == pytest.approx(allreduce_time(5e7, 4, 1e9, 1e-5))  # one bucket
    assert three - allreduce_time(2e8, 4, 1e9) == pytest.approx(3 * 6e-5)  # 3 buckets
    with pytest.raises(ValueError, match="bandwidth > 0"):
        allreduce_time(1.0, 2, 0.0)


def test_overlap_hides_the_all_reduce_of_earlier_finishing_stages() -> None:
    sched = build_schedule("interleaved", 2, 4, 2)
    sim = simulate(sched, Costs.uniform(sched.num_stages, 1, 2))
    over = with_allreduce(sim, sched, [3.0] * 4, overlap=True)
    after = with_allreduce(sim, sched, [3.0] * 4, overlap=False)
    # rank 0's stage 2 finishes at 23 and its all-reduce is hidden behind stage 0's backward;
    # stage 0 (last at 27) then pays 3. Without overlap rank 0 queues both after 27.
    assert sim.step_time == 27 and over.step_time == 30 and after.step_time == 33
    assert over.windows[2] == (23, 26) and after.windows[2] == (30, 33)
    one = build_schedule("1f1b", 2, 4)
    sim1 = simulate(one, Costs.uniform(2, 1, 2))
    assert with_allreduce(sim1, one, [3.0, 3.0]).exposed == 3.0  # stage 0 ends the step


def test_schedule_command_adds_the_all_reduce(capsys: pytest.CaptureFixture[str]) -> None:
    from splitgraph.schedule.cli import main

    args = ["schedule=interleaved", "schedule.virtual_stages=2", "pipeline.stages=2"]
    assert main([*args, "--dp", "4", "--allreduce", "3", "--no-picture"]) == 0
    assert "with all-reduce  30 units (3 exposed, overlapped)" in capsys.readouterr().out
    assert main([*args, "--dp", "4", "--dp-bandwidth", "40", "--no-picture"]) == 2
    assert "--from-run" in capsys.readouterr().err


# -- equivalence on 4 gloo ranks ------------------------------------------------------------

ROTATION = [(a, t) for t in ("classification", "regression") for a in ("relu", "tanh", "gelu")]
SCHEDULES = [
    ("naive", 1, 1),
    ("gpipe", 1, 4),
    ("1f1b", 1, 4),
    ("zb1", 1, 4),
    ("interleaved", 2, 4),
    ("loopedbfs", 2, 4),
]


def _ov(sched: str, v: int, m: int, *extra: str) -> list[str]:
    return [
        f"schedule.name={sched}",
        f"schedule.virtual_stages={v}",
        f"pipeline.microbatches={m}",
        "runtime.dtype=float64",
        "optim.weight_decay=0.1",
        *extra,
    ]


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    rot = itertools.cycle(ROTATION)
    for (sched, v, m), part in itertools.product(SCHEDULES, ("uniform", "params")):
        act, task = next(rot)
        bias = part == "params"
        extra = [f"partition.strategy={part}", f"model.activation={act}", f"model.task={task}"]
        cases.append(
            {
                "id": f"dp2pp2-{sched}{v if v > 1 else ''}-{part}-m{m}-{act}-{task[:5]}",
                "layout": (2, 2),
                "overrides": _ov(sched, v, m, *extra, f"model.bias={str(bias).lower()}"),
            }
        )
    variants = {
        "nooverlap": ["parallel.overlap=false"],
        "tinybuckets": ["parallel.bucket_mb=0.0001", "model.bias=true"],
        "recompute": ["schedule.recompute=true", "model.bias=true"],
    }
    for (sched, v, m), (name, extra) in itertools.product(
        [("1f1b", 1, 4), ("zb1", 1, 3), ("interleaved", 2, 2)], variants.items()
    ):
        cases.append(
            {
                "id": f"dp2pp2-{sched}{v if v > 1 else ''}-m{m}-{name}",
                "layout": (2, 2),
                "overrides": _ov(sched, v, m, *extra),
            }
        )
    for sched, v, m in [("1f1b", 1, 4), ("zb1", 1, 4), ("interleaved", 2, 4)]:
        cases.append(  # the NCCL path's channel groups, created for both replicas, on gloo
            {
                "id": f"dp2pp2-{sched}{v if v > 1 else ''}-m{m}-channelgroups",
                "layout": (2, 2),
                "channels": True,
                "overrides": _ov(sched, v, m, "model.bias=true"),
            }
        )
    for sched, v, m in [("gpipe", 1, 3), ("1f1b", 1, 1), ("zb1", 1, 3)]:
        for overlap in ("true", "false"):
            cases.append(
                {
                    "id": f"dp4pp1-{sched}-m{m}-overlap{overlap}",
                    "layout": (4, 1),
                    "overrides": _ov(sched, v, m, f"parallel.overlap={overlap}"),
                }
            )
    for sched, v, m in [("1f1b", 1, 4), ("zb1", 1, 4), ("interleaved", 2, 4)]:
        cases.append(
            {
                "id": f"dp1pp4-{sched}{v if v > 1 else ''}-m{m}",
                "layout": (1, 4),
                "overrides": _ov(sched, v, m, "model.bias=true"),
            }
        )
    cases.append(
        {
            "id": "dp2pp2-1f1b-m4-float32",
            "layout": (2, 2),
            "overrides": _ov("1f1b", 1, 4, "model.bias=true")[:3]
            + ["runtime.dtype=float32", "optim.weight_decay=0.1"],
            "tol": 1e-5,
        }
    )
    for layout, sched, v, opt in [
        ((2, 2), "zb1", 1, "sgd"),
        ((2, 2), "interleaved", 2, "adam"),
        ((4, 1), "1f1b", 1, "adam"),
        ((4, 1), "gpipe", 1, "sgd"),
    ]:
        extra = ["optim.momentum=0.9", "optim.lr=0.1"] if opt == "sgd" else ["optim.lr=0.01"]
        dp, pp = layout
        m = 2 if dp == 2 else 3
        cases.append(
            {
                "id": f"dp{dp}pp{pp}-{sched}{v if v > 1 else ''}-m{m}-{opt}-4steps",
                "layout": layout,
                "steps": 4,
                "overrides": _ov(
                    sched,
                    v,
                    m,
                    f"optim.name={opt}",
                    *extra,
                    "model.bias=true",
                    "partition.strategy=params",
                ),
            }
        )
    return cases


CASES = _cases()
_LAUNCH: list[Any] = []


def _results() -> list[dict[str, Any]]:
    """One launch of 4 ranks for every case; a failed launch is remembered, not repeated."""
    if not _LAUNCH:
        try:
            _LAUNCH.append(run_ranks(dp_grid_worker, 4, CASES, timeout=240))
        except Exception as e:
            _LAUNCH.append(e)
    if isinstance(_LAUNCH[0], Exception):
        raise _LAUNCH[0]
    return _LAUNCH[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_2d_step_matches_single_device(case: dict[str, Any]) -> None:
    per_rank = [r[case["id"]] for r in _results()]
    tol = case.get("tol", 1e-10)
    err = worst(r["err"] for r in per_rank)  # inf if any is NaN
    assert err <= tol, f"max relative error {err:.3g} > {tol:g}"
    if case.get("steps"):
        assert min(r["moved"] for r in per_rank) > 1e-4  # the weights did change
    else:  # each rank's share of L and s sums to the single-device J over all 4 ranks
        total = sum(r["J_share"] for r in per_rank)
        assert total == pytest.approx(per_rank[0]["J_ref"], rel=max(tol, 1e-12))


def test_the_grid_covers_every_schedule_in_2x2_and_both_degenerate_layouts() -> None:
    ids = [c["id"] for c in CASES]
    for sched in ("naive", "gpipe", "1f1b", "zb1", "interleaved2", "loopedbfs2"):
        for part in ("uniform", "params"):
            assert any(i.startswith(f"dp2pp2-{sched}-{part}-") for i in ids)
    assert any(i.startswith("dp4pp1-") for i in ids) and any(i.startswith("dp1pp4-") for i in ids)


# -- the real command line ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_dp2_pp2_matches_single_process_training(
    tmp_path: Path, one_process_small: Path
) -> None:
    over = [*SMALL, "schedule=zb1", "pipeline.microbatches=2", "partition=params"]
    run = tmp_path / "dp"
    res = torchrun(4, *over, "parallel.dp=2", f"run_dir={run}", timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "layout: dp=2 x pp=2 = 4 ranks" in res.stdout + res.stderr

    summary = json.loads((run / "summary.json").read_text())
    assert summary["parallel"]["replicas"] == [[0, 1], [2, 3]]
    assert summary["parallel"]["rows_per_replica"] == 32
    assert [m["replica"] for m in summary["memory_per_rank"]] == [0, 0, 1, 1]
    assert all(m["allreduce_wait_median_s"] >= 0 for m in summary["memory_per_rank"])
    trace = json.loads((run / "trace.json").read_text())  # replica 0's pipeline
    assert {e["pid"] for e in trace["traceEvents"] if e.get("cat") == "F"} == {0, 1}

    # the loss each step, and the consolidated weights, equal one process on the full batch
    one = one_process_small  # conftest
    mine = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(mine, ref, strict=True):
        assert a["J"] == pytest.approx(b["J"], rel=1e-12) and a["L"] == pytest.approx(b["L"])
    state = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(one / "model.pt", weights_only=True)
    assert state.keys() == want.keys()
    for k in want:
        err = (state[k] - want[k]).abs().max() / want[k].abs().max()
        assert err < 1e-10, (k, float(err))


@pytest.mark.timeout(60)
def test_train2d_script_checks_the_layout_before_spawning(tmp_path: Path) -> None:
    res = launch_script(tmp_path / "run", "train2d.sh", "2", "2", "train.batch_size=255")
    assert res.returncode == 2
    assert "train.batch_size=255 is not divisible by parallel.dp=2" in res.stderr
    assert not (tmp_path / "run").exists()
