"""`Plan`: which contiguous layers each pipeline stage owns, and what crosses each cut.

A plan is a small, printable value: the layer specs, the cut points (`bounds`) and the
strategy that chose them. Everything downstream (the schedule, the runtime, the memory
prediction) reads the plan; nothing re-derives where the graph was cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitgraph.config import ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    """Layer `index`: `out_features x in_features` weight (+ bias)."""

    index: int
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def layer_specs(model: ModelConfig) -> tuple[LayerSpec, ...]:
    """Every layer's shape (a whole config may be given for its model section)."""
    from splitgraph.model import layer_dims  # here: the partition package imports no torch

    m = model.model if hasattr(model, "model") else model
    dims = layer_dims(m)
    return tuple(LayerSpec(i, dims[i], dims[i + 1], bool(m.bias)) for i in range(len(dims) - 1))


@dataclass(frozen=True)
class Plan:
    """Stage `s` owns layers `bounds[s] .. bounds[s+1]-1` and runs on rank `s % num_ranks`."""

    layers: tuple[LayerSpec, ...]
    bounds: tuple[int, ...]
    strategy: str
    num_ranks: int

    def __post_init__(self) -> None:
        b, n = self.bounds, len(self.layers)
        if len(b) < 2 or b[0] != 0 or b[-1] != n or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"bounds {b} do not cut {n} layers into non-empty stages")
        if self.num_stages % self.num_ranks:
            raise ValueError(f"{self.num_stages} stages do not spread over {self.num_ranks} ranks")

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def stage_range(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def rank_of(self, stage: int) -> int:
        return stage % self.num_ranks

    def stages_of(self, rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s) == rank]

    @property
    def stage_to_rank(self) -> tuple[int, ...]:
        return tuple(self.rank_of(s) for s in range(self.num_stages))

    def stage_params(self, stage: int) -> int:
        return sum(self.layers[i].params for i in self.stage_range(stage))

    def in_features(self, stage: int) -> int:
        return self.layers[self.bounds[stage]].in_features

    def out_features(self, stage: int) -> int:
        return self.layers[self.bounds[stage + 1] - 1].out_features

    def table(self, microbatch_size: int | None = None) -> str:
        """The plan as a table; boundary shapes per microbatch when its size is given."""
        rows = [("stage", "rank", "layers", "params", "share", "sends forward")]
        total = sum(layer.params for layer in self.layers)
        for s in range(self.num_stages):
            r = self.stage_range(s)
            layers = f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"
            if s == self.num_stages - 1:
                shape = "(loss)"
            else:
                mb = "mb" if microbatch_size is None else str(microbatch_size)
                shape = f"[{mb}, {self.out_features(s)}]"
            p = self.stage_params(s)
            rows.append((str(s), str(self.rank_of(s)), layers, f"{p:,}", f"{p / total:.0%}", shape))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        head = f"plan: {self.strategy}, {self.num_layers} layers on {self.num_stages} stages"
        return head + "\n" + "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "bounds": list(self.bounds),
            "num_ranks": self.num_ranks,
            "stages": [
                {
                    "stage": s,
                    "rank": self.rank_of(s),
                    "layers": [self.stage_range(s).start, self.stage_range(s).stop - 1],
                    "params": self.stage_params(s),
                    "in_features": self.in_features(s),
                    "out_features": self.out_features(s),
                }
                for s in range(self.num_stages)
            ],
        }
