"""Start-up: what a run imports before its first step, and the optimizers that make it lighter.

Speed itself is measured by `python -m splitgraph.bench.startup`, not asserted here; these tests
pin down the causes: the heavy modules stay out until they are used, and the optimizers that
skip torch's compile wrappers update exactly as torch.optim does.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitgraph.optim import SGD, Adam

#: imported by torch._dynamo (torch.optim's wrappers), DCP (checkpoints) and the pictures
HEAVY = ("torch._dynamo", "torch.distributed.checkpoint", "sympy", "matplotlib")

SCRIPT = """
import json, sys
from splitgraph.train import run as train
from splitgraph.config import load_config
from splitgraph.runtime.engine import PipelineEngine

HEAVY = {heavy!r}
at_first_step = {{}}
forward_backward = PipelineEngine.forward_backward

def spy(self, *args, **kwargs):
    if not at_first_step:
        at_first_step.update({{m: m in sys.modules for m in HEAVY}})
    return forward_backward(self, *args, **kwargs)

PipelineEngine.forward_backward = spy
summary = train.run(load_config({overrides!r}))
print(json.dumps({{
    "at_first_step": at_first_step,
    "at_exit": {{m: m in sys.modules for m in HEAVY}},
    "prediction": summary["prediction"] is not None,
    "timeline": summary["timeline"] is not None,
    "checkpoint": summary["checkpoint"],
}}))
"""


@pytest.mark.timeout(180)
def test_heavy_modules_wait_until_after_the_first_step(tmp_path: Path) -> None:
    """A default run (prediction report, trace, timeline picture, checkpoint at the end)
    imports dynamo, DCP, sympy and matplotlib only after its first step, if at all."""
    overrides = [
        "model.hidden=[32,32]",
        "data.features=16",
        "data.samples=512",
        "train.batch_size=64",
        "train.steps=2",
        "train.progress=false",
        f"run_dir={tmp_path}",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=HEAVY, overrides=overrides)],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["at_first_step"] == dict.fromkeys(HEAVY, False)
    # the run did what needs them, afterwards: the features are on, not skipped
    assert got["prediction"] and got["timeline"] and got["checkpoint"]
    assert got["at_exit"]["torch.distributed.checkpoint"] and got["at_exit"]["matplotlib"]
    assert (tmp_path / "timeline.png").exists()


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(4, 5, generator=g, dtype=torch.float64)),
    ]


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        (SGD, torch.optim.SGD, {"lr": 0.1}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (Adam, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6}),
    ],
)
def test_optimizers_step_exactly_as_torch_optim(ours: type, theirs: type, kwargs: dict) -> None:
    a, b = _params(0), _params(0)
    start = [p.detach().clone() for p in a]
    opt_a, opt_b = ours(a, **kwargs), theirs(b, **kwargs)
    assert isinstance(opt_a, theirs)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in a]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    for p, q, p0 in zip(a, b, start):
        assert not torch.equal(p.detach(), p0)  # the step moved the weights
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sb["state"]:
        for k, v in sb["state"][i].items():
            torch.testing.assert_close(sa["state"][i][k], v, rtol=0, atol=0)


def test_optimizer_state_loads_back(tmp_path: Path) -> None:
    """A resume goes through torch's load_state_dict: state saved by one optimizer of ours
    continues identically in another."""
    a, b = _params(0), _params(0)
    opt_a = Adam(a, lr=0.01)
    for p in a:
        p.grad = torch.ones_like(p)
    opt_a.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt_b = Adam(b, lr=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # load_state_dict shares tensors
    for p, q in zip(a, b):
        p.grad, q.grad = torch.full_like(p, 0.5), torch.full_like(q, 0.5)
    opt_a.step()
    opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
