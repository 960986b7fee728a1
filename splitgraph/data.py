"""Datasets and the deterministic order in which minibatches are drawn.

Only the first stage needs inputs and only the last needs labels; both draw the same
minibatch indices from `BatchOrder`, seeded by (train.seed, epoch), so no rank ever sends
data to another and a run is reproducible from (seed, step).

A user's file (`data=file`, docs/data.md) goes header first (datafile.py), then values:

    header -> problems of shape and dtype, bytes to load    nothing read yet
    values -> labels, X and y gathered into the train/test  chunk by chunk, in the run's dtype
              split and checked finite in that dtype        (float64 runs keep float64 data)
    every problem -> one DataError                          each with its fix
    standardize -> training split's mean/std (float64)      data.standardize
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splitgraph.config import DataConfig, DataName, RuntimeConfig, Standardize, Task, Workload
from splitgraph.datafile import ArrayInfo, FileHeader, read_arrays, read_header
from splitgraph.errors import DataError
from splitgraph.units import format_bytes

#: rows converted per chunk: the loader's working memory stays ~8 MiB beyond its result
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Scaling:
    """Standardization applied to a dataset: per-column mean and std (float64) of the
    training split, for the inputs and (regression) the targets; None where not applied.

    A prediction in the file's units is `o * y_std + y_mean`; inputs given to a trained
    model must first become `(x - x_mean) / x_std`. Columns with std 0 are only centred.
    """

    x_mean: Tensor | None = None
    x_std: Tensor | None = None
    y_mean: Tensor | None = None
    y_std: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        def pair(mean: Tensor | None, std: Tensor | None) -> dict[str, list[float]] | None:
            if mean is None or std is None:
                return None
            return {"mean": mean.tolist(), "std": std.tolist()}

        return {
            "inputs": pair(self.x_mean, self.x_std),
            "targets": pair(self.y_mean, self.y_std),
        }


@dataclass
class Dataset:
    """Train and held-out test tensors. `y` is int64 class ids or float targets [n, outputs].

    X (and float y) are in the run's data dtype (`data_dtype`): a float64 file in a float64
    run keeps every bit. `scaling` says what standardization made them (None: raw values).
    """

    X: Tensor
    y: Tensor
    X_test: Tensor
    y_test: Tensor
    name: str
    scaling: Scaling | None = None

    @property
    def num_train(self) -> int:
        return int(self.X.shape[0])

    @property
    def target_std(self) -> Tensor | None:
        """Per-target std that turns standardized regression errors into the file's units."""
        return self.scaling.y_std if self.scaling is not None else None

    def to(self, dtype: torch.dtype, device: torch.device | str) -> Dataset:
        def cast_y(y: Tensor) -> Tensor:
            return y.to(device) if y.dtype == torch.int64 else y.to(dtype=dtype, device=device)

        return Dataset(
            self.X.to(dtype=dtype, device=device),
            cast_y(self.y),
            self.X_test.to(dtype=dtype, device=device),
            cast_y(self.y_test),
            self.name,
            self.scaling,
        )

    def describe(self) -> str:
        """One line for the log: sizes, dtype, and what was standardized."""
        s = self.scaling
        done = []
        if s is not None and s.x_mean is not None:
            done.append("inputs")
        if s is not None and s.y_mean is not None:
            done.append("targets")
        std = (
            f"; standardized {' and '.join(done)} with the training split's mean and std"
            if done
            else ""
        )
        if s is not None and s.y_std is not None:
            std += " (test losses in the targets' own units)"
        return (
            f"data {self.name}: {self.num_train:,} training + {int(self.X_test.shape[0]):,} "
            f"test samples x {int(self.X.shape[1])} features, "
            f"{str(self.X.dtype).removeprefix('torch.')}{std}"
        )

    def record(self) -> dict[str, Any]:
        """What summary.json says about the data: sizes, dtype, standardization."""
        return {
            "name": self.name,
            "train_samples": self.num_train,
            "test_samples": int(self.X_test.shape[0]),
            "features": int(self.X.shape[1]),
            "dtype": str(self.X.dtype).removeprefix("torch."),
            "standardization": self.scaling.to_dict() if self.scaling is not None else None,
        }


