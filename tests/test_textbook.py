"""The hand-derived backward pass (splitgraph/textbook.py) against autograd and the pipeline.

1. Against autograd: the chapter's five equations and the any-depth walk give the gradients of
   `splitgraph.model.objective` and of the plain nn.Sequential reference (tests/reference.py)
   in float64, to 1e-12 relative, for every activation, both tasks, with and without biases.
2. Against the pipeline: two ranks, the graph cut between a hidden layer and the next
   (`partition=manual`). The gradient stage 1 sends back to stage 0 for microbatch k is exactly
   the rows of the hand-derived dJ/dh of the full minibatch that belong to microbatch k (L is the
   mean over the whole minibatch, so nothing is rescaled), and both ranks' weight (and bias)
   gradients are the hand formulas. One launch runs every case.
"""

from __future__ import annotations

import itertools
from functools import cache
from typing import Any

import pytest
import torch

from splitgraph.config import load_config
from splitgraph.model import build_mlp, loss_sum, objective
from splitgraph.spawn import run_ranks
from splitgraph.textbook import (
    backprop,
    loss_and_grad,
    one_hidden_layer,
    params_of,
    phi,
    phi_prime,
)
from tests.reference import max_rel_err, reference_grads
from tests.textbook_workers import cut_gradients_worker
from tests.workers import _batch, make_cfg

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")
TASKS = ("classification", "regression")
TOL = 1e-12
TORCH_PHI = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
}

BASE = [
    "data.features=6",
    "data.outputs=3",
    "data.samples=96",
    "data.test_fraction=0",
    "train.batch_size=12",
    "runtime.dtype=float64",
    "optim.weight_decay=0.1",
]


@cache
def _base() -> Any:
    return load_config(BASE)


def _cfg(extra: list[str]) -> Any:
    """BASE plus dotlist overrides (Hydra composes once; merging is cheap)."""
    return make_cfg(_base(), extra)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# -- the pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_phi_and_phi_prime_match_torch(act: str) -> None:
    z = torch.linspace(-6, 6, 2001, dtype=torch.float64).requires_grad_(True)
    h = TORCH_PHI[act](z)
    (d,) = torch.autograd.grad(h.sum(), z)
    assert _rel(phi(act, z.detach()), h.detach()) < TOL
    assert _rel(phi_prime(act, z.detach()), d) < TOL


@pytest.mark.parametrize("task", TASKS)
def test_loss_gradient_is_softmax_minus_onehot_or_scaled_residual(task: str) -> None:
    o = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    if task == "classification":
        y = torch.randint(0, 4, (7,))
        want = torch.nn.functional.cross_entropy(o, y)
    else:
        y = torch.randn(7, 4, dtype=torch.float64)
        want = torch.nn.functional.mse_loss(o, y)  # mean over samples and outputs
    L, g = loss_and_grad(o.detach(), y, task)
    (d,) = torch.autograd.grad(want, o)
    assert abs(L.item() - want.item()) < TOL
    assert _rel(g, d) < TOL


# -- against autograd -----------------------------------------------------------------------


@pytest.mark.parametrize(("act", "task"), list(itertools.product(ACTIVATIONS, TASKS)))
def test_the_chapters_five_equations_are_autograds_gradients(act: str, task: str) -> None:
    cfg = _cfg(["model.hidden=[7]", f"model.activation={act}", f"model.task={task}"])
    model = build_mlp(cfg, dtype=torch.float64)
    x, y = _batch(cfg, torch.float64)
    W1, W2 = (model.layers[i].weight for i in ("0", "1"))
    # the chapter's graph with autograd, keeping the intermediate variables' gradients
    z = x @ W1.T
    h = TORCH_PHI[act](z)
    o = h @ W2.T
    for v in (z, h, o):
        v.retain_grad()
    J = loss_sum(o, y, cfg.model.task) / x.shape[0] + 0.05 * (W1.pow(2).sum() + W2.pow(2).sum())
    J.backward()
    tb = one_hidden_layer(W1.detach(), W2.detach(), x, y, 0.1, act, task)
    assert abs(tb.J.item() - J.item()) < TOL
    assert abs(tb.J.item() - objective(model, x, y, cfg.model.task, 0.1)[1].item()) < TOL
    assert _rel(tb.dJ_do, o.grad) < TOL
    assert _rel(tb.dJ_dh, h.grad) < TOL
    assert _rel(tb.dJ_dz, z.grad) < TOL
    assert _rel(tb.dJ_dW2, W2.grad) < TOL
    assert _rel(tb.dJ_dW1, W1.grad) < TOL
    # and the any-depth walk says the same for depth 2
    bp = backprop(params_of(model), x, y, 0.1, act, task)
    assert _rel(bp.grads["layers.0.weight"], tb.dJ_dW1) < TOL
    assert _rel(bp.input_grads[1], tb.dJ_dh) < TOL


DEPTHS = {1: "[]", 2: "[7]", 3: "[5,9]", 5: "[5,9,4,8]"}


