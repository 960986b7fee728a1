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
as_container = train.as_container
containers = []  # the config converted to plain data (summary.json's copy)

def spy(self, *args, **kwargs):
    if not at_first_step:
        at_first_step.update({{m: m in sys.modules for m in HEAVY}})
        at_first_step["containers"] = len(containers)
    return forward_backward(self, *args, **kwargs)

def counted(cfg):
    containers.append(1)
    return as_container(cfg)

train.as_container = counted

PipelineEngine.forward_backward = spy
summary = train.run(load_config({overrides!r}))
print(json.dumps({{
    "at_first_step": at_first_step,
    "at_exit": {{m: m in sys.modules for m in HEAVY}},
    "containers": len(containers),
    "summary_config": summary["config"]["train"]["batch_size"],
    "prediction": summary["prediction"] is not None,
    "timeline": summary["timeline"] is not None,
    "checkpoint": summary["checkpoint"],
}}))
"""


@pytest.mark.timeout(180)
def test_heavy_modules_wait_until_after_the_first_step(tmp_path: Path) -> None:
    """A default run (prediction report, trace, timeline picture, checkpoint at the end)
    imports dynamo, DCP, sympy and matplotlib only after its first step, if at all, and
    converts the config for summary.json only then."""
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
    containers = got["at_first_step"].pop("containers")
    assert got["at_first_step"] == dict.fromkeys(HEAVY, False)
    # summary.json's plain copy of the config is made when it is written, once, not before
    assert containers == 0 and got["containers"] == 1 and got["summary_config"] == 64
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


COUNT_COMPOSES = """
import json, sys
from hydra.core.hydra_config import HydraConfig
from hydra._internal.config_loader_impl import ConfigLoaderImpl
import splitgraph.train.run as R

calls = []
load = ConfigLoaderImpl.load_configuration
def counted(self, *args, **kwargs):
    calls.append(kwargs.get("run_mode"))
    return load(self, *args, **kwargs)
ConfigLoaderImpl.load_configuration = counted
seen = []
R.run = lambda cfg: seen.append((len(calls), str(HydraConfig.get().mode)))
out = []
for extra in ([], ["hydra.mode=MULTIRUN", "hydra.sweep.dir={tmp}/sweep"]):
    calls.clear(); seen.clear()
    sys.argv = ["splitgraph-train", "run_dir={tmp}/run", *extra]
    R.main()
    out.append({{"composes_before_run": seen[0][0], "mode": seen[0][1]}})
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_hydra_composes_the_config_once(tmp_path: Path) -> None:
    """`splitgraph-train` composes the config once before the run (Hydra's get_mode would
    compose it a second time only to read hydra.mode); a hydra.mode override still wins."""
    proc = subprocess.run(
        [sys.executable, "-c", COUNT_COMPOSES.format(tmp=tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, multirun = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain == {"composes_before_run": 1, "mode": "RunMode.RUN"}
    # the override is honoured: get_mode composes, as Hydra does, and the job is a sweep's
    assert multirun["mode"] == "RunMode.MULTIRUN"
    assert multirun["composes_before_run"] >= 2


def test_no_packaged_config_sets_hydra_mode() -> None:
    """compose_once's premise: no packaged config file sets hydra.mode, and Hydra's own
    get_mode finds it unset for the default config, so answering None without composing is
    exact; where an override can set it, Hydra's get_mode is asked."""
    import yaml
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    from splitgraph.config import register_configs, register_resolvers
    from splitgraph.train.compose import mode_is_unset

    files = sorted((Path(__file__).parents[1] / "splitgraph/conf").rglob("*.yaml"))
    assert len(files) > 20
    for f in files:
        node = yaml.safe_load(f.read_text()) or {}
        assert "mode" not in (node.get("hydra") or {}), f
    register_configs()
    register_resolvers()
    hydra = Hydra.create_main_hydra2("train", create_config_search_path("pkg://splitgraph.conf"))
    assert mode_is_unset([], [])
    assert hydra.get_mode(config_name="config", overrides=[]) is None
    assert hydra.get_mode(config_name="config", overrides=["hydra.mode=MULTIRUN"]) is not None
    assert not mode_is_unset(["hydra.mode=MULTIRUN"], [])
    assert not mode_is_unset(["hydra.searchpath=[file:///x]"], [])
    assert not mode_is_unset([], ["--config-dir", "/x"])
    assert not mode_is_unset([], ["-cn=other"])


@pytest.mark.timeout(120)
def test_the_launcher_checks_the_launch_in_its_own_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`splitgraph.train.torchrun --check` (launch/train.sh, multinode.sh) runs splitgraph-check
    for the world torchrun's flags describe, before torchrun, without a second interpreter."""
    from splitgraph.train.torchrun import check

    monkeypatch.setenv("SPLITGRAPH_RUN_DIR", str(tmp_path / "run"))
    mod, dp2pp2 = ["-m", "splitgraph.train"], ["parallel.dp=2", "pipeline.stages=2"]
    bad = check(["--standalone", "--nproc-per-node", "2", *mod, "pipeline.microbatches=0"])
    out = capsys.readouterr()
    assert bad == 2 and "pipeline.microbatches=0 must be >= 1" in out.err
    assert "run dir:" not in out.err and out.out == ""
    # 2 nodes x 2 ranks: a 2 x 2 data x pipeline layout is valid only for a world of 4
    assert check(["--nnodes", "2", "--nproc-per-node", "2", *mod, *dp2pp2]) == 0
    out = capsys.readouterr()
    assert out.out == "" and f"run dir: {tmp_path / 'run'}" in out.err
    assert check(["--standalone", "--nproc-per-node", "2", *mod, *dp2pp2]) == 2
    assert check(["--standalone", "--nproc-per-node", "2", "-m", "other.module"]) == 2
    assert "-m splitgraph.train` only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
