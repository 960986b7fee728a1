"""Exercise 2: add a bias to the hidden and output layers; derive forward and backward.

The derivation is `EQUATIONS` (one example, column vectors; the batch-major form sums the bias
gradients over the samples of the minibatch). The graph gains a `+` node after each matrix
product, with the leaf b1 or b2 as its second input; the regulariser s keeps its edges from W1
and W2 only. `run` checks the hand-derived gradients (splitgraph.textbook.backprop) against
autograd on the configured model with `model.bias=true`, and shows what lambda does: it adds
exactly lambda*W to each dJ/dW and leaves every dJ/db bit-for-bit unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from splitgraph.config import Workload
from splitgraph.exercises import first_batch, table
from splitgraph.model import build_mlp, objective
from splitgraph.textbook import backprop, params_of

TOL = 1e-12

EQUATIONS = """\
forward   z = W1 x + b1   h = phi(z)   o = W2 h + b2   J = L(o, y) + lambda/2 (||W1||^2 + ||W2||^2)

backward  dJ/do  = dL/do                          dJ/db2 = dJ/do     (s has no b2: no lambda b2)
          dJ/dW2 = dJ/do h^T + lambda W2          dJ/dh  = W2^T dJ/do
          dJ/dz  = dJ/dh * phi'(z)                dJ/db1 = dJ/dz     (no lambda b1)
          dJ/dW1 = dJ/dz x^T + lambda W1

(any depth: the same two lines per layer; a minibatch sums dJ/db over its samples)"""


@dataclass(frozen=True)
class ParamCheck:
    name: str
    shape: tuple[int, ...]
    rel_err_vs_autograd: float  # max|hand - autograd| / max|autograd|
    decay_effect: float  # weights: max|dJ(l) - dJ(0) - l W| / max|l W|; biases: max|dJ(l) - dJ(0)|


@dataclass(frozen=True)
class BiasResult:
    weight_decay: float
    rows: list[ParamCheck]

    @property
    def hand_equals_autograd(self) -> bool:
        return all(r.rel_err_vs_autograd < TOL for r in self.rows)

    @property
    def biases_not_decayed(self) -> bool:
        return all(r.decay_effect == 0.0 for r in self.rows if r.name.endswith(".bias"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight_decay": self.weight_decay,
            "hand_equals_autograd": self.hand_equals_autograd,
            "biases_not_decayed": self.biases_not_decayed,
            "rows": [asdict(r) for r in self.rows],
        }


def run(cfg: Any) -> BiasResult:
    """The configured model with biases, float64, on minibatch 0."""
    if not cfg.model.bias:
        raise ValueError("exercise 2 is about biases: run it with model.bias=true")
    lam = cfg.optim.weight_decay
    if lam == 0.0:
        raise ValueError("exercise 2 shows what weight decay does: set optim.weight_decay > 0")
    act, task = str(cfg.model.activation.value), str(cfg.model.task.value)
    model = build_mlp(cfg, dtype=torch.float64)
    x, y = first_batch(cfg.data, Workload.of(cfg), cfg.train.seed, torch.float64)
    objective(model, x, y, cfg.model.task, lam)[1].backward()
    params = params_of(model)
    hand = backprop(params, x, y, lam, act, task).grads
    no_decay = backprop(params, x, y, 0.0, act, task).grads
    rows = []
    for name, p in model.named_parameters():
        assert p.grad is not None
        err = ((hand[name] - p.grad).abs().max() / p.grad.abs().max()).item()
        delta = hand[name] - no_decay[name]
        if name.endswith(".weight"):
            effect = (delta - lam * params[name]).abs().max() / (lam * params[name]).abs().max()
        else:
            effect = delta.abs().max()
        rows.append(ParamCheck(name, tuple(p.shape), err, effect.item()))
    return BiasResult(lam, rows)


def render(result: BiasResult) -> str:
    lam = result.weight_decay
    body = []
    for r in result.rows:
        kind = (
            f"dJ/dW(l) - dJ/dW(0) = {lam:g} W"
            if r.name.endswith("weight")
            else ("dJ/db(l) - dJ/db(0) = 0")
        )
        body.append(
            (
                r.name,
                " x ".join(map(str, r.shape)),
                f"{r.rel_err_vs_autograd:.1e}",
                kind,
                f"{r.decay_effect:.1e}",
            )
        )
    head = ("parameter", "shape", "hand vs autograd", "what lambda does", "deviation")
    lines = [EQUATIONS, "", table(head, body, right=(2, 4)), ""]
    lines.append(
        f"hand-derived = autograd (relative error < {TOL:g}): "
        f"{'yes' if result.hand_equals_autograd else 'NO'}"
    )
    lines.append(
        "the bias gets no weight decay (dJ/db identical with and without lambda): "
        f"{'yes' if result.biases_not_decayed else 'NO'}"
    )
    return "\n".join(lines)
