"""Hostile inputs: random configs and random data files are either refused with a clear error
(SplitgraphError, or Hydra's own for schema errors) or accepted and then train a step; nothing
crashes with another exception or hangs. Also: one-node launches keep their sockets on
loopback.

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible) and with
modest example counts, to stay within seconds.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.errors import HydraException
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from splitgraph.config import Workload, load_config, validate
from splitgraph.data import load_dataset
from splitgraph.errors import ConfigError, DataError, SplitgraphError
from splitgraph.partition import make_plan
from splitgraph.runtime.dist import DistEnv, pin_loopback
from splitgraph.schedule import build_schedule
from splitgraph.train import run as train

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_floats = st.one_of(
    st.sampled_from([0.0, -1.0, 1e-3, 0.5, 0.9, 1.0, 2.0, 1e30, math.nan, math.inf, -math.inf]),
    st.floats(-2, 2, allow_nan=False),
)
_small = st.integers(-1, 6)


def _value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    if v is None:
        return "null"
    return str(v)


@st.composite
def configs(draw: st.DrawFn) -> tuple[list[str], int]:
    """Override lists over the keys users touch, with values from sensible to absurd."""
    pick = {
        "model.hidden": st.lists(st.integers(-1, 6), min_size=0, max_size=4),
        "model.activation": st.sampled_from(["relu", "tanh", "gelu", "sigmoid", "relux"]),
        "model.bias": st.booleans(),
        "model.task": st.sampled_from(["classification", "regression"]),
        "data.features": _small,
        "data.outputs": _small,
        "data.samples": st.integers(0, 64),
        "data.test_fraction": _floats,
        "train.batch_size": st.integers(-1, 20),
        "train.steps": st.one_of(st.none(), st.integers(-1, 2)),
        "train.epochs": st.one_of(st.none(), st.integers(0, 1)),
        "pipeline.microbatches": st.integers(-1, 9),
        "pipeline.stages": st.one_of(st.none(), st.integers(0, 5)),
        "schedule.name": st.sampled_from(["naive", "gpipe", "1f1b", "1f1c"]),
        "partition.strategy": st.sampled_from(["uniform", "params", "manual", "greedy"]),
        "partition.boundaries": st.one_of(st.none(), st.lists(st.integers(-1, 5), max_size=3)),
        "optim.name": st.sampled_from(["sgd", "adam"]),
        "optim.lr": _floats,
        "optim.momentum": _floats,
        "optim.weight_decay": _floats,
        "optim.betas": st.lists(_floats, min_size=0, max_size=3),
        "runtime.dtype": st.sampled_from(["float32", "float64", "bfloat16", "float16"]),
        "runtime.timeout": _floats,
        "runtime.hang_timeout": st.one_of(st.none(), _floats),
        "runtime.nan_check": st.sampled_from(["microbatch", "step", "often"]),
        "checkpoint.every": st.one_of(st.none(), st.integers(-1, 2)),
        "checkpoint.keep": st.integers(-1, 2),
        "debug.fail_mode": st.sampled_from(["raise", "kill", "stall", "nan", "boom"]),
    }
    keys = draw(st.lists(st.sampled_from(sorted(pick)), unique=True, max_size=8))
    overrides = [f"{k}={_value(draw(pick[k]))}" for k in keys]
    return overrides, draw(st.integers(1, 4))


def _train_one_step(overrides: list[str], run_dir: Path) -> None:
    """Train one step on one device; only a SplitgraphError may stop it."""
    over = [
        *overrides,
        "train.steps=1",
        "train.epochs=null",
        "pipeline.stages=null",
        "train.progress=false",
        f"run_dir={run_dir / uuid.uuid4().hex}",
    ]
    try:
        cfg = load_config(over)
        validate(cfg, 1)
    except ConfigError:
        return  # valid on several ranks only (debug.fail_rank and the like)
    try:
        train.run(cfg, DistEnv())
    except SplitgraphError:
        pass  # e.g. NonFiniteError with an extreme learning rate: refused, clearly
    else:
        assert (Path(cfg.run_dir) / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.timeout(240)
@SETTINGS
@given(case=configs())
def test_random_configs_are_refused_clearly_or_train(
    case: tuple[list[str], int], tmp_path: Path
) -> None:
    overrides, world = case
    try:
        cfg = load_config([*overrides, f"run_dir={tmp_path}"])
    except (HydraException, OmegaConfBaseException):
        event("refused by Hydra")
        return  # Hydra's own message: a typo, a wrong type, an unknown option
    try:
        validate(cfg, world)
    except ConfigError as e:
        event("refused by validate")
        assert str(e).startswith("invalid configuration:\n  - ")
        return
    event("accepted")
    # accepted: the plan and the schedule for `world` ranks exist, and one step trains
    plan = make_plan(Workload.of(cfg), world)
    build_schedule(str(cfg.schedule.name), plan.num_stages, int(cfg.pipeline.microbatches))
    _train_one_step(overrides, tmp_path)


_CORRUPTIONS = (
    "x_1d",
    "x_3d",
    "x_features",
    "x_nan",
    "x_inf",
    "x_huge",
    "x_complex",
    "x_bool",
    "x_empty",
    "y_long",
    "y_label_high",
    "y_label_negative",
    "y_nan",
    "y_fraction",
    "y_2d",
    "y_complex",
    "y_int8",
)


@st.composite
def data_files(draw: st.DrawFn) -> dict[str, Any]:
    """A valid data set with 0 to 2 corruptions of the kinds a user's file may have."""
    task = draw(st.sampled_from(["classification", "regression"]))
    n = draw(st.integers(4, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.normal(size=(n, 3)).astype(draw(st.sampled_from([np.float32, np.float64, np.int64])))
    y = rng.integers(0, 3, size=n) if task == "classification" else rng.normal(size=(n, 3))
    bad = draw(st.lists(st.sampled_from(_CORRUPTIONS), max_size=2, unique=True))
    with np.errstate(all="ignore"):
        for c in bad:
            x, y = _corrupt(c, x, y, n)
    return {
        "X": x,
        "y": y,
        "task": task,
        "bad": bad,
        "format": draw(st.sampled_from(["npz", "pt", "pt", "pt-list", "garbage"])),
    }


def _corrupt(kind: str, x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = x.copy(), y.copy()
    if x.size == 0 or y.size == 0:
        return x, y  # emptied already: nothing left to corrupt
    if kind == "x_1d":
        x = x.reshape(-1)
    elif kind == "x_3d":
        x = x.reshape(*x.shape, 1)
    elif kind == "x_features":
        x = np.concatenate([x, x], axis=-1)
    elif kind in ("x_nan", "x_inf", "x_huge"):
        x = x.real.astype(np.float64)
        x.flat[0] = {"x_nan": np.nan, "x_inf": np.inf, "x_huge": 1e39}[kind]
    elif kind == "x_complex":
        x = x.astype(np.complex64)
    elif kind == "x_bool":
        x = x > 0
    elif kind == "x_empty":
        x, y = x[:0], y[:0]
    elif kind == "y_long":
        y = np.concatenate([y, y[:1]])
    elif kind in ("y_label_high", "y_label_negative", "y_nan", "y_fraction"):
        y = y.real.astype(np.float64)
        y.flat[0] = {"y_label_high": 7, "y_label_negative": -1, "y_nan": np.nan}.get(kind, 0.5)
    elif kind == "y_2d":
        y = y.reshape(len(y), -1)[:, :1].repeat(2, axis=1) if y.ndim else y
    elif kind == "y_complex":
        y = y.astype(np.complex64)
    elif kind == "y_int8":
        y = y.astype(np.int8)
    return x, y


def _write(case: dict[str, Any], path: Path) -> Path:
    fmt = case["format"]
    if fmt == "npz":
        path = path.with_suffix(".npz")
        np.savez(path, X=case["X"], y=case["y"])
    elif fmt == "garbage":
        path.with_suffix(".pt").write_bytes(b"PK\x03\x04 not a zip nor a pickle")
        path = path.with_suffix(".pt")
    else:
        path = path.with_suffix(".pt")
        X, y = torch.from_numpy(case["X"]), torch.from_numpy(case["y"])
        torch.save({"X": X, "y": y} if fmt == "pt" else {"X": X.tolist(), "y": ["a"]}, path)
    return path


@pytest.mark.timeout(240)
@SETTINGS
@given(case=data_files())
def test_random_data_files_are_refused_clearly_or_train(
    case: dict[str, Any], tmp_path: Path
) -> None:
    path = _write(case, tmp_path / uuid.uuid4().hex)
    over = [
        "data=file",
        f"data.path={path}",
        "data.features=3",
        "data.outputs=3",
        "data.test_fraction=0.25",
        f"model.task={case['task']}",
        "model.hidden=[4]",
        "train.batch_size=2",
        "pipeline.microbatches=2",
    ]
    try:
        cfg = load_config(over)
        load_dataset(cfg.data, Workload.of(cfg))
    except DataError:
        event("refused")
        return
    event("accepted")
    _train_one_step(over, tmp_path)
    harmful = {"x_1d", "x_3d", "x_features", "x_nan", "x_inf", "x_huge", "x_empty", "y_long"}
    assert case["format"] in ("npz", "pt") and not harmful & set(case["bad"]), case


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_damaged_data_files_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(DataError, match="cannot be read"):
        cfg = load_config(["data=file", f"data.path={path}"])
        load_dataset(cfg.data, Workload.of(cfg))


def test_one_node_launches_pin_sockets_to_loopback() -> None:
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    assert pin_loopback(env) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert env["GLOO_SOCKET_IFNAME"] == "lo"
    mine = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "eth1"}
    assert pin_loopback(mine) == {"NCCL_SOCKET_IFNAME": "lo"}  # the user's choice stands
    assert mine["GLOO_SOCKET_IFNAME"] == "eth1"
    several_nodes = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert pin_loopback(several_nodes) == {} and "GLOO_SOCKET_IFNAME" not in several_nodes
    assert pin_loopback({}) == {}  # no torchrun: one process, no sockets
