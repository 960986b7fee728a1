"""Datasets and the deterministic order in which minibatches are drawn.

Only the first stage needs inputs and only the last needs labels; both draw the same
minibatch indices from `BatchOrder`, seeded by (train.seed, epoch), so no rank ever sends
data to another and a run is reproducible from (seed, step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splitgraph.config import DataName, Task
from splitgraph.errors import DataError


@dataclass
class Dataset:
    """Train and held-out test tensors. `y` is int64 class ids or float targets [n, outputs]."""

    X: Tensor
    y: Tensor
    X_test: Tensor
    y_test: Tensor
    name: str

    @property
    def num_train(self) -> int:
        return int(self.X.shape[0])

    def to(self, dtype: torch.dtype, device: torch.device | str) -> Dataset:
        def cast_y(y: Tensor) -> Tensor:
            return y.to(device) if y.dtype == torch.int64 else y.to(dtype=dtype, device=device)

        return Dataset(
            self.X.to(dtype=dtype, device=device),
            cast_y(self.y),
            self.X_test.to(dtype=dtype, device=device),
            cast_y(self.y_test),
            self.name,
        )


def _split(X: Tensor, y: Tensor, test_fraction: float, seed: int, name: str) -> Dataset:
    n = X.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17))
    n_test = int(n * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(X[train], y[train], X[test], y[test], name)


def synthetic(data_cfg: Any, task: Task) -> Dataset:
    """x ~ N(0, I); a fixed random teacher MLP (one tanh hidden layer) makes the targets."""
    g = torch.Generator().manual_seed(int(data_cfg.seed))
    n, d, k, hid = (
        int(data_cfg.samples),
        int(data_cfg.features),
        int(data_cfg.outputs),
        int(data_cfg.teacher_hidden),
    )
    X = torch.randn(n, d, generator=g)
    W1 = torch.randn(hid, d, generator=g) / d**0.5
    W2 = torch.randn(k, hid, generator=g) * (3.0 / hid**0.5)
    out = torch.tanh(X @ W1.T) @ W2.T
    if Task(task) == Task.classification:
        y = out.argmax(dim=1)
    else:
        y = out + float(data_cfg.noise) * torch.randn(n, k, generator=g)
    return _split(X, y, float(data_cfg.test_fraction), int(data_cfg.seed), "synthetic")


def digits(data_cfg: Any, task: Task) -> Dataset:
    """scikit-learn's 8x8 handwritten digits, scaled to [0, 1]: a small real dataset, offline."""
    if Task(task) != Task.classification:
        raise DataError("data=digits is a classification set; set model.task=classification.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError("data=digits needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    X = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _split(X, y, float(data_cfg.test_fraction), int(data_cfg.seed), "digits")


def _read_file(path: Path) -> tuple[Any, Any]:
    if not path.exists():
        raise DataError(f"data.path={str(path)!r} does not exist.")
    if path.suffix not in (".npz", ".pt"):
        raise DataError(f"data.path={str(path)!r}: use a .pt or .npz file holding X and y.")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = {"X", "y"} - set(z.files)
                if missing:
                    raise DataError(
                        f"{path} lacks arrays {sorted(missing)}: it has {sorted(z.files)}."
                    )
                return np.array(z["X"]), np.array(z["y"])
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as e:  # damaged, not this format, or holding objects (never unpickled)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} cannot be read as a {path.suffix} file: {reason}") from e
    if not isinstance(obj, dict) or not {"X", "y"} <= set(obj):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path} must hold a dict with tensors 'X' and 'y'; found {keys}.")
    return obj["X"], obj["y"]


def _as_real_tensor(raw: Any, name: str, path: Path) -> Tensor:
    """A real-valued (float, int or bool) tensor, or a DataError naming what it is instead."""
    try:
        t = torch.as_tensor(raw)
    except Exception as e:
        raise DataError(f"{path}: {name} must be a numeric array; got {type(raw).__name__}.") from e
    if t.is_complex() or t.dtype not in _REAL:
        raise DataError(f"{path}: {name} must hold real numbers; got dtype {t.dtype}.")
    if t.ndim == 0:
        raise DataError(f"{path}: {name} must have one row per sample; got a single number.")
    return t


