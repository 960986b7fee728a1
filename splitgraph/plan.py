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
    """Stage `s` owns layers `bounds[s] .. bounds[s+1]-1` and runs on rank `rank_of(s)`.

    `placement` is the schedule's stage-to-rank map (`schedule.ir.v_shape` for the V
    schedules: stage s and 2p-1-s on rank s); None is round robin, stage s on rank
    s % num_ranks. Everything that asks which rank holds a stage (the engine, the
    checkpoint's layers, the data loaders, the memory prices, the plan's table) asks here,
    and the engine refuses a schedule whose map differs."""

    layers: tuple[LayerSpec, ...]
    bounds: tuple[int, ...]
    strategy: str
    num_ranks: int
    placement: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        b, n = self.bounds, len(self.layers)
        if len(b) < 2 or b[0] != 0 or b[-1] != n or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"bounds {b} do not cut {n} layers into non-empty stages")
        if self.num_stages % self.num_ranks:
            raise ValueError(f"{self.num_stages} stages do not spread over {self.num_ranks} ranks")
        pl = self.placement
        if pl is not None:
            if len(pl) != self.num_stages or sorted(set(pl)) != list(range(self.num_ranks)):
                raise ValueError(
                    f"placement {list(pl)} does not map {self.num_stages} stages onto all of "
                    f"ranks 0..{self.num_ranks - 1}"
                )
            if tuple(pl) == tuple(s % self.num_ranks for s in range(self.num_stages)):
                object.__setattr__(self, "placement", None)  # one spelling of round robin
            else:
                object.__setattr__(self, "placement", tuple(int(r) for r in pl))

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def stage_range(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def rank_of(self, stage: int) -> int:
        if self.placement is not None:
            return self.placement[stage]
        return stage % self.num_ranks

    @property
    def placement_name(self) -> str:
        """ "round-robin" (stage s on rank s % p), "v" (schedule.ir.v_shape) or "custom"."""
        if self.placement is None:
            return "round-robin"
        p = self.num_ranks  # schedule.ir.v_shape at two chunks per rank (plan.py sits below it)
        if self.placement == tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p)):
            return "v"
        return "custom"

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
        if self.placement is not None:
            head += f", {self.placement_name} placement"
        return head + "\n" + "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "bounds": list(self.bounds),
            "num_ranks": self.num_ranks,
            "placement": self.placement_name,
            "stage_to_rank": list(self.stage_to_rank),
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