def data_dtype(runtime: RuntimeConfig) -> torch.dtype:
    """The dtype data is held in: the run's parameter dtype (float64 runs keep float64 data;
    float32 and bf16-autocast runs hold float32)."""
    from splitgraph.model import torch_dtype

    return torch_dtype(runtime.dtype)


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17))
    n_test = int(n * test_fraction)
    return perm[n_test:], perm[:n_test]


def _split(X: Tensor, y: Tensor, test_fraction: float, seed: int, name: str) -> Dataset:
    train, test = _split_indices(X.shape[0], test_fraction, seed)
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


# -- user files: header, shape, values ---------------------------------------------------

_FIX_KIND = {
    "text": "holds text (dtype {dtype}), not numbers: convert it before saving, e.g. "
    "{name}.astype(np.float32), or encode categories as numbers",
    "object": "holds Python objects (dtype {dtype}), which splitgraph never unpickles: save a "
    "numeric array",
    "complex": "must hold real numbers; got dtype {dtype}",
    "other": "must hold numbers; got dtype {dtype}",
}


def _kind_problem(a: ArrayInfo) -> str | None:
    """Why array `a` cannot be read as numbers, or None."""
    if a.shape is None:
        return f"{a.name} must be an array of numbers (a tensor in a .pt); got a {a.what}."
    if a.kind in _FIX_KIND:
        return f"{a.name} " + _FIX_KIND[a.kind].format(dtype=a.dtype, name=a.name) + "."
    if not a.shape:
        return f"{a.name} must have one row per sample; got a single number."
    return None


def header_problems(
    header: FileHeader, features: int | None, outputs: int | None, task: Task
) -> list[str]:
    """Every problem the file's header shows for this model (None: not configured, any fits).

    An empty list means X and y can be read as numbers of the right shapes; values (NaN,
    labels) are checked when they are read.
    """
    missing = [n for n in ("X", "y") if n not in header.names]
    if missing:
        return [f"lacks arrays {missing}: it has {sorted(header.names)}."]
    X, y = header.arrays["X"], header.arrays["y"]
    out = [p for p in (_kind_problem(X), _kind_problem(y)) if p]
    x_ok = X.shape is not None and X.kind not in _FIX_KIND and len(X.shape) >= 1
    y_ok = y.shape is not None and y.kind not in _FIX_KIND and len(y.shape) >= 1
    if x_ok:
        assert X.shape is not None
        if len(X.shape) != 2:
            out.append(f"X must be 2-D [samples, features]; got shape {X.shape}.")
        elif X.shape[0] == 0:
            out.append("X has no samples.")
        elif features is not None and X.shape[1] != features:
            out.append(
                f"X has {X.shape[1]} features but data.features={features}; set "
                f"data.features={X.shape[1]} (or null: data=file reads it from the file)."
            )
    if x_ok and y_ok:
        assert X.shape is not None and y.shape is not None
        if y.shape[0] != X.shape[0]:
            out.append(f"X has {X.shape[0]} rows but y has {y.shape[0]}.")
    if y_ok:
        assert y.shape is not None
        if Task(task) == Task.classification and len(y.shape) != 1:
            out.append(
                f"classification needs y as [samples] integer class ids; got shape {y.shape}, "
                f"dtype {y.dtype} (for targets, set model.task=regression)."
            )
        elif Task(task) == Task.regression:
            k = y.shape[1] if len(y.shape) == 2 else 1 if len(y.shape) == 1 else None
            if k is None:
                out.append(f"regression needs y as [samples, outputs]; got shape {y.shape}.")
            elif outputs is not None and k != outputs:
                out.append(
                    f"regression needs y as [samples, {outputs}] (data.outputs={outputs}); "
                    f"got shape {y.shape}: set data.outputs={k} (or null: read from the file)."
                )
    return out


