"""A user's data file: its precision kept up to the run's dtype, its shape read from it, every
problem listed once, and standardization (statistics of the training split only)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from splitgraph.config import Workload, load_config
from splitgraph.data import _split_indices, fill_shape_from_file, load_dataset
from splitgraph.errors import DataError, NonFiniteError
from splitgraph.model import build_mlp
from splitgraph.runtime.dist import DistEnv
from splitgraph.spawn import run_ranks
from splitgraph.train import run as train
from splitgraph.train.evaluate import evaluate
from tests.reference import global_names, objective, plain_mlp


def _load(cfg: Any) -> Any:
    """The dataset as the entrances load it: the data section, for the config's workload."""
    return load_dataset(cfg.data, Workload.of(cfg))


def _cfg(path: Path, *extra: str) -> Any:
    return load_config(["data=file", f"data.path={path}", "train.batch_size=4", *extra])


def _fine(n: int = 64, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X = 1 + k * 2^-45 (k < 2^20): every value rounds to 1.0 in float32, none in float64;
    y depends on the part float32 cannot hold."""
    k = np.random.default_rng(seed).integers(0, 2**20, size=(n, d))
    X = 1.0 + k * 2.0**-45
    y = ((X - 1.0) * 2.0**25).sum(axis=1, keepdims=True)
    return X, y


# -- precision -------------------------------------------------------------------------


def test_float64_data_keeps_every_bit_in_a_float64_run(tmp_path: Path) -> None:
    X, y = _fine()
    assert (X.astype(np.float32) == 1.0).all() and (X != 1.0).any()  # invisible in float32
    np.savez(tmp_path / "f.npz", X=X, y=y)
    over = ["model.task=regression", "data.standardize=none", "data.test_fraction=0"]
    ds = _load(_cfg(tmp_path / "f.npz", *over, "runtime.dtype=float64"))
    train_rows, _ = _split_indices(64, 0.0, 0)
    assert ds.X.dtype == torch.float64 and ds.y.dtype == torch.float64
    assert torch.equal(ds.X, torch.from_numpy(X)[train_rows])  # every bit, in the split's order
    assert torch.equal(ds.y, torch.from_numpy(y)[train_rows])
    # a float32 run holds float32: the same file rounds to ones
    ds32 = _load(_cfg(tmp_path / "f.npz", *over))
    assert ds32.X.dtype == torch.float32 and bool((ds32.X == 1.0).all())


def test_the_range_is_checked_against_the_runs_dtype(tmp_path: Path) -> None:
    X = np.random.default_rng(1).normal(size=(20, 3))
    X[4, 1] = 1e39  # finite in float64, infinite in float32
    np.savez(tmp_path / "big.npz", X=X, y=np.arange(20) % 2)
    with pytest.raises(
        DataError, match=r"beyond float32's range .* in 1 rows.*runtime.dtype=float64"
    ):
        _load(_cfg(tmp_path / "big.npz", "data.standardize=none"))
    ds = _load(_cfg(tmp_path / "big.npz", "data.standardize=none", "runtime.dtype=float64"))
    assert float(ds.X.max()) == 1e39 or float(ds.X_test.max()) == 1e39
    X[0, 0] = np.nan  # a NaN is refused in any dtype, and named as such
    np.savez(tmp_path / "nan.npz", X=X, y=np.arange(20) % 2)
    with pytest.raises(DataError, match="NaN or infinite values in 1 rows"):
        _load(_cfg(tmp_path / "nan.npz", "runtime.dtype=float64"))


F64 = [
    "data=file",
    "data.standardize=none",
    "data.test_fraction=0",
    "model.task=regression",
    "model.hidden=[3,3,3]",
    "runtime.dtype=float64",
    "schedule=interleaved",  # 2 ranks x 2 virtual stages: 4 stages, 2 processes
    "pipeline.microbatches=4",
    "train.batch_size=64",
    "train.steps=1",
    "train.progress=false",
    "optim.lr=0.5",
    "checkpoint.every=null",
    "trace.enabled=false",
    "costs.report=false",
]


def f64_rank(rank: int, world: int, overrides: list[str]) -> int | None:
    """One rank of a real training run (train.run) on the process group run_ranks made."""
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    summary = train.run(load_config(overrides), env)
    return summary["steps"] if summary is not None else None


@pytest.mark.timeout(180)
def test_a_4_stage_float64_run_matches_an_independent_float64_update(tmp_path: Path) -> None:
    """On a loader that rounds data to float32 this is ~1e-8 off; the engine is ~1e-15."""
    X, y = _fine()
    path = tmp_path / "fine.npz"
    np.savez(path, X=X, y=y)
    over = [*F64, f"data.path={path}", f"run_dir={tmp_path / 'run'}"]
    assert run_ranks(f64_rank, 2, over, timeout=150)[0] == 1
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)

    # plain PyTorch, float64, the whole batch (the mean does not depend on the row order)
    cfg = load_config(over)
    seq = plain_mlp(cfg, torch.float64)
    start = {k: p.detach().clone() for k, p in global_names(seq).items()}
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    objective(seq, xt, yt, "regression", float(cfg.optim.weight_decay)).backward()
    lr = float(cfg.optim.lr)  # SGD's first step: momentum buffer = gradient
    for name, p in global_names(seq).items():
        want = -lr * p.grad
        have = got[name] - start[name]
        assert torch.isfinite(have).all(), name
        tol = 1e-12 * float(want.abs().max())
        torch.testing.assert_close(
            have, want, rtol=1e-12, atol=tol, msg=lambda m, name=name: f"{name}: {m}"
        )


# -- the file's shape and its problems --------------------------------------------------


def test_features_and_outputs_are_read_from_the_file(tmp_path: Path) -> None:
    X = np.random.default_rng(2).normal(size=(50, 7))
    np.savez(tmp_path / "c.npz", X=X, y=np.arange(50) % 3)
    cfg = load_config(["data=file", f"data.path={tmp_path / 'c.npz'}"], fill_data=False)
    assert cfg.data.features is None and cfg.data.outputs is None  # the data=file default
    said = fill_shape_from_file(cfg.data, cfg.model.task, cfg.runtime)
    assert (cfg.model.in_features, cfg.model.out_features) == (7, 3)
    assert said is not None and "data.features=7, data.outputs=3 read from the file" in said
    assert "labels 0..2" in said
    np.savez(tmp_path / "r.npz", X=X, y=X[:, :2])
    cfg = _cfg_reg(tmp_path / "r.npz")
    assert (cfg.data.features, cfg.data.outputs) == (7, 2)
    np.savez(tmp_path / "r1.npz", X=X, y=X[:, 0])
    assert _cfg_reg(tmp_path / "r1.npz").data.outputs == 1
    # given values are checked, not replaced
    with pytest.raises(DataError, match=re.escape("X has 7 features but data.features=5")):
        load_config(["data=file", f"data.path={tmp_path / 'c.npz'}", "data.features=5"])


def _cfg_reg(path: Path) -> Any:
    return load_config(["data=file", f"data.path={path}", "model.task=regression"])


def test_every_problem_of_a_file_is_listed_in_one_error(tmp_path: Path) -> None:
    X = np.zeros((10, 4))
    y = np.array([0, 1, 2, -1, 0, 1, 2, 0, 1])  # 9 rows, a negative label
    np.savez(tmp_path / "bad.npz", X=X, y=y)
    with pytest.raises(DataError) as info:
        _load(_cfg(tmp_path / "bad.npz", "data.features=3", "data.outputs=3"))
    text = str(info.value)
    assert "(3 problems)" in text
    for needle in ("X has 4 features", "X has 10 rows but y has 9", "found -1 (in 1 rows)"):
        assert text.count(needle) == 1, (needle, text)


@pytest.mark.parametrize(
    ("kind", "over", "needle", "not_there"),
    [
        # regression y of shape (2000,): report the file's shape, and the fix
        (
            "y_1d",
            ["model.task=regression", "data.outputs=3"],
            "got shape (2000,): set data.outputs=1",
            "(2000, 1)",
        ),
        # a label -1 with data.outputs=3: the outputs are right, the label is not
        (
            "y_neg",
            ["data.outputs=3"],
            "labels must be class ids >= 0; found -1",
            "set data.outputs",
        ),
        ("x_text", [], "X holds text (dtype <U3), not numbers", "got ndarray"),
        ("x_objects", [], "X holds Python objects", "Traceback"),
        (
            "x_list",
            [],
            "X must be an array of numbers (a tensor in a .pt); got a list of list of str",
            "got list",
        ),
    ],
)
def test_file_messages_name_the_problem_as_the_file_has_it(
    tmp_path: Path, kind: str, over: list[str], needle: str, not_there: str
) -> None:
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(2000, 5)), rng.integers(0, 3, 2000)
    path = tmp_path / "d.npz"
    if kind == "y_1d":
        np.savez(path, X=X, y=rng.normal(size=2000))
    elif kind == "y_neg":
        y[7] = -1
        np.savez(path, X=X, y=y)
    elif kind == "x_text":
        np.savez(path, X=np.array([["abc"] * 5] * 2000), y=y)
    elif kind == "x_objects":
        np.savez(path, X=np.array([[object()] * 5] * 2000, dtype=object), y=y)
    else:
        path = tmp_path / "d.pt"
        torch.save({"X": [["abc"] * 5] * 2000, "y": torch.from_numpy(y)}, path)
    with pytest.raises(DataError) as info:
        _load(_cfg(path, "data.features=5", *over))
    assert needle in str(info.value) and not_there not in str(info.value), str(info.value)


def test_a_sparse_x_in_a_pt_is_trained_on_as_dense(tmp_path: Path) -> None:
    X = torch.zeros(40, 6, dtype=torch.float64)
    X[::3, 2] = 1.5
    y = torch.arange(40) % 2
    torch.save({"X": X.to_sparse(), "y": y}, tmp_path / "s.pt")
    torch.save({"X": X, "y": y}, tmp_path / "d.pt")
    over = ["runtime.dtype=float64", "data.standardize=none"]
    sparse = _load(_cfg(tmp_path / "s.pt", *over))
    dense = _load(_cfg(tmp_path / "d.pt", *over))
    assert sparse.X.layout == torch.strided and torch.equal(sparse.X, dense.X)
    assert torch.equal(sparse.y, dense.y) and sparse.X.shape == (36, 6)


# -- standardization ---------------------------------------------------------------------


def test_standardization_uses_the_training_split_only_and_the_same_bits_everywhere(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 5)) * [1, 10, 100, 1e3, 0] + [0, 5, -7, 1e4, 3]  # last: constant
    y = X[:, :2] @ [[1.0, 2.0], [0.5, -1.0]] + 100
    np.savez(tmp_path / "r.npz", X=X, y=y)
    over = ["model.task=regression", "runtime.dtype=float64", "data.test_fraction=0.2"]
    cfg = _cfg(tmp_path / "r.npz", *over)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = load_dataset(cfg.data, Workload.of(cfg))
        torch.set_num_threads(2)
        b = load_dataset(cfg.data, Workload.of(cfg))
    finally:
        torch.set_num_threads(threads)
    assert a.scaling is not None and b.scaling is not None
    for name in ("x_mean", "x_std", "y_mean", "y_std"):  # bitwise, whatever the threads
        assert torch.equal(getattr(a.scaling, name), getattr(b.scaling, name)), name
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)

    train_rows, test_rows = _split_indices(300, 0.2, 0)
    raw = X[train_rows.numpy()]
    mean = np.array([math.fsum(c) / len(c) for c in raw.T])  # exactly rounded sums
    std = np.array([math.sqrt(math.fsum((c - m) ** 2) / len(c)) for c, m in zip(raw.T, mean)])
    std[std == 0] = 1.0
    torch.testing.assert_close(a.scaling.x_mean, torch.from_numpy(mean), rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(a.scaling.x_std, torch.from_numpy(std), rtol=1e-14, atol=0)
    all_rows = torch.from_numpy(X.mean(axis=0))
    assert not torch.allclose(a.scaling.x_mean, all_rows, rtol=1e-6)  # the test rows left out
    # the held-out rows are standardized with the training split's statistics
    want_test = (X[test_rows.numpy()] - mean) / std
    torch.testing.assert_close(a.X_test, torch.from_numpy(want_test), rtol=1e-12, atol=1e-12)
    assert float(a.X[:, 4].abs().max()) == 0.0  # a constant column is only centred
    torch.testing.assert_close(
        a.X[:, :4].mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        a.X[:, :4].std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # data.standardize=none keeps the file's values
    raw_ds = _load(_cfg(tmp_path / "r.npz", *over, "data.standardize=none"))
    assert raw_ds.scaling is None and torch.equal(raw_ds.X, torch.from_numpy(raw))


def test_losses_are_reported_in_the_targets_own_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 3))
    y = X @ rng.normal(size=(3, 2)) * [30.0, 0.1] + [1e3, -5]
    np.savez(tmp_path / "r.npz", X=X, y=y)
    cfg = _cfg(
        tmp_path / "r.npz", "model.task=regression", "runtime.dtype=float64", "model.hidden=[8]"
    )
    ds = load_dataset(cfg.data, Workload.of(cfg))
    assert ds.scaling is not None and ds.target_std is not None
    state = build_mlp(cfg, dtype=torch.float64).state_dict()
    got = evaluate(cfg.model, state, ds.X_test, ds.y_test, torch.float64, ds.target_std)
    # independently: predictions back in the file's units against the file's own y
    _, test_rows = _split_indices(200, float(cfg.data.test_fraction), 0)
    model = build_mlp(cfg, dtype=torch.float64)
    with torch.no_grad():
        pred = model(ds.X_test) * ds.scaling.y_std + ds.scaling.y_mean
    want = float(((pred - torch.from_numpy(y[test_rows.numpy()])) ** 2).mean())
    assert math.isfinite(got["loss"]) and got["loss"] == pytest.approx(want, rel=1e-10)
    # and L in the model's (standardized) units, as training reports it
    assert got["loss_standardized"] == pytest.approx(
        float(((model(ds.X_test) - ds.y_test) ** 2).mean().detach()), rel=1e-10
    )


@pytest.mark.timeout(120)
def test_a_regression_file_trains_with_the_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A linear target on raw-scale inputs: NaN by step 21 unstandardized (the guard says so and
    points at data.standardize); finite with the defaults, which standardize a file."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(2000, 20)) * 50 + 100
    np.savez(tmp_path / "lin.npz", X=X, y=X @ rng.normal(size=20) * 10 + 5)
    base = [
        "data=file",
        f"data.path={tmp_path / 'lin.npz'}",
        "model.task=regression",
        "train.steps=40",
        "train.progress=false",
    ]
    with caplog.at_level(logging.INFO, logger="splitgraph"):
        cfg = load_config([*base, f"run_dir={tmp_path / 'std'}"], fill_data=False)  # as Hydra
        summary = train.run(cfg)
    assert summary is not None and summary["steps"] == 40
    assert "data.features=20, data.outputs=1 read from the file" in caplog.text
    final = summary["final"]
    assert all(math.isfinite(final[k]) for k in ("L", "J"))
    assert math.isfinite(final["test"]["loss"]) and "loss_standardized" in final["test"]
    assert summary["data"]["standardization"]["targets"] is not None
    with pytest.raises(NonFiniteError, match=re.escape("data.standardize=all")):
        train.run(load_config([*base, "data.standardize=none", f"run_dir={tmp_path / 'raw'}"]))