@pytest.mark.parametrize(
    ("depth", "act", "task", "bias"),
    [
        (d, a, t, b)
        for d, (a, t), b in itertools.product(
            DEPTHS, itertools.product(ACTIVATIONS, TASKS), (False, True)
        )
    ],
)
def test_any_depth_with_biases_matches_both_references(
    depth: int, act: str, task: str, bias: bool
) -> None:
    cfg = _cfg(
        [
            f"model.hidden={DEPTHS[depth]}",
            f"model.activation={act}",
            f"model.task={task}",
            f"model.bias={str(bias).lower()}",
        ]
    )
    model = build_mlp(cfg, dtype=torch.float64)
    x, y = _batch(cfg, torch.float64)
    bp = backprop(params_of(model), x, y, 0.1, act, task)
    assert max_rel_err(bp.grads, reference_grads(cfg, x, y, torch.float64)) < TOL
    x_leaf = x.clone().requires_grad_(True)
    _, J = objective(model, x_leaf, y, cfg.model.task, 0.1)
    J.backward()
    assert abs(bp.J.item() - J.item()) < TOL
    assert _rel(bp.input_grads[0], x_leaf.grad) < TOL
    assert max_rel_err(bp.grads, {k: p.grad for k, p in model.named_parameters()}) < TOL
    assert set(bp.grads) == {k for k, _ in model.named_parameters()}


def test_the_bias_is_not_weight_decayed() -> None:
    """Exercise 2: lambda adds exactly lambda*W to dJ/dW and nothing to dJ/db."""
    cfg = _cfg(["model.hidden=[5,9]", "model.bias=true", "model.activation=tanh"])
    model = build_mlp(cfg, dtype=torch.float64)
    params = params_of(model)
    x, y = _batch(cfg, torch.float64)
    with_decay = backprop(params, x, y, 0.3, "tanh").grads
    without = backprop(params, x, y, 0.0, "tanh").grads
    for k, g in with_decay.items():
        if k.endswith(".bias"):
            assert torch.equal(g, without[k]), k
        else:
            assert _rel(g - without[k], 0.3 * params[k]) < TOL, k


# -- against the pipeline -------------------------------------------------------------------


def _pipeline_cases() -> list[dict[str, Any]]:
    cases = []
    scheds = [("naive", 1), ("gpipe", 1), ("gpipe", 3), ("gpipe", 5), ("1f1b", 3), ("1f1b", 5)]
    for (act, task), bias, (sched, m) in itertools.product(
        itertools.product(ACTIVATIONS, TASKS), (False, True), scheds
    ):
        cases.append(
            {
                "id": f"H7-cut1-{sched}-m{m}-{act}-{task[:5]}-{'bias' if bias else 'nobias'}",
                "boundary": 1,
                "overrides": [
                    "model.hidden=[7]",
                    "partition.strategy=manual",
                    "partition.boundaries=[1]",
                    f"schedule.name={sched}",
                    f"pipeline.microbatches={m}",
                    f"model.activation={act}",
                    f"model.task={task}",
                    f"model.bias={str(bias).lower()}",
                ],
            }
        )
    # any depth: a 4-layer model cut before each of its layers 1, 2, 3
    for cut, (sched, m), bias in itertools.product((1, 2, 3), (("gpipe", 4), ("1f1b", 5)), (0, 1)):
        cases.append(
            {
                "id": f"deep-cut{cut}-{sched}-m{m}-gelu-{'bias' if bias else 'nobias'}",
                "boundary": cut,
                "overrides": [
                    "model.hidden=[5,9,4]",
                    "partition.strategy=manual",
                    f"partition.boundaries=[{cut}]",
                    f"schedule.name={sched}",
                    f"pipeline.microbatches={m}",
                    "model.activation=gelu",
                    f"model.bias={'true' if bias else 'false'}",
                ],
            }
        )
    return cases


CASES = _pipeline_cases()


@cache
def _pipeline_results() -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = run_ranks(cut_gradients_worker, 2, BASE, CASES, timeout=240)
    return r0, r1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_the_gradient_crossing_the_cut_is_dJ_dh(case: dict[str, Any]) -> None:
    r0, r1 = (r[case["id"]] for r in _pipeline_results())
    cfg = _cfg(case["overrides"])
    model = build_mlp(cfg, dtype=torch.float64)
    x, y = _batch(cfg, torch.float64)
    bp = backprop(
        params_of(model), x, y, 0.1, str(cfg.model.activation.value), str(cfg.model.task.value)
    )
    dJ_dh = bp.input_grads[case["boundary"]]  # [B, width of the cut]
    sizes = r1["sizes"]
    assert r0["sent"] == {}, "stage 0 has nothing to send back"
    assert sorted(r1["sent"]) == [(0, k) for k in range(len(sizes))]
    rows = 0
    for k, size in enumerate(sizes):
        piece = r1["sent"][(0, k)]
        assert piece.shape == (size, dJ_dh.shape[1])
        assert _rel(piece, dJ_dh[rows : rows + size]) < TOL, f"microbatch {k}"
        rows += size
    assert rows == x.shape[0]
    for grads in (r0["grads"], r1["grads"]):
        assert grads, "every rank holds some layers"
        assert max_rel_err(grads, bp.grads) < TOL
    assert set(r0["grads"]) | set(r1["grads"]) == set(bp.grads)