def _readable(header: FileHeader) -> bool:
    """Whether X and y exist and are arrays of real numbers with rows (values can be read)."""
    arrays = [header.get("X"), header.get("y")]
    return all(a is not None and _kind_problem(a) is None for a in arrays)


def load_bytes(header: FileHeader, dtype: torch.dtype, task: Task) -> int:
    """Bytes one process holds at most while loading: X and y as read from the file (unless
    mapped onto it), plus the run's train/test copy of them in `dtype` (int64 labels)."""
    es = torch.empty((), dtype=dtype).element_size()
    X, y = header.get("X"), header.get("y")
    held = 0
    for a in (X, y):
        if a is not None and (not header.mapped or a.layout != "strided"):
            held += a.nbytes  # decompressed (.npz), read whole, or densified (sparse)
    copy = (X.numel if X is not None else 0) * es
    if y is not None:
        copy += y.numel * (8 if Task(task) == Task.classification else es)
    return held + copy


def _problem_error(path: Path, problems: list[str]) -> DataError:
    if len(problems) == 1:
        return DataError(f"{path}: {problems[0]}")
    lines = "\n".join(f"  - {p}" for p in problems)
    return DataError(f"{path} cannot be trained on ({len(problems)} problems):\n{lines}")


def _as_numpy(raw: Any) -> np.ndarray:
    """y as a numpy array (labels and targets are small; bf16 and sparse made plain)."""
    if isinstance(raw, np.ndarray):
        return raw
    t = raw.to_dense() if raw.layout != torch.strided else raw
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _labels(raw: Any, outputs: int | None) -> tuple[Tensor | None, list[str], int | None]:
    """Classification targets as int64 class ids; (ids or None, problems, classes found)."""
    y = _as_numpy(raw)
    problems: list[str] = []
    if y.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(y)
        if not finite.all():
            problems.append(f"y has NaN or infinite labels in {int((~finite).sum())} rows.")
            return None, problems, None
        if not np.array_equal(y, np.round(y)):
            example = y[y != np.round(y)].flat[0]
            problems.append(
                f"classification needs y as integer class ids; found fractional values "
                f"(e.g. {example:g})."
            )
            return None, problems, None
    lo, hi = (int(y.min()), int(y.max())) if y.size else (0, -1)
    if lo < 0:
        negative = int((y < 0).sum())
        problems.append(
            f"labels must be class ids >= 0; found {lo} (in {negative} rows). Map the "
            "classes to 0..C-1."
        )
    if outputs is not None and hi >= outputs:
        problems.append(
            f"labels go up to {hi} but data.outputs={outputs} allows 0..{outputs - 1}; set "
            f"data.outputs={hi + 1} (or null: read from the file)."
        )
    if problems:
        return None, problems, None
    return torch.from_numpy(y.astype(np.int64, copy=False)), [], hi + 1


