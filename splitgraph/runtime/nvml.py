"""GPU memory and utilisation over time, sampled through NVML in a background thread.

`torch.cuda.max_memory_allocated` says what PyTorch's allocator handed out at its peak; NVML
says what the device really holds (allocator caches, the CUDA context, other processes) and how
busy it is. Both go into the run's summary, side by side. Without a GPU or a driver (or
without `nvidia-ml-py`, imported as `pynvml`), the sampler records nothing and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any


class NvmlSampler:
    """Samples (t, device used bytes, this process's bytes, GPU utilisation %) every `interval`."""

    def __init__(self, device_index: int, interval: float = 0.2, nvml: Any = None) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int, int | None, int | None]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = nvml
        self._handle: Any = None
        self._t0 = time.perf_counter()
        self._pid = os.getpid()
        if interval <= 0:
            self.error = "off (runtime.nvml_interval=0)"
            return
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as e:  # no driver, no GPU, no package: record nothing, say why
            self.error = f"NVML unavailable: {e.__class__.__name__}: {e}"
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def sample(self) -> None:
        nv, h = self._nvml, self._handle
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        mine = None
        try:
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
                if proc.pid == self._pid:
                    mine = int(proc.usedGpuMemory or 0)
        except Exception:
            mine = None  # per-process accounting is not exposed in every container
        try:
            util = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:
            util = None
        self.samples.append((time.perf_counter() - self._t0, int(mem.used), mine, util))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as e:
                self.error = f"sampling stopped: {e}"
                return

    def start(self) -> NvmlSampler:
        if self.available:
            self.sample()
            self._thread = threading.Thread(target=self._loop, name="nvml", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the summary entry for this rank."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self.sample()
        if self._nvml is not None and self._handle is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        if not self.samples:
            return {"samples": 0, "note": self.error or "no samples"}
        return {
            "samples": len(self.samples),
            "device_used_peak_bytes": max(s[1] for s in self.samples),
            "process_peak_bytes": max(
                (s[2] for s in self.samples if s[2] is not None), default=None
            ),
            "utilization_mean_pct": _mean([s[3] for s in self.samples if s[3] is not None]),
            "series": self.samples,
        }


def _mean(xs: list[int]) -> float | None:
    return sum(xs) / len(xs) if xs else None
