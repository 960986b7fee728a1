"""Every schedule x partition x p x m gives the gradients of plain single-device training.

The reference (tests/reference.py) is nn.Sequential + F.cross_entropy/F.mse_loss on the
full minibatch with autograd through J = L + s: nothing of splitgraph's runtime. float64
must agree to 1e-10 relative (in practice ~1e-16), float32 to 1e-5; after several
optimizer steps the weights must agree too. Each world size is one launch running all of
its cases; each case is its own test.
"""

from __future__ import annotations

import itertools
from functools import cache
from typing import Any

import pytest

from splitgraph.runtime.spawn import run_ranks
from tests.workers import grid_worker

MANUAL = {1: [], 2: [4], 3: [1, 3], 4: [1, 2, 5]}
ACTIVATIONS = ["relu", "tanh", "sigmoid", "gelu"]


def _cases(p: int) -> list[dict[str, Any]]:
    cases = []
    rotation = itertools.cycle(
        [(a, t) for t in ("classification", "regression") for a in ACTIVATIONS]
    )
    for sched, part, m, bias, wd in itertools.product(
        ("naive", "gpipe", "1f1b"),
        ("uniform", "params", "manual"),
        (1, 2, 3, 4, 8),
        (False, True),
        (0.0, 0.1),
    ):
        if sched == "naive" and m != 1:
            continue
        act, task = next(rotation)
        ov = [
            f"schedule.name={sched}",
            f"partition.strategy={part}",
            f"pipeline.microbatches={m}",
            f"model.bias={str(bias).lower()}",
            f"optim.weight_decay={wd}",
            f"model.activation={act}",
            f"model.task={task}",
            "runtime.dtype=float64",
        ]
        if part == "manual":
            ov.append(f"partition.boundaries={MANUAL[p]}")
        cid = f"p{p}-{sched}-{part}-m{m}-{'bias' if bias else 'nobias'}-wd{wd}-{act}-{task[:5]}"
        cases.append({"id": cid, "overrides": ov, "tol": 1e-10})
    for sched, m in itertools.product(("gpipe", "1f1b"), (1, 3, 8)):
        cases.append(
            {
                "id": f"p{p}-{sched}-uniform-m{m}-float32",
                "overrides": [
                    f"schedule.name={sched}",
                    f"pipeline.microbatches={m}",
                    "runtime.dtype=float32",
                    "model.bias=true",
                    "optim.weight_decay=0.1",
                ],
                "tol": 1e-5,
            }
        )
    for sched, opt in itertools.product(("naive", "gpipe", "1f1b"), ("sgd", "adam")):
        m = 1 if sched == "naive" else 3
        extra = ["optim.momentum=0.9", "optim.lr=0.1"] if opt == "sgd" else ["optim.lr=0.01"]
        cases.append(
            {
                "id": f"p{p}-{sched}-params-m{m}-{opt}-4steps",
                "overrides": [
                    f"schedule.name={sched}",
                    f"pipeline.microbatches={m}",
                    "partition.strategy=params",
                    f"optim.name={opt}",
                    *extra,
                    "runtime.dtype=float64",
                    "model.bias=true",
                    "optim.weight_decay=0.05",
                ],
                "tol": 1e-10,
                "steps": 4,
            }
        )
    return cases


ALL = [(p, c) for p in (1, 2, 3, 4) for c in _cases(p)]


@cache
def _results(p: int) -> dict[str, float]:
    per_rank = run_ranks(grid_worker, p, _cases(p), timeout=240)
    return {cid: max(r[cid] for r in per_rank) for cid in per_rank[0]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("p", "case"), ALL, ids=[c["id"] for _, c in ALL])
def test_matches_single_device(p: int, case: dict[str, Any]) -> None:
    err = _results(p)[case["id"]]
    assert err <= case["tol"], f"max relative error {err:.3g} > {case['tol']:g}"


def test_grid_covers_the_required_combinations() -> None:
    ids = {c["id"] for _, c in ALL}
    for p, sched, part, m in itertools.product(
        (1, 2, 3, 4), ("gpipe", "1f1b"), ("uniform", "params", "manual"), (1, 2, 3, 4, 8)
    ):
        assert any(i.startswith(f"p{p}-{sched}-{part}-m{m}-") for i in ids)
    assert sum(1 for i in ids if "regression" in i or "regre" in i) > 50
