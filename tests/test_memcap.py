"""The memory cap (accounting on CPU, allocator on GPU), periodic evaluation and the time budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitgraph.compare import predict
from splitgraph.config import Workload, load_config
from splitgraph.cost import memory_model
from splitgraph.errors import ConfigError, OutOfMemory
from splitgraph.reliability import memcap
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.spawn import run_ranks
from splitgraph.train import run as train
from tests.cap_workers import read_summary, train_cases

SMALL = [
    "model.hidden=[32,32,32]",
    "data.features=16",
    "data.samples=640",
    "train.batch_size=64",
    "train.progress=false",
    "checkpoint.save=false",
]


ADAM_BIAS = ["optim=adam", "model.bias=true"]


@pytest.mark.parametrize(
    "over",
    [
        ["optim=sgd", "optim.momentum=0"],
        ["optim=sgd", "optim.momentum=0.9", "schedule.recompute=true"],
        [*ADAM_BIAS, "schedule=1f1b", "pipeline.microbatches=4"],
        [*ADAM_BIAS, "runtime.dtype=float64", "model.activation=gelu"],
    ],
)
def test_the_cost_models_bytes_are_the_caps_before_and_after_a_step(over: list[str]) -> None:
    """What the harness and the planner predict (ModelCosts.static_bytes, the memory model) is
    what the cap counts, every part, before the first step and measured after it."""
    cfg = load_config([*SMALL, "pipeline.stages=1", *over])
    want = predict.per_rank(Workload.of(cfg), 1)
    engine = PipelineEngine(Workload.of(cfg))
    assert predict.mismatches(want, [memcap.accounting(engine, None, measured=False)]) == []
    x = torch.randn(64, 16, dtype=engine.dtype)
    engine.step(x, torch.randint(0, 10, (64,)))
    after = memcap.accounting(engine, None, measured=True)
    assert predict.mismatches(want, [after]) == []
    assert after["grads"] == after["params"] and after["allreduce_buckets"] == 0
    if "optim=adam" in over:  # two moments and a float32 step count per parameter tensor
        assert after["optimizer"] == 2 * after["params"] + 4 * len(engine.parameters())


@pytest.mark.parametrize(
    "optim",
    [
        ["optim=sgd", "optim.momentum=0"],
        ["optim=sgd", "optim.momentum=0.9"],
        ["optim=adam"],
    ],
)
def test_predicted_optimizer_bytes_equal_what_torch_allocates(optim: list[str]) -> None:
    cfg = load_config([*SMALL, *optim, "runtime.dtype=float64"])
    engine = PipelineEngine(Workload.of(cfg))
    before = memcap.accounting(engine, None, measured=False)
    x = torch.randn(64, 16, dtype=torch.float64)
    engine.step(x, torch.randint(0, 10, (64,)))
    after = memcap.accounting(engine, None, measured=True)
    params = sum(p.numel() * 8 for p in engine.parameters())
    assert before["params"] == after["params"] == before["grads"] == params
    assert before["optimizer"] == after["optimizer"]
    assert after["saved_peak"] == engine.meter.peak > 0
    assert before["saved_peak"] == after["saved_peak"]  # the memory model's prediction is exact
    assert (before["saved_peak_source"], after["saved_peak_source"]) == ("predicted", "measured")
    assert after["total"] == 2 * params + after["optimizer"] + after["saved_peak"]


def test_check_names_the_rank_the_bytes_and_the_remedy() -> None:
    records = [
        {"rank": 0, "params": 10, "grads": 10, "optimizer": 10, "saved_peak": 70, "total": 100},
        {"rank": 1, "params": 40, "grads": 40, "optimizer": 40, "saved_peak": 0, "total": 120},
    ]
    memcap.check(records, 120, "after the first step")  # at the cap is within it
    memcap.check(records, None, "after the first step")  # no cap, no check
    with pytest.raises(OutOfMemory) as info:
        memcap.check(records, 110, "after the first step")
    e = info.value
    assert e.needed == 120 and e.rank == 1 and e.cap == 110
    assert "rank 1 needs 120 bytes" in str(e) and "memory_cap is 110 bytes" in str(e)
    assert "alone exceed it" in str(e)  # parameters etc. alone: more stages, not microbatches
    with pytest.raises(OutOfMemory, match="saved activations push it over"):
        memcap.check(records[:1], 90, "after the first step")


def test_gpu_cap_fraction_and_oom_translation_without_a_gpu(tmp_path: Path) -> None:
    assert memcap.cuda_fraction(2**30, 4 * 2**30) == 0.25
    with pytest.raises(ConfigError, match="exceeds this GPU"):
        memcap.cuda_fraction(5 * 2**30, 4 * 2**30)
    memcap.apply_cuda_cap(2**30, torch.device("cpu"))  # a no-op off CUDA
    # The allocator's message, as torch.cuda.OutOfMemoryError carries it.
    exc = RuntimeError(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 3.00 MiB is free."
    )
    err = memcap.from_cuda_oom(exc, allocated=100 * 2**20, cap=110 * 2**20, rank=1, step=3)
    assert err.needed == 120 * 2**20 and err.rank == 1 and err.phase == "at step 3"
    assert "needs at least 125,829,120 bytes" in str(err)
    path = memcap.write_oom(tmp_path, err)
    rec = json.loads(path.read_text())
    assert path.name == "oom_rank1.json" and rec["status"] == "oom"
    assert rec["needed_bytes"] == 120 * 2**20


@pytest.mark.timeout(60)
def test_single_process_stops_before_or_after_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parameters + gradients + momentum of this model: 3 * 2880 floats * 4 bytes = 34,560 B;
    # its activations push it past 40,000 B.
    def stop(name: str, cap: int, phase: str) -> dict:
        cfg = load_config([*SMALL, f"pipeline.memory_cap={cap}", f"run_dir={tmp_path / name}"])
        with pytest.raises(OutOfMemory, match=phase):
            train.run(cfg)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["status"] == "oom" and summary["cap_bytes"] == cap
        assert summary["needed_bytes"] > cap
        (rec,) = summary["accounted_per_rank"]
        assert rec["params"] + rec["grads"] + rec["optimizer"] == 34_560
        assert summary["needed_bytes"] == rec["total"]
        return rec

    # priced from the plan (reliability/preflight.py): stopped before any parameter exists ...
    static = stop("static", 30_000, "before any parameter is allocated")
    assert static["saved_peak"] > 0 and static["saved_peak_source"] == "predicted"
    # ... activations predicted by the memory model: stopped before any is allocated ...
    predicted = stop("predicted", 40_000, r"before any parameter is allocated.*\(predicted\)")
    # ... and, where no prediction is available (bf16 autocast), measured by the first step
    monkeypatch.setattr(memory_model, "predictable", lambda cfg: False)
    monkeypatch.setattr(memcap, "predicted_saved_peak", lambda engine: None)
    measured = stop("measured", 40_000, r"after the first step.*\(measured\)")
    assert measured["saved_peak"] == predicted["saved_peak"]  # the prediction is exact


@pytest.mark.timeout(60)
def test_evaluation_and_time_budget_in_one_process(tmp_path: Path) -> None:
    over = [*SMALL, "train.steps=100000", "train.eval_every=3", "train.time_budget=0.5"]
    cfg = load_config([*over, f"run_dir={tmp_path}"])
    summary = train.run(cfg)
    assert summary is not None and summary["stopped_by"] == "time_budget"
    steps = summary["steps"]
    assert 0 < steps < 100000 and summary["train_time_s"] >= 0.5
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == steps and lines[-1]["samples"] == steps * 64
    evals = [r["step"] for r in lines if "test_loss" in r]
    # every 3rd step, and the step where the budget ran out
    assert evals == sorted({*range(2, steps, 3), steps - 1})
    assert all(0 <= r["test_accuracy"] <= 1 for r in lines if "test_loss" in r)
    assert summary["final"]["train"]["accuracy"] >= 0 and summary["final"]["test"]["loss"] > 0


@pytest.mark.timeout(120)
def test_all_ranks_stop_together_on_the_budget_and_on_one_ranks_oom(tmp_path: Path) -> None:
    root = str(tmp_path)
    pipe = [*SMALL, "schedule=1f1b", "pipeline.microbatches=4"]
    cases = [
        {
            "id": "budget",
            "overrides": [
                *pipe,
                "train.steps=100000",
                "train.eval_every=5",
                "train.time_budget=0.5",
            ],
        },
        # Stage 1 holds layers 1-3 (2,368 of the 2,880 weights): only rank 1 is over the cap.
        {
            "id": "oom",
            "overrides": [
                *pipe,
                "train.steps=5",
                "partition=manual",
                "partition.boundaries=[1]",
                "pipeline.memory_cap=20000",
            ],
        },
        # Data parallel (2 replicas of a 1-stage pipeline): each replica holds every weight.
        {
            "id": "dp_oom",
            "overrides": [*SMALL, "parallel.dp=2", "train.steps=5", "pipeline.memory_cap=20000"],
        },
        # ... and its gradients a second time, flattened into the all-reduce buckets (Adam)
        {"id": "dp", "overrides": [*SMALL, "parallel.dp=2", "train.steps=2", *ADAM_BIAS]},
    ]
    results = run_ranks(train_cases, 2, cases, root, timeout=90)
    assert [r["budget"] for r in results] == ["ok", "ok"]
    summary = read_summary(root, "budget")
    steps = summary["steps"]
    assert summary["stopped_by"] == "time_budget" and 0 < steps < 100000
    comm = summary["comm_per_rank"]
    # 4 microbatches: 4 activations forward from rank 0, 4 gradients back from rank 1, per step
    assert [c["messages_sent"] for c in comm] == [4 * steps, 4 * steps]
    assert comm[0]["bytes_sent_per_step"] == 64 * 32 * 4 == comm[1]["bytes_sent_per_step"]
    accounted = [m["accounted"] for m in summary["memory_per_rank"]]
    assert [a["rank"] for a in accounted] == [0, 1] and all(a["saved_peak"] for a in accounted)

    # Both ranks raise the same error, naming rank 1, before the first step.
    oom = [r["oom"] for r in results]
    assert oom[0] == oom[1] and oom[0]["rank"] == 1
    assert "before the first step" in oom[0]["message"]
    written = read_summary(root, "oom")
    assert written["status"] == "oom" and len(written["accounted_per_rank"]) == 2
    rec = written["accounted_per_rank"][1]  # weights, gradients, momentum + predicted activations
    assert rec["saved_peak_source"] == "predicted" and rec["saved_peak"] > 0
    assert oom[0]["needed"] == rec["total"] == 3 * 2368 * 4 + rec["saved_peak"]

    # With dp, the accounting covers every rank of every replica, each named by its global rank.
    dp = [r["dp_oom"] for r in results]
    assert dp[0] == dp[1] and dp[0]["rank"] in (0, 1)
    records = read_summary(root, "dp_oom")["accounted_per_rank"]
    assert [a["rank"] for a in records] == [0, 1]
    assert all(a["params"] == 2880 * 4 for a in records)

    # The harness's prediction (cost model + memory model) is what the runtime accounts, part
    # by part and rank by rank: measured after the first step (the budget and dp runs), or
    # the runtime's own check before it (the OOM runs).
    assert results[0]["dp"] == "ok"
    dp_run = [m["accounted"] for m in read_summary(root, "dp")["memory_per_rank"]]
    assert all(a["allreduce_buckets"] == a["grads"] == a["params"] > 0 for a in dp_run)
    for case in cases:
        summary = read_summary(root, case["id"])
        got = summary.get("accounted_per_rank") or [
            m["accounted"] for m in summary["memory_per_rank"]
        ]
        want = predict.per_rank(Workload.of(load_config(case["overrides"])), 2)
        assert predict.mismatches(want, got) == [], case["id"]
