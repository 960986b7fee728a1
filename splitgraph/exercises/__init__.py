"""The chapter's exercises, each answered by a command (`splitgraph-exercise N [overrides]`).

    1  shapes.py    the gradient of a scalar function of an n x m matrix is an n x m matrix
    2  bias.py      add a bias: forward and backward by hand, checked; the bias is not decayed
    3  memory.py    memory of training vs prediction, predicted and measured, per stage/schedule
    4  hessian.py   Hessian-vector products by double backward: checked, timed, measured
    5  (compare)    the comparison harness: `splitgraph-compare experiment=too_large`

Each module has `run(cfg, ...) -> result` (a dataclass with `to_dict`) and `render(result)`;
`cli.py` composes the config like training does and prints the rendering. docs/exercises.md
walks through all five; results/exercises/ holds the committed outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from splitgraph.config import DataConfig, Workload
from splitgraph.data import BatchOrder, load_dataset


def first_batch(
    data: DataConfig, work: Workload, seed: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Minibatch 0 as training draws it (`BatchOrder(train.seed).indices(0)`), on the CPU."""
    ds = load_dataset(data, work).to(dtype, "cpu")
    order = BatchOrder(ds.num_train, work.batch_size, data.shuffle, seed)
    idx = order.indices(0)
    return ds.X[idx], ds.y[idx]


def table(head: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A plain text table; the columns in `right` are right-aligned (numbers)."""
    widths = [max(len(str(row[c])) for row in [head, *rows]) for c in range(len(head))]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(cell).rjust(w) if c in right else str(cell).ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])
