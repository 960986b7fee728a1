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

    def __init__(
        self,
        device_index: int,
        interval: float = 0.2,
        nvml: Any = None,
        uuid: str | None = None,
        environ: Any = None,
    ) -> None:
        """`device_index`: torch's CUDA index; `uuid`: the device's UUID (default: torch's,
        when CUDA is available); `environ`: for CUDA_VISIBLE_DEVICES (default os.environ)."""
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
            uuid = uuid if uuid is not None else torch_uuid(device_index)
            self._handle = nvml_handle(self._nvml, device_index, uuid, environ)
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


def torch_uuid(index: int) -> str | None:
    """The UUID torch reports for its CUDA device `index` (None without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # an old torch without the property: the index mapping serves
        return None


def nvml_handle(nvml: Any, index: int, uuid: str | None = None, environ: Any = None) -> Any:
    """NVML's handle for torch's CUDA device `index`.

    NVML numbers every GPU of the machine; torch numbers the visible ones
    (CUDA_VISIBLE_DEVICES, in CUDA_DEVICE_ORDER), so `index` alone can name another GPU.
    The device's UUID names it exactly; without one, CUDA_VISIBLE_DEVICES maps the index.
    """
    if uuid:
        bare = uuid.removeprefix("GPU-").removeprefix("MIG-")
        errors = []
        for prefix in ("GPU-", "MIG-"):
            try:
                return nvml.nvmlDeviceGetHandleByUUID(prefix + bare)
            except Exception as e:
                errors.append(f"{prefix}{bare}: {e}")
        raise RuntimeError("NVML knows no device " + "; ".join(errors))
    return nvml.nvmlDeviceGetHandleByIndex(physical_index(index, environ))


def physical_index(index: int, environ: Any = None) -> int:
    """The NVML index of torch's device `index` under CUDA_VISIBLE_DEVICES ("3,1": torch's
    device 0 is GPU 3). A UUID entry cannot be mapped without NVML's UUIDs: ValueError."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return index
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(entries):
        raise ValueError(f"device {index} is not visible (CUDA_VISIBLE_DEVICES={visible})")
    entry = entries[index]
    if not entry.isdigit():
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r} is not an index, and torch gave no UUID"
        )
    return int(entry)


def _mean(xs: list[int]) -> float | None:
    return sum(xs) / len(xs) if xs else None
