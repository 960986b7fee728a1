"""The MLP (names, initialisation, slices) and the data path (loaders, order, microbatches)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from splitgraph.config import Workload, load_config
from splitgraph.data import BatchOrder, load_dataset, microbatch_sizes
from splitgraph.errors import DataError
from splitgraph.model import add_l2_grad_, build_mlp, l2_term

SMALL = [
    "model.hidden=[5,7,4]",
    "data.features=6",
    "data.outputs=3",
    "data.samples=64",
    "train.batch_size=8",
]


def test_parameter_names_are_global_whatever_the_slice() -> None:
    cfg = load_config(SMALL + ["model.bias=true"])
    full = build_mlp(cfg)
    assert list(full.state_dict()) == [
        f"layers.{i}.{k}" for i in range(4) for k in ("weight", "bias")
    ]
    tail = build_mlp(cfg, 2, 4)
    assert list(tail.state_dict()) == [
        "layers.2.weight",
        "layers.2.bias",
        "layers.3.weight",
        "layers.3.bias",
    ]
    for k, v in tail.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k  # same seeded weights


def test_no_bias_by_default_and_output_layer_has_no_activation() -> None:
    cfg = load_config(SMALL)
    m = build_mlp(cfg)
    assert all(layer.bias is None for layer in m.layers.values())
    assert m.layers["3"].activation is None and m.layers["0"].activation is not None


def test_slices_compose_to_the_whole_model() -> None:
    cfg = load_config(SMALL + ["model.activation=gelu", "model.bias=true"])
    x = torch.randn(5, 6)
    full = build_mlp(cfg, dtype=torch.float64)
    parts = [build_mlp(cfg, a, b, dtype=torch.float64) for a, b in ((0, 1), (1, 3), (3, 4))]
    y = x.double()
    for p in parts:
        y = p(y)
    assert torch.equal(y, full(x.double()))


def test_l2_term_touches_weights_only() -> None:
    cfg = load_config(SMALL + ["model.bias=true"])
    m = build_mlp(cfg, dtype=torch.float64)
    expect = 0.05 * sum(m.layers[str(i)].weight.detach().pow(2).sum() for i in range(4))
    assert float(l2_term(m, 0.1)) == pytest.approx(float(expect))
    add_l2_grad_(m, 0.1)
    for layer in m.layers.values():
        assert torch.allclose(layer.weight.grad, 0.1 * layer.weight)
        assert layer.bias.grad is None


def test_microbatch_sizes() -> None:
    assert microbatch_sizes(12, 8) == [2, 2, 2, 2, 1, 1, 1, 1]
    assert microbatch_sizes(256, 4) == [64] * 4
    with pytest.raises(ValueError):
        microbatch_sizes(3, 4)


def test_batch_order_is_reproducible_and_drops_the_partial_batch() -> None:
    a, b = BatchOrder(10, 3, True, 0), BatchOrder(10, 3, True, 0)
    assert a.steps_per_epoch == 3
    seen = torch.cat([a.indices(i) for i in range(3)])
    assert len(set(seen.tolist())) == 9
    assert torch.equal(a.indices(4), b.indices(4))
    assert not torch.equal(a.indices(0), a.indices(3))  # a new permutation each epoch
    assert torch.equal(BatchOrder(10, 3, False, 0).indices(1), torch.tensor([3, 4, 5]))


def test_synthetic_is_deterministic_and_split() -> None:
    cfg = load_config(SMALL)
    d1, d2 = load_dataset(cfg.data, Workload.of(cfg)), load_dataset(cfg.data, Workload.of(cfg))
    assert torch.equal(d1.X, d2.X) and torch.equal(d1.y, d2.y)
    assert d1.X.shape == (58, 6) and d1.X_test.shape == (6, 6)
    assert d1.y.dtype == torch.int64 and int(d1.y.max()) < 3


def test_digits_dataset() -> None:
    ds = _load(load_config(["data=digits"]))
    assert ds.X.shape[1] == 64 and ds.num_train + ds.X_test.shape[0] == 1797
    assert float(ds.X.max()) <= 1.0


def _load(cfg: Any) -> Any:
    """The dataset as the entrances load it: the data section, for the config's workload."""
    return load_dataset(cfg.data, Workload.of(cfg))


def _file_cfg(path: Path, *extra: str) -> object:
    return load_config(
        [
            "data=file",
            f"data.path={path}",
            "data.features=3",
            "data.outputs=2",
            "train.batch_size=4",
            *extra,
        ]
    )


def test_file_loader_npz_and_pt(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", X=X, y=y)
    torch.save({"X": torch.tensor(X), "y": torch.tensor(y)}, tmp_path / "d.pt")
    for name in ("d.npz", "d.pt"):
        ds = _load(_file_cfg(tmp_path / name))
        assert ds.num_train == 18 and ds.y.dtype == torch.int64


@pytest.mark.parametrize(
    ("X", "y", "needle"),
    [
        (np.zeros((10, 4)), np.zeros(10), "X has 4 features but data.features=3"),
        (np.zeros((10, 3)), np.zeros(9), "X has 10 rows but y has 9"),
        (np.full((10, 3), np.nan), np.zeros(10), "NaN"),
        (np.zeros((10, 3)), np.arange(10), "labels go up to 9 but data.outputs=2"),
        (np.zeros((10, 3)), -np.ones(10), "labels must be class ids >= 0; found -1"),
        (np.zeros((10, 3)), np.full(10, 0.5), "integer class ids"),
        (np.zeros(10), np.zeros(10), "X must be 2-D"),
    ],
)
def test_file_loader_refuses_bad_data(
    tmp_path: Path, X: np.ndarray, y: np.ndarray, needle: str
) -> None:
    np.savez(tmp_path / "bad.npz", X=X, y=y)
    with pytest.raises(DataError, match=re.escape(needle)):
        _load(_file_cfg(tmp_path / "bad.npz"))


def test_file_loader_refuses_missing_and_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _load(_file_cfg(tmp_path / "nope.npz"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"\.pt or \.npz"):
        _load(_file_cfg(tmp_path / "x.csv"))
    np.savez(tmp_path / "k.npz", A=np.zeros(3))
    with pytest.raises(DataError, match="lacks arrays"):
        _load(_file_cfg(tmp_path / "k.npz"))
    torch.save([1, 2], tmp_path / "l.pt")
    with pytest.raises(DataError, match="dict with tensors"):
        _load(_file_cfg(tmp_path / "l.pt"))


def test_regression_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "r.npz", X=np.zeros((10, 3)), y=np.zeros((10, 2)))
    ds = _load(_file_cfg(tmp_path / "r.npz", "model.task=regression"))
    assert ds.y.shape == (9, 2) and ds.y.dtype == torch.float32
    np.savez(tmp_path / "r2.npz", X=np.zeros((10, 3)), y=np.zeros((10, 5)))
    with pytest.raises(DataError, match=r"\[samples, 2\]"):
        _load(_file_cfg(tmp_path / "r2.npz", "model.task=regression"))


def test_byte_sizes() -> None:
    from splitgraph.units import format_bytes, parse_bytes

    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("64 MiB") == 64 * 2**20
    assert parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1e9") == 10**9 and parse_bytes(123) == 123
    assert format_bytes(3 * 2**20) == "3.0 MiB" and format_bytes(12) == "12 B"
    for bad in ("12 parsecs", "", "-1", "GiB"):
        with pytest.raises(ValueError, match="not a byte size"):
            parse_bytes(bad)
