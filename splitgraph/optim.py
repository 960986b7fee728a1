"""Optimizers. The L2 term is part of the objective J (added to the weights' gradients by each
stage), so the optimizer itself never decays: Adam here is Adam on J, not AdamW.

They are torch's own `torch.optim.SGD` and `torch.optim.Adam` (same state, same arithmetic,
same state_dict), with one difference at start-up. torch wraps `add_param_group` and `step` so
that `torch.compile` traces around them, and the first call of either imports `torch._dynamo`
(with sympy and the symbolic-shape machinery: about as long as `import torch` itself; see
splitgraph/bench/startup.py). splitgraph never compiles, so these two methods call torch's
undecorated bodies (`inspect.unwrap`) under the grad mode torch's wrapper would set; all else
(state_dict, load_state_dict, zero_grad, hooks) is torch's as is. If a torch release stops
wrapping them, `unwrap` returns the method itself and nothing changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from splitgraph.config import OptimName


class _NoCompileWrappers:
    """Mixin before a torch.optim class: its `add_param_group` and `step`, undecorated."""

    _torch_class: type[torch.optim.Optimizer]
    defaults: dict[str, Any]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        inspect.unwrap(torch.optim.Optimizer.add_param_group)(self, param_group)

    def step(self, closure: Any = None) -> Any:
        body = inspect.unwrap(self._torch_class.step)
        # what torch's wrapper does around the body (besides telling dynamo to break the graph)
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return body(self, closure)


class SGD(_NoCompileWrappers, torch.optim.SGD):
    _torch_class = torch.optim.SGD


class Adam(_NoCompileWrappers, torch.optim.Adam):
    _torch_class = torch.optim.Adam


def make_optimizer(optim_cfg: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    name = OptimName(optim_cfg.name)
    if name == OptimName.sgd:
        return SGD(
            params,
            lr=float(optim_cfg.lr),
            momentum=float(optim_cfg.momentum),
            nesterov=bool(optim_cfg.nesterov),
        )
    b1, b2 = (float(b) for b in optim_cfg.betas)
    return Adam(params, lr=float(optim_cfg.lr), betas=(b1, b2), eps=float(optim_cfg.eps))
