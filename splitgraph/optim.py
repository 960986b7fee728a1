"""Optimizers. The L2 term is part of the objective J (added to the weights' gradients by each
stage), so the optimizer itself never decays: Adam here is Adam on J, not AdamW."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from splitgraph.config import OptimName


def make_optimizer(optim_cfg: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    name = OptimName(optim_cfg.name)
    if name == OptimName.sgd:
        return torch.optim.SGD(
            params,
            lr=float(optim_cfg.lr),
            momentum=float(optim_cfg.momentum),
            nesterov=bool(optim_cfg.nesterov),
        )
    b1, b2 = (float(b) for b in optim_cfg.betas)
    return torch.optim.Adam(
        params, lr=float(optim_cfg.lr), betas=(b1, b2), eps=float(optim_cfg.eps)
    )
