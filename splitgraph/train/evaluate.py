"""Held-out metrics of a consolidated state dict, on one device (the host, by default)."""

from __future__ import annotations

import torch
from torch import Tensor

from splitgraph.config import ModelConfig, Task
from splitgraph.model import build_mlp, loss_sum


@torch.no_grad()
def evaluate(
    model_cfg: ModelConfig,
    state: dict[str, Tensor],
    X: Tensor,
    y: Tensor,
    dtype: torch.dtype = torch.float32,
    target_std: Tensor | None = None,
    chunk: int = 4096,
) -> dict[str, float]:
    """Mean loss L (and accuracy for classification) of the model `state` on (X, y).

    `target_std`: the per-target std the loader standardized regression targets with. The
    loss is then reported in the targets' own units, `loss` = mean over samples of
    (1/k) sum_j std_j^2 (o_j - y_j)^2 (the error of o * std + mean against the file's y),
    and `loss_standardized` is the same error in the units the model was trained in (L).
    """
    if X.shape[0] == 0:
        return {}
    model = build_mlp(model_cfg, dtype=dtype)
    model.load_state_dict(state)
    task = Task(model_cfg.task)
    scale = None
    if target_std is not None and task == Task.regression:
        scale = target_std.to(torch.float64)
    total, original, correct = 0.0, 0.0, 0
    for i in range(0, X.shape[0], chunk):
        xb = X[i : i + chunk].to(dtype=dtype, device="cpu")
        yb = y[i : i + chunk].to("cpu")
        if yb.is_floating_point():
            yb = yb.to(dtype)
        out = model(xb)
        total += float(loss_sum(out, yb, task))
        if scale is not None:  # differences scale by std; the means cancel
            original += float(loss_sum(out.double() * scale, yb.double() * scale, task))
        if task == Task.classification:
            correct += int((out.argmax(dim=1) == yb).sum())
    n = X.shape[0]
    metrics = {"loss": total / n, "samples": float(n)}
    if scale is not None:
        metrics = {"loss": original / n, "loss_standardized": total / n, "samples": float(n)}
    if task == Task.classification:
        metrics["accuracy"] = correct / n
    return metrics
