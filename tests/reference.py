"""Plain single-device PyTorch, written independently of splitgraph's runtime: the reference
every schedule and partition must match."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitgraph.model import build_mlp, layer_dims

_PHI = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def plain_mlp(cfg: Any, dtype: torch.dtype) -> nn.Sequential:
    """nn.Sequential of nn.Linear + activation, with splitgraph's seeded initial weights."""
    m = cfg.model
    dims = layer_dims(cfg)
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1], bias=bool(m.bias)))
        if i < len(dims) - 2:
            act = m.activation.value if hasattr(m.activation, "value") else str(m.activation)
            mods.append(_PHI[act]())
    seq = nn.Sequential(*mods).to(dtype)
    src = build_mlp(cfg, dtype=dtype).state_dict()
    linears = [mod for mod in seq if isinstance(mod, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(src[f"layers.{i}.weight"])
            if lin.bias is not None:
                lin.bias.copy_(src[f"layers.{i}.bias"])
    return seq


def global_names(seq: nn.Sequential) -> dict[str, nn.Parameter]:
    linears = [mod for mod in seq if isinstance(mod, nn.Linear)]
    out = {}
    for i, lin in enumerate(linears):
        out[f"layers.{i}.weight"] = lin.weight
        if lin.bias is not None:
            out[f"layers.{i}.bias"] = lin.bias
    return out


def objective(seq: nn.Sequential, x: Tensor, y: Tensor, task: str, wd: float) -> Tensor:
    """J = L + lambda/2 sum ||W||_F^2 on the full minibatch (weights only)."""
    out = seq(x)
    loss = F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out, y)
    s = sum(m.weight.pow(2).sum() for m in seq if isinstance(m, nn.Linear))
    return loss + 0.5 * wd * s


def reference_grads(cfg: Any, x: Tensor, y: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    seq = plain_mlp(cfg, dtype)
    task = cfg.model.task.value if hasattr(cfg.model.task, "value") else str(cfg.model.task)
    objective(seq, x, y, task, float(cfg.optim.weight_decay)).backward()
    return {k: p.grad.detach().clone() for k, p in global_names(seq).items()}


def rel_err(got: Tensor, want: Tensor) -> float:
    """max|got - want| / max|want|, or inf when either holds a NaN or an infinity: a
    non-finite value is a failure, never a small error (`max(0.0, nan)` is 0.0)."""
    w = want.to(got.dtype)
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(w).all())):
        return float("inf")
    if got.shape != w.shape:
        return float("inf")
    scale = w.abs().max().item() if w.numel() else 0.0
    err = (got - w).abs().max().item() if w.numel() else 0.0
    return err / (scale or 1.0)


def max_rel_err(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """Largest over the parameters of `got` of `rel_err`; inf if any value is non-finite or
    a parameter of `got` is missing from `want`."""
    errors = [rel_err(g, want[k]) if k in want else float("inf") for k, g in got.items()]
    return worst(errors) if errors else float("inf")


def weights_rel_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """`max_rel_err` of two whole state dicts, which must name the same parameters."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max_rel_err(a, b)


def worst(errors: Iterable[float]) -> float:
    """The largest error, inf if any is NaN or infinite (Python's max is order-dependent with
    NaN: max(1.0, nan) is 1.0, max(nan, 1.0) is nan)."""
    values = [float(e) for e in errors]
    if not values or not all(math.isfinite(v) for v in values):
        return float("inf")
    return max(values)
