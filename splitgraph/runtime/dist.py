"""Process-group set-up: which device and backend a rank uses, with a timeout on every wait."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from splitgraph.config import Backend, Device, DType

DTYPES = {
    DType.float32: torch.float32,
    DType.float64: torch.float64,
    DType.bfloat16: torch.bfloat16,
}


def torch_dtype(name: DType | str) -> torch.dtype:
    return DTYPES[DType(name) if not isinstance(name, DType) else name]


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells each process (defaults: one process, rank 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @staticmethod
    def from_environ() -> DistEnv:
        return DistEnv(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def resolve_device(runtime_cfg: Any, local_rank: int) -> torch.device:
    """auto: this rank's GPU (cuda:LOCAL_RANK) when CUDA is present, else the CPU."""
    want = Device(runtime_cfg.device)
    if want == Device.cpu or (want == Device.auto and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "runtime.device=cuda but torch sees no CUDA device; use runtime.device=cpu"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: this node has {count}. Launch at "
            f"most {count} processes per node (--nproc-per-node {count})."
        )
    return torch.device("cuda", local_rank)


def resolve_backend(runtime_cfg: Any, device: torch.device) -> str:
    """auto: NCCL for CUDA tensors, gloo for CPU tensors."""
    want = Backend(runtime_cfg.backend)
    if want == Backend.auto:
        return "nccl" if device.type == "cuda" else "gloo"
    return want.value


def init_process_group(backend: str, timeout_s: float, device: torch.device) -> None:
    """torchrun's env:// rendezvous with a timeout that bounds every collective and p2p wait."""
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