_REAL = {
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
}


def from_file(data_cfg: Any, task: Task) -> Dataset:
    """A user's `.pt`/`.npz` with X [n, features] and y; every shape and value is checked."""
    path = Path(str(data_cfg.path))
    X_raw, y_raw = _read_file(path)
    X = _as_real_tensor(X_raw, "X", path)
    y = _as_real_tensor(y_raw, "y", path)
    d, k = int(data_cfg.features), int(data_cfg.outputs)
    if X.ndim != 2:
        raise DataError(f"{path}: X must be 2-D [samples, features]; got shape {tuple(X.shape)}.")
    if X.shape[0] == 0:
        raise DataError(f"{path}: X has no samples.")
    if X.shape[1] != d:
        raise DataError(
            f"{path}: X has {X.shape[1]} features but data.features={d}; set "
            f"data.features={X.shape[1]}."
        )
    if y.shape[0] != X.shape[0]:
        raise DataError(f"{path}: X has {X.shape[0]} rows but y has {y.shape[0]}.")
    X = X.to(torch.float32)
    if not torch.isfinite(X).all():
        bad = int((~torch.isfinite(X)).any(dim=1).sum())
        raise DataError(
            f"{path}: X has NaN or infinite values (or values beyond float32's range) in "
            f"{bad} rows; clean them first."
        )
    if y.is_floating_point() and not torch.isfinite(y.to(torch.float32)).all():
        raise DataError(
            f"{path}: y has NaN or infinite values (or values beyond float32's range); "
            "clean them first."
        )
    if Task(task) == Task.classification:
        if y.ndim != 1 or (y.is_floating_point() and not torch.equal(y, y.round())):
            raise DataError(
                f"{path}: classification needs y as [samples] integer class ids; got shape "
                f"{tuple(y.shape)}, dtype {y.dtype}."
            )
        y = y.to(torch.int64)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            raise DataError(
                f"{path}: labels span {lo}..{hi} but data.outputs={k} allows 0..{k - 1}; set "
                f"data.outputs={hi + 1} (labels must be >= 0)."
            )
    else:
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != k:
            raise DataError(
                f"{path}: regression needs y as [samples, {k}] (data.outputs={k}); got shape "
                f"{tuple(y.shape)}."
            )
        y = y.to(torch.float32)
    return _split(X, y, float(data_cfg.test_fraction), int(data_cfg.seed), path.name)


def load_dataset(cfg: Any) -> Dataset:
    """The configured dataset (CPU, float32); raises DataError if it cannot feed this model."""
    name = DataName(cfg.data.name)
    task = Task(cfg.model.task)
    loader = {DataName.synthetic: synthetic, DataName.digits: digits, DataName.file: from_file}
    ds = loader[name](cfg.data, task)
    if ds.num_train < int(cfg.train.batch_size):
        raise DataError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {ds.num_train} training "
            f"samples of data={name.value}; lower the batch or data.test_fraction."
        )
    return ds


class BatchOrder:
    """Which sample indices make minibatch `step`: reproducible from (seed, step) alone.

    Each epoch is a fresh permutation (seeded by seed and epoch) when shuffling; the last
    partial batch of an epoch is dropped so every step has the same shape on every rank.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.n, self.batch, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.steps_per_epoch = num_samples // batch_size
        self._epoch = -1
        self._perm: Tensor | None = None

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
        assert self._perm is not None
        return self._perm[i * self.batch : (i + 1) * self.batch]


def microbatch_sizes(batch_size: int, microbatches: int) -> list[int]:
    """Split a batch into `microbatches` contiguous pieces; the first `batch % m` get one more.

    Uneven pieces keep gradients exact because each microbatch's loss is weighted by its
    share of the batch (see model.loss_sum).
    """
    if not 1 <= microbatches <= batch_size:
        raise ValueError(f"cannot cut a batch of {batch_size} into {microbatches} microbatches")
    q, r = divmod(batch_size, microbatches)
    return [q + 1 if i < r else q for i in range(microbatches)]
