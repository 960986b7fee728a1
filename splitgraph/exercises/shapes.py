"""Exercise 1: the gradient of a scalar function of an n x m matrix has shape n x m.

f: R^{n x m} -> R has one partial derivative df/dX_ij per entry, and the gradient collects them
in the entry's place. So the gradient has X's shape, and a gradient step `X - eta * grad` is
well-typed. Three closed forms show it, each checked against autograd:

    f(X) = a^T X b            grad = a b^T              (n x 1)(1 x m)
    f(X) = tr(A X), A m x n   grad = A^T
    f(X) = 1/2 ||X||_F^2      grad = X

and the model itself: every dJ/dW_i from the hand-derived backward pass (splitgraph.textbook)
has W_i's shape [out, in], while dJ/dx, the gradient with respect to the input minibatch, has
the minibatch's shape [B, d] (the shape of what a pipeline sends back across a cut).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from splitgraph.config import Workload
from splitgraph.exercises import first_batch, table
from splitgraph.model import build_mlp
from splitgraph.textbook import backprop, params_of


def matrix_gradient(f: Callable[[Tensor], Tensor], X: Tensor) -> Tensor:
    """The gradient of the scalar `f` at the matrix `X`, by autograd."""
    leaf = X.detach().clone().requires_grad_(True)
    value = f(leaf)
    if value.numel() != 1:
        raise ValueError(f"f must return a scalar; it returned shape {tuple(value.shape)}")
    (grad,) = torch.autograd.grad(value, leaf)
    return grad


@dataclass(frozen=True)
class Row:
    what: str
    variable_shape: tuple[int, ...]
    gradient_shape: tuple[int, ...]
    closed_form: str
    max_abs_diff: float | None  # autograd vs the closed form (None: no closed form checked)


@dataclass(frozen=True)
class ShapesResult:
    rows: list[Row]

    @property
    def all_match(self) -> bool:
        return all(r.variable_shape == r.gradient_shape for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"all_match": self.all_match, "rows": [asdict(r) for r in self.rows]}


def closed_forms(n: int, m: int, seed: int = 0) -> list[Row]:
    """The three scalar functions of an n x m matrix, autograd vs their closed-form gradient."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, m, generator=g, dtype=torch.float64)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    cases = [
        ("f(X) = a^T X b", lambda t: a @ t @ b, torch.outer(a, b), "a b^T"),
        ("f(X) = tr(A X)", lambda t: torch.trace(A @ t), A.T, "A^T"),
        ("f(X) = 1/2 ||X||_F^2", lambda t: 0.5 * t.pow(2).sum(), X, "X"),
    ]
    rows = []
    for what, f, want, form in cases:
        grad = matrix_gradient(f, X)
        diff = (grad - want).abs().max().item() if grad.shape == want.shape else float("inf")
        rows.append(Row(what, tuple(X.shape), tuple(grad.shape), form, diff))
    return rows


def run(cfg: Any, n: int = 3, m: int = 5) -> ShapesResult:
    rows = closed_forms(n, m)
    model = build_mlp(cfg, dtype=torch.float64)
    x, y = first_batch(cfg.data, Workload.of(cfg), cfg.train.seed, torch.float64)
    params = params_of(model)
    bp = backprop(
        params,
        x,
        y,
        cfg.optim.weight_decay,
        str(cfg.model.activation.value),
        str(cfg.model.task.value),
    )
    for name, p in params.items():
        form = "G_z^T h + lambda W" if name.endswith("weight") else "sum_i G_z (no lambda)"
        rows.append(Row(f"J, {name}", tuple(p.shape), tuple(bp.grads[name].shape), form, None))
    rows.append(
        Row("J, the input x", tuple(x.shape), tuple(bp.input_grads[0].shape), "G_z W", None)
    )
    return ShapesResult(rows)


def render(result: ShapesResult) -> str:
    head = ("scalar function of", "variable", "gradient", "closed form", "autograd - closed form")
    body = [
        (
            r.what,
            " x ".join(map(str, r.variable_shape)),
            " x ".join(map(str, r.gradient_shape)),
            r.closed_form,
            "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}",
        )
        for r in result.rows
    ]
    lines = [table(head, body)]
    verdict = "yes" if result.all_match else "NO"
    lines.append("")
    lines.append(f"every gradient has the shape of its variable: {verdict}")
    return "\n".join(lines)
