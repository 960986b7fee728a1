"""Exercise 4: second derivatives. Hessian-vector products of J for the MLP, on one device.

The Hessian of J has (number of parameters)^2 entries, too many to build; its product with a
vector v is cheap by *double backward*: backpropagate once with `create_graph=True`, so the
gradient g(theta) is itself a differentiable graph, then backpropagate the scalar g . v:

    H v = d/dtheta (g(theta) . v)          (Pearlmutter's trick; torch.autograd.grad twice)

Checks: H v equals the central difference of the gradient,
(g(theta + eps v) - g(theta - eps v)) / (2 eps), to O(eps^2) plus rounding/eps (float64), and
u . H v = v . H u (the Hessian is symmetric). Costs, measured in the same process:

* time: median over `repeats` of a plain gradient (forward + backward) and of an HVP
  (forward + create_graph backward + the second backward), interleaved so drift hits both;
* memory: the peak bytes autograd saves (SavedTensorMeter) for the gradient (the forward's
  saved activations) and for the HVP (those plus what the create_graph backward saves for the
  second backward).

All in float64 on the CPU, whatever `runtime.dtype` says: finite differences need the
precision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from splitgraph.config import ModelConfig, OptimConfig, Task, Workload
from splitgraph.exercises import first_batch
from splitgraph.model import StageModule, build_mlp, objective
from splitgraph.observe.memory import SavedTensorMeter


@dataclass(frozen=True)
class Objective:
    """What J = L + s needs beyond the model: the loss (model.task) and lambda."""

    task: Task
    weight_decay: float

    @staticmethod
    def of(model: ModelConfig, optim: OptimConfig) -> Objective:
        return Objective(model.task, optim.weight_decay)


def _J(model: StageModule, x: Tensor, y: Tensor, obj: Objective) -> Tensor:
    return objective(model, x, y, obj.task, obj.weight_decay)[1]


def gradient(model: StageModule, x: Tensor, y: Tensor, obj: Objective) -> list[Tensor]:
    params = list(model.parameters())
    return list(torch.autograd.grad(_J(model, x, y, obj), params))


def hvp(
    model: StageModule, x: Tensor, y: Tensor, obj: Objective, v: Sequence[Tensor]
) -> list[Tensor]:
    """H v by double backward: grad of (grad J . v) with respect to the parameters."""
    params = list(model.parameters())
    g = torch.autograd.grad(_J(model, x, y, obj), params, create_graph=True)
    gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
    return list(torch.autograd.grad(gv, params))


def finite_difference_hvp(
    model: StageModule, x: Tensor, y: Tensor, obj: Objective, v: Sequence[Tensor], eps: float
) -> list[Tensor]:
    """(g(theta + eps v) - g(theta - eps v)) / (2 eps); the parameters are restored after."""
    params = list(model.parameters())
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=eps)
    plus = gradient(model, x, y, obj)
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=-2 * eps)
    minus = gradient(model, x, y, obj)
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=eps)
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def random_direction(model: StageModule, seed: int) -> list[Tensor]:
    """A random unit vector in parameter space (seeded)."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    norm = torch.sqrt(sum(t.pow(2).sum() for t in v))
    return [(t / norm).to(p.device) for t, p in zip(v, model.parameters())]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((ai * bi).sum() for ai, bi in zip(a, b)))


def _rel(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    num = max((g - w).abs().max().item() for g, w in zip(got, want))
    return num / max(w.abs().max().item() for w in want)


def saved_bytes(
    model: StageModule, x: Tensor, y: Tensor, obj: Objective, second_order: bool
) -> int:
    """Peak saved-for-backward bytes of a gradient (False) or of an HVP's graph (True)."""
    params = list(model.parameters())
    meter = SavedTensorMeter(params)
    with meter:
        J = _J(model, x, y, obj)
        g = torch.autograd.grad(J, params, create_graph=second_order)
    del g, J
    return meter.peak


@dataclass(frozen=True)
class HessianResult:
    num_params: int
    batch_size: int
    eps: float
    hvp_vs_finite_difference: float  # max|Hv - FD| / max|FD|
    symmetry: float  # |u.Hv - v.Hu| / |u.Hv|
    repeats: int
    gradient_s: float  # median seconds
    hvp_s: float
    gradient_saved: int  # bytes
    hvp_saved: int

    @property
    def time_ratio(self) -> float:
        return self.hvp_s / self.gradient_s

    @property
    def memory_ratio(self) -> float:
        return self.hvp_saved / self.gradient_saved

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "time_ratio": self.time_ratio, "memory_ratio": self.memory_ratio}


def run(cfg: Any, repeats: int = 20, eps: float = 1e-5, seed: int = 0) -> HessianResult:
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: need at least one repeat")
    obj = Objective.of(cfg.model, cfg.optim)
    model = build_mlp(cfg, dtype=torch.float64)
    x, y = first_batch(cfg.data, Workload.of(cfg), cfg.train.seed, torch.float64)
    v = random_direction(model, seed)
    u = random_direction(model, seed + 1)
    Hv = hvp(model, x, y, obj, v)
    fd = finite_difference_hvp(model, x, y, obj, v, eps)
    uHv, vHu = _dot(u, Hv), _dot(v, hvp(model, x, y, obj, u))
    times: dict[str, list[float]] = {"gradient": [], "hvp": []}
    jobs = {"gradient": lambda: gradient(model, x, y, obj), "hvp": lambda: hvp(model, x, y, obj, v)}
    for i in range(repeats + 2):  # two warm-up rounds, then interleaved repeats
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return HessianResult(
        num_params=sum(p.numel() for p in model.parameters()),
        batch_size=int(x.shape[0]),
        eps=eps,
        hvp_vs_finite_difference=_rel(Hv, fd),
        symmetry=abs(uHv - vHu) / abs(uHv),
        repeats=repeats,
        gradient_s=statistics.median(times["gradient"]),
        hvp_s=statistics.median(times["hvp"]),
        gradient_saved=saved_bytes(model, x, y, obj, second_order=False),
        hvp_saved=saved_bytes(model, x, y, obj, second_order=True),
    )


def render(result: HessianResult) -> str:
    r = result
    return "\n".join(
        [
            f"model: {r.num_params:,} parameters, batch {r.batch_size}, float64",
            f"H v (double backward) vs central difference of the gradient (eps={r.eps:g}): "
            f"max relative difference {r.hvp_vs_finite_difference:.1e}",
            f"symmetry |u.Hv - v.Hu| / |u.Hv|: {r.symmetry:.1e}",
            "",
            f"time (median of {r.repeats}, interleaved):  gradient {r.gradient_s * 1e3:.2f} ms   "
            f"HVP {r.hvp_s * 1e3:.2f} ms   ratio {r.time_ratio:.2f}x",
            f"saved for backward (exact):  gradient {r.gradient_saved:,} B   "
            f"HVP graph {r.hvp_saved:,} B   ratio {r.memory_ratio:.2f}x",
        ]
    )
