"""Held-out metrics of a consolidated state dict, on one device (the host, by default)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from splitgraph.config import Task
from splitgraph.model import build_mlp, loss_sum


@torch.no_grad()
def evaluate(
    cfg: Any,
    state: dict[str, Tensor],
    X: Tensor,
    y: Tensor,
    dtype: torch.dtype = torch.float32,
    chunk: int = 4096,
) -> dict[str, float]:
    """Mean loss L (and accuracy for classification) of the model `state` on (X, y)."""
    if X.shape[0] == 0:
        return {}
    model = build_mlp(cfg, dtype=dtype)
    model.load_state_dict(state)
    task = Task(cfg.model.task)
    total, correct = 0.0, 0
    for i in range(0, X.shape[0], chunk):
        xb = X[i : i + chunk].to(dtype=dtype, device="cpu")
        yb = y[i : i + chunk].to("cpu")
        if yb.is_floating_point():
            yb = yb.to(dtype)
        out = model(xb)
        total += float(loss_sum(out, yb, task))
        if task == Task.classification:
            correct += int((out.argmax(dim=1) == yb).sum())
    n = X.shape[0]
    metrics = {"loss": total / n, "samples": float(n)}
    if task == Task.classification:
        metrics["accuracy"] = correct / n
    return metrics
