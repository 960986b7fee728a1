"""Exact accounting of the bytes autograd saves for backward, via saved-tensor hooks.

Activation memory is what pipeline schedules trade in, so it is counted, not estimated:
every tensor autograd saves passes through `pack`, is counted once per distinct view
(a ReLU output saved by the ReLU and by the next matmul is one tensor), and is uncounted
when autograd drops it. Parameters (and views of them, like `W.t()`) are not activations
and are skipped. The figure is deterministic, so a memory model can predict it exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class _Packed:
    """What autograd stores instead of the tensor; its death releases the bytes."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: Tensor, key: tuple[Any, ...], meter: SavedTensorMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorMeter:
    """Counts live saved-for-backward bytes on this rank; `peak` is the high-water mark.

    Use as a context manager around forward passes. Tensors kept for backward outside
    autograd (recomputation inputs, deferred weight-gradient operands) are added with
    `hold`/`drop` under the same identity, so a tensor held and saved counts once.
    """

    def __init__(self, params: Iterable[Tensor] = ()) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}
        self._live: dict[tuple[Any, ...], list[int]] = {}
        self.current = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset_peak(self) -> None:
        self.peak = self.current

    @staticmethod
    def _key(t: Tensor) -> tuple[Any, ...]:
        # Every saved tensor passes here, so the key is as cheap as exactness allows: no
        # device (CPU and CUDA pointers share one address space), torch.Size as it comes.
        return (t.data_ptr(), t.shape, t.stride(), t.dtype)

    def _add(self, t: Tensor) -> tuple[Any, ...]:
        key = self._key(t)
        entry = self._live.get(key)
        if entry is None:
            nbytes = t.nbytes
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        return key

    def _pack(self, t: Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self._param_storages:
            return t
        return _Packed(t, self._add(t), self)

    @staticmethod
    def _unpack(p: Any) -> Tensor:
        return p.tensor if isinstance(p, _Packed) else p

    def _release(self, key: tuple[Any, ...]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self.current -= entry[1]

    def hold(self, t: Tensor) -> None:
        """Count a tensor kept for a later backward outside autograd (a recomputation's
        stage input, a deferred weight gradient's operands); once, like a saved tensor."""
        self._add(t)

    def drop(self, t: Tensor) -> None:
        self._release(self._key(t))

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cuda_memory(device: torch.device) -> dict[str, int]:
    """torch.cuda's peak allocated and reserved bytes on `device` (empty off CUDA)."""
    if device.type != "cuda":
        return {}
    return {
        "max_allocated": int(torch.cuda.max_memory_allocated(device)),
        "max_reserved": int(torch.cuda.max_memory_reserved(device)),
    }


def draw_memory_over_time(per_rank: list[dict[str, Any]], path: Any) -> Any:
    """GPU memory (NVML) over time per rank, as `memory.png`; nothing without samples."""
    series = [(m["rank"], m.get("nvml", {}).get("series") or []) for m in per_rank]
    if not any(s for _, s in series):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for rank, s in series:
        if s:
            ax.plot([p[0] for p in s], [p[1] / 2**30 for p in s], label=f"rank {rank} device")
            mine = [(p[0], p[2] / 2**30) for p in s if p[2] is not None]
            if mine:
                ax.plot(*zip(*mine), linestyle="--", label=f"rank {rank} process")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("GiB (NVML)")
    ax.set_title("GPU memory over time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
