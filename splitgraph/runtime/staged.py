"""A transport for several ranks sharing one GPU: device tensors staged through host memory.

NCCL refuses two ranks on one GPU ("Duplicate GPU detected") and gloo cannot send CUDA
tensors. So each send copies its device tensor into a pinned host buffer and gloo sends that;
each receive lands in a pinned host buffer and is copied to the device tensor when the
compute that reads it waits for it. Measured elsewhere at about 2.9 GB/s (DESIGN.md); CUDA
IPC into pre-shared device buffers would be some 30 times faster, at the price of handle
exchange and buffer management this runtime does not have yet. Runs that use it say so
(`transport: staged`, `shared_gpu`) because their timings are not those of separate GPUs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from splitgraph.runtime.comm import P2P, Transfer


class _StagedSend:
    """Keeps the host copy alive until gloo has sent it."""

    def __init__(self, work: Any, host: Tensor) -> None:
        self.work, self.host = work, host

    def wait(self) -> bool:
        return bool(self.work.wait())


class _StagedRecv:
    """On wait: the host buffer has arrived; copy it into the device tensor."""

    def __init__(self, work: Any, host: Tensor, device_tensor: Tensor) -> None:
        self.work, self.host, self.device_tensor = work, host, device_tensor

    def wait(self) -> bool:
        self.work.wait()
        # From pinned memory the copy is asynchronous on the current stream, which is where
        # the compute that reads the tensor runs; the host allocator keeps the buffer alive.
        self.device_tensor.copy_(self.host, non_blocking=self.host.is_pinned())
        return True


class StagedP2P(P2P):
    def __init__(self, rank: int, group: Any = None, verbose: bool = False) -> None:
        super().__init__(rank, group, verbose)
        self.pin = torch.cuda.is_available()

    def _host(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.pin)

    def post(self, transfers: list[Transfer]) -> list[Any]:
        staged = []
        for t in transfers:
            host = self._host(t.tensor)
            if t.is_send:
                host.copy_(t.tensor)  # blocking: gloo must read finished data
            staged.append(replace(t, tensor=host))
        works = super().post(staged)
        return [
            _StagedSend(w, s.tensor) if t.is_send else _StagedRecv(w, s.tensor, t.tensor)
            for t, s, w in zip(transfers, staged, works)
        ]