def _gather_rows(raw: Any, idx: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Rows `idx` of a 2-D array or tensor, converted to `dtype` chunk by chunk (no full
    intermediate copy); returns (rows, how many rows hold a value that is NaN or infinite
    in `dtype`, such as 1e39 in float32)."""
    cols = int(raw.shape[1])
    out = torch.empty((len(idx), cols), dtype=dtype)
    np_dtype = out.numpy().dtype if dtype != torch.bfloat16 else None
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    bad = 0
    rows = idx.numpy()
    for i in range(0, len(rows), step):
        sel = rows[i : i + step]
        if isinstance(raw, np.ndarray):
            with np.errstate(over="ignore", invalid="ignore"):
                part = torch.from_numpy(np.asarray(raw[sel], dtype=np_dtype))
        else:
            part = raw[torch.from_numpy(sel)].to(dtype)
        bad += int((~torch.isfinite(part)).any(dim=1).sum())
        out[i : i + step] = part
    return out, bad


def _non_finite(name: str, raw: Any, bad_rows: int, dtype: torch.dtype) -> str:
    """Why rows of `name` are not finite in `dtype`: NaN/inf in the file, or values beyond
    the run dtype's range (1e39 is finite in float64 and infinite in float32)."""
    in_file = 0
    for i in range(0, int(raw.shape[0]), 1 << 16):  # only on this error path
        part = _as_numpy(raw[i : i + (1 << 16)])
        if part.dtype.kind == "f":  # integers and bools are always finite
            in_file += int((~np.isfinite(part)).reshape(len(part), -1).any(axis=1).sum())
    run = str(dtype).removeprefix("torch.")
    if in_file == bad_rows:
        return f"{name} has NaN or infinite values in {bad_rows} rows; clean them first."
    beyond = bad_rows - in_file
    also = f" ({in_file} more rows hold NaN or infinity)" if in_file else ""
    return (
        f"{name} has values beyond {run}'s range (|x| > {torch.finfo(dtype).max:.3g}) in "
        f"{beyond} rows{also}: rescale them, or keep them with runtime.dtype=float64."
    )


def _column_stats(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column mean and population std in float64, summed chunk by chunk in a fixed
    order: every rank that loads the file gets the same bits, whatever its thread count.
    A column with std 0 gets std 1 (it is only centred)."""
    cols = int(t.shape[1])
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    n = int(t.shape[0])
    total = np.zeros(cols, dtype=np.float64)
    for i in range(0, n, step):
        total += t[i : i + step].numpy().astype(np.float64).sum(axis=0)
    mean = total / max(n, 1)
    sq = np.zeros(cols, dtype=np.float64)
    for i in range(0, n, step):
        sq += np.square(t[i : i + step].numpy().astype(np.float64) - mean).sum(axis=0)
    std = np.sqrt(sq / max(n, 1))
    std[std == 0] = 1.0
    return torch.from_numpy(mean), torch.from_numpy(std)


def _standardize_(t: Tensor, mean: Tensor, std: Tensor) -> None:
    """t = (t - mean) / std in place, computed in float64 and rounded once to t's dtype."""
    cols = int(t.shape[1])
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    m, s = mean.numpy(), std.numpy()
    for i in range(0, int(t.shape[0]), step):
        part = t[i : i + step]
        part.copy_(torch.from_numpy((part.numpy().astype(np.float64) - m) / s))


def standardized(data_cfg: Any, task: Task) -> tuple[bool, bool]:
    """(inputs, targets): what `data.standardize` standardizes for this data set and task.

    auto: a user's file (data=file) gets its inputs and, for regression, its targets
    standardized; the built-in sets are already on a unit scale and stay raw."""
    mode = Standardize(data_cfg.standardize)
    regression = Task(task) == Task.regression
    if mode == Standardize.auto:
        is_file = DataName(data_cfg.name) == DataName.file
        return is_file, is_file and regression
    if mode == Standardize.none:
        return False, False
    return True, mode == Standardize.all and regression


def apply_standardization(ds: Dataset, data_cfg: Any, task: Task) -> Dataset:
    """Standardize in place with the training split's statistics (never the test split's)."""
    inputs, targets = standardized(data_cfg, task)
    if not (inputs or targets) or ds.num_train == 0:
        return ds
    scaling = Scaling()
    if inputs:
        x_mean, x_std = _column_stats(ds.X)
        for t in (ds.X, ds.X_test):
            _standardize_(t, x_mean, x_std)
        scaling = Scaling(x_mean, x_std)
    if targets:
        y_mean, y_std = _column_stats(ds.y)
        for t in (ds.y, ds.y_test):
            _standardize_(t, y_mean, y_std)
        scaling = Scaling(scaling.x_mean, scaling.x_std, y_mean, y_std)
    ds.scaling = scaling
    return ds


def from_file(
    data_cfg: Any,
    task: Task,
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
    bound: str = "",
) -> Dataset:
    """A user's `.pt`/`.npz` with X [n, features] and y, in `dtype` (float labels: int64).

    The header is read first and checked against the model and against `limit` (bytes this
    process may spend loading; `bound` says where it comes from); then the values, in one
    pass that converts them. Every problem found is listed in one DataError naming the file
    and the fix.
    """
    path = Path(str(data_cfg.path))
    header = read_header(path, limit)
    d, k = data_cfg.features, data_cfg.outputs
    problems = header_problems(header, d, k, task)
    need = load_bytes(header, dtype, task)
    if limit is not None and need > limit:
        raise DataError(too_big_message(header, need, 1, limit, dtype, bound))
    if not _readable(header):
        raise _problem_error(path, problems)
    X_raw, y_raw = read_arrays(header)
    X_info, y_info = header.arrays["X"], header.arrays["y"]
    assert X_info.shape is not None and y_info.shape is not None
    if X_info.layout != "strided":  # a sparse X: the MLP consumes dense rows
        X_raw = X_raw.to_dense()
    n = X_info.shape[0]
    shapes_ok = len(X_info.shape) == 2 and n > 0 and y_info.shape[0] == n
    classify = Task(task) == Task.classification
    labels: Tensor | None = None
    if classify and len(y_info.shape) == 1:
        labels, more, _ = _labels(y_raw, k)
        problems += more
    if not shapes_ok:
        raise _problem_error(path, problems)
    train, test = _split_indices(n, float(data_cfg.test_fraction), int(data_cfg.seed))
    X_train, bad_train = _gather_rows(X_raw, train, dtype)
    X_test, bad_test = _gather_rows(X_raw, test, dtype)
    if bad_train + bad_test:
        problems.append(_non_finite("X", X_raw, bad_train + bad_test, dtype))
    if classify:
        y_train = labels[train] if labels is not None else None
        y_test = labels[test] if labels is not None else None
    else:
        y2 = y_raw.reshape(n, -1) if len(y_info.shape) == 1 else y_raw
        if y_info.layout != "strided":
            y2 = y2.to_dense()
        y_train, bad_y = _gather_rows(y2, train, dtype)
        y_test, bad_y_test = _gather_rows(y2, test, dtype)
        if bad_y + bad_y_test:
            problems.append(_non_finite("y", y2, bad_y + bad_y_test, dtype))
    if problems:
        raise _problem_error(path, problems)
    assert y_train is not None and y_test is not None
    return Dataset(X_train, y_train, X_test, y_test, path.name)


def too_big_message(
    header: FileHeader, per_rank: int, ranks: int, limit: int, dtype: torch.dtype, machine: str = ""
) -> str:
    """The refusal of a file whose arrays would take more memory than the bound allows."""
    arrays = "; ".join(a.describe() for n, a in header.arrays.items() if n in ("X", "y"))
    declared = header.declared_bytes()
    ratio = declared / max(header.file_bytes, 1)
    packed = f", {ratio:,.0f}:1 compressed" if ratio >= 10 else ""
    who = (
        f"about {format_bytes(per_rank)} for each of the {ranks} ranks on this node that hold "
        f"the first or last stage ({format_bytes(per_rank * ranks)})"
        if ranks > 1
        else f"about {format_bytes(per_rank)}"
    )
    bound = machine or "data.max_memory"
    return (
        f"{header.path} declares {arrays} in a file of {format_bytes(header.file_bytes)}"
        f"{packed}. Loading it takes {who} (the arrays as read + the run's "
        f"{str(dtype).removeprefix('torch.')} copy), over the data bound of "
        f"{format_bytes(limit)} ({bound}). Refused before reading the arrays: use a smaller "
        "file, or fewer ranks holding data on one node; if the machine can hold it, raise "
        "data.max_memory."
    )


def fill_shape_from_file(d: DataConfig, task: Task | str, runtime: RuntimeConfig) -> str | None:
    """data=file: set data.features and data.outputs from the file where they are null (the
    model's in and out features follow them); `task`: model.task, how labels are read.

    Reads the header (and, for classification, the labels: outputs = largest label + 1),
    after checking that this process could load the file at all. Returns a line saying what
    was found (None: nothing to fill). Raises DataError listing every problem of the file.
    """
    if DataName(d.name) != DataName.file or not d.path:
        return None
    if d.features is not None and d.outputs is not None:
        return None
    from splitgraph.reliability.preflight import bound_name, data_limit

    task = Task(task)
    path = Path(str(d.path))
    limit = data_limit(d)
    header = read_header(path, limit)

    def refuse(problems: list[str]) -> DataError:
        """The whole file's problems (values too), as loading it would list them."""
        from_file(d, task, data_dtype(runtime), limit, bound_name(d))
        return _problem_error(path, problems)

    need = load_bytes(header, data_dtype(runtime), task)
    if need > limit:  # a file too big to load is refused before any of it is read
        raise DataError(too_big_message(header, need, 1, limit, data_dtype(runtime), bound_name(d)))
    problems = header_problems(header, d.features, d.outputs, task)
    if problems:
        raise refuse(problems)
    X, y = header.arrays["X"], header.arrays["y"]
    assert X.shape is not None and y.shape is not None
    features = X.shape[1]
    if task == Task.classification:
        (y_raw,) = read_arrays(header, ("y",))
        _, problems, classes = _labels(y_raw, d.outputs)
        if problems:
            raise refuse(problems)
        assert classes is not None
        outputs, what = classes, f"labels 0..{classes - 1}"
    else:
        outputs = y.shape[1] if len(y.shape) == 2 else 1
        what = f"{outputs} target{'s' if outputs > 1 else ''}"
    found = []
    if d.features is None:
        d.features = features
        found.append(f"data.features={features}")
    if d.outputs is None:
        d.outputs = outputs
        found.append(f"data.outputs={outputs}")
    return (
        f"data: {path.name}: {X.describe()}, {y.describe()} ({what}): "
        f"{', '.join(found)} read from the file"
    )


def load_dataset(d: DataConfig, work: Workload) -> Dataset:
    """The data section's dataset for this workload (CPU, in `data_dtype(work.runtime)`,
    standardized as `data.standardize` says); raises DataError if it cannot feed the model
    (its task) or fill one batch."""
    name = DataName(d.name)
    task = Task(work.model.task)
    dtype = data_dtype(work.runtime)
    if name == DataName.file:
        from splitgraph.reliability.preflight import bound_name, data_limit

        ds = from_file(d, task, dtype, data_limit(d), bound_name(d))
    else:
        loader = {DataName.synthetic: synthetic, DataName.digits: digits}
        ds = loader[name](d, task).to(dtype, "cpu")
    if ds.num_train < work.batch_size:
        raise DataError(
            f"train.batch_size={work.batch_size} exceeds the {ds.num_train} training "
            f"samples of data={name.value}; lower the batch or data.test_fraction."
        )
    return apply_standardization(ds, d, task)


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


def replica_rows(indices: Tensor, replica: int, replicas: int) -> Tensor:
    """Data-parallel replica `replica`'s share of a minibatch: rows [d*B/dp, (d+1)*B/dp).

    Contiguous slices of the same `BatchOrder` indices, so the replicas together cover the
    minibatch exactly once and the sharding depends only on (step, dp), never on the ranks.
    """
    n = int(indices.shape[0])
    if replicas < 1 or not 0 <= replica < replicas or n % replicas:
        raise ValueError(
            f"cannot give replica {replica} of {replicas} an equal share of {n} rows: the batch "
            "must be divisible by parallel.dp"
        )
    share = n // replicas
    return indices[replica * share : (replica + 1) * share]
