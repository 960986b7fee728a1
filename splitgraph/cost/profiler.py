"""Measured costs: each layer's forward and backward time on this device, and the link.

A layer is timed alone, as a stage runs it: forward with autograd recording (the last
layer includes its loss), then backward from a gradient of its output (the input gradient
too, except for layer 0, whose input never needs one). `costs.warmup` untimed runs, then
`costs.repeats` timed ones, of which the median is used (`costs.statistic=min`: the
fastest, steadier when other jobs share the machine). Both are cached on disk per (device,
threads, torch, dtype, microbatch rows, layer shape), so the planner, every rank of a run
and the training report read the same numbers; a file lock makes concurrent processes
measure once.

The link is measured with a ping-pong between two processes (one-way time = half the round
trip, at a small and a large message). Before a run it is this host's gloo loopback (two
spawned processes, cached); after a run, `planner.check.measure_link` measures it between
the run's pipeline ranks 0 and 1 through the engine's own transport: its device, its backend
and channel groups, its staging through host memory when ranks share a GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from splitgraph.config import CostsConfig, ModelConfig, Task
from splitgraph.cost.link import Link
from splitgraph.model import build_mlp, loss_sum


def cache_dir(costs: CostsConfig) -> Path:
    """`costs.cache_dir`, else $SPLITGRAPH_CACHE, else ~/.cache/splitgraph."""
    if costs.cache_dir:
        return Path(costs.cache_dir)
    env = os.environ.get("SPLITGRAPH_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "splitgraph"


def device_name(device: torch.device) -> str:
    """What the timings depend on: the processor (or GPU), its thread count, torch."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        name += f", {torch.get_num_threads()} threads"
    return f"{device.type}: {name}, torch {torch.__version__}"


class _Cache:
    """A JSON dict on disk; `with cache.locked()` serialises measurement across processes."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "profiles.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "profiles.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text()) if self.path.exists() else {}
                before = dict(data)
                yield data
                if data != before:
                    tmp = self.path.with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
                    os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(
    model: ModelConfig,
    costs: CostsConfig,
    index: int,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, float]:
    """Median and fastest forward and backward seconds of layer `index` for `n` rows."""
    module = build_mlp(model, index, index + 1, dtype, device)
    last = module.is_last
    task = Task(model.task)
    gen = torch.Generator().manual_seed(index)
    x = torch.randn(n, module.in_features, generator=gen).to(dtype=dtype, device=device)
    x.requires_grad_(index > 0)
    out_f = module.out_features
    if last and task == Task.classification:
        target = torch.randint(0, out_f, (n,), generator=gen).to(device)
    else:
        target = torch.randn(n, out_f, generator=gen).to(dtype=dtype, device=device)
    grad = torch.randn(n, out_f, generator=gen).to(dtype=dtype, device=device)
    fwd, bwd = [], []
    warmup, repeats = costs.warmup, costs.repeats
    for r in range(warmup + repeats):
        for p in module.parameters():
            p.grad = None
        x.grad = None
        _sync(device)
        t0 = time.perf_counter()
        out = module(x)
        if last:
            out = loss_sum(out, target, task) / n
        _sync(device)
        t1 = time.perf_counter()
        if last:
            out.backward()
        else:
            torch.autograd.backward(out, grad)
        _sync(device)
        t2 = time.perf_counter()
        if r >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return {
        "forward": statistics.median(fwd),
        "backward": statistics.median(bwd),
        "forward_min": min(fwd),
        "backward_min": min(bwd),
        "repeats": repeats,
    }


def _layer_key(m: ModelConfig, index: int, n: int, dtype: torch.dtype, device: torch.device) -> str:
    dims = [int(m.in_features), *(int(h) for h in m.hidden), int(m.out_features)]
    last = index == len(dims) - 2
    role = f"loss={Task(m.task).value}" if last else f"phi={m.activation.value}"
    return (
        f"layer|{device_name(device)}|{str(dtype).removeprefix('torch.')}|n={n}|"
        f"{dims[index]}x{dims[index + 1]}|bias={bool(m.bias)}|{role}|input_grad={index > 0}"
    )


def profile_layers(
    model: ModelConfig, costs: CostsConfig, n: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[float, float]]:
    """(forward, backward) seconds per layer for microbatches of `n` rows (costs.statistic
    of the repeats); cached."""
    dims = [model.in_features, *model.hidden, model.out_features]
    keys = [_layer_key(model, i, n, dtype, device) for i in range(len(dims) - 1)]
    suffix = "_min" if costs.statistic == "min" else ""
    with _Cache(cache_dir(costs)).locked() as data:
        for i, key in enumerate(keys):
            if key not in data or f"forward{suffix}" not in data[key]:
                data[key] = time_layer(model, costs, i, n, dtype, device)
        return [
            (float(data[k][f"forward{suffix}"]), float(data[k][f"backward{suffix}"])) for k in keys
        ]


# -- the link ------------------------------------------------------------------------------

#: Message sizes of the ping-pong: latency from the small one, bandwidth from the difference.
LINK_SIZES = (1 << 10, 16 << 20)


def ping_pong(
    rank: int,
    peer: int,
    repeats: int = 9,
    send: Callable[[torch.Tensor, int], None] | None = None,
    recv: Callable[[torch.Tensor, int], None] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float] | None:
    """One-way seconds per message between `rank` and `peer` (both call it; the lower rank
    starts), as the fastest of `repeats` round trips halved: on a shared machine the median
    measures the scheduler, the minimum the link. Returns {"latency", "bandwidth"} on the
    lower rank, None on the other.

    `send`/`recv` move one tensor to/from the peer and return when it has moved (default:
    `dist.send`/`dist.recv` on the default group); the buffers live on `device`, and on a GPU
    each round trip ends with a synchronize (NCCL's waits return before the data moved)."""
    import torch.distributed as dist

    device = torch.device(device)
    send = send or (lambda t, p: dist.send(t, p))
    recv = recv or (lambda t, p: dist.recv(t, p))
    one_way = []
    for size in LINK_SIZES:
        buf = torch.zeros(size // 4, dtype=torch.float32, device=device)
        times = []
        for r in range(repeats + 2):
            _sync(device)
            t0 = time.perf_counter()
            if rank < peer:
                send(buf, peer)
                recv(buf, peer)
            else:
                recv(buf, peer)
                send(buf, peer)
            _sync(device)
            if r >= 2:
                times.append((time.perf_counter() - t0) / 2)
        one_way.append(min(times))
        del buf
    if rank > peer:
        return None
    (small, big), (n_small, n_big) = one_way, LINK_SIZES
    if big <= small:
        raise RuntimeError(
            f"link measurement is inconsistent ({n_big} bytes took {big:.2e}s, {n_small} bytes "
            f"{small:.2e}s); set pipeline.bandwidth (and pipeline.latency) instead"
        )
    per_byte = (big - small) / (n_big - n_small)
    return {"latency": max(small - n_small * per_byte, 0.0), "bandwidth": 1.0 / per_byte}


def _link_worker(rank: int, world: int) -> dict[str, float] | None:
    return ping_pong(rank, 1 - rank)


def _link_key() -> str:
    return f"link|gloo|{platform.node()}|torch {torch.__version__}"


def cached_link(costs: CostsConfig) -> Link | None:
    """This host's measured gloo link if the cache holds it, else None (measures nothing:
    what schedule=auto reads on every rank)."""
    with _Cache(cache_dir(costs)).locked() as data:
        got = data.get(_link_key())
    if got is None:
        return None
    return Link(
        float(got["bandwidth"]), float(got["latency"]), "measured (gloo, this host; cached)"
    )


def measured_link(costs: CostsConfig) -> Link:
    """This host's gloo loopback (two spawned processes), measured once and cached."""
    from splitgraph.spawn import run_ranks

    key = _link_key()
    with _Cache(cache_dir(costs)).locked() as data:
        if key not in data:
            data[key] = run_ranks(_link_worker, 2, timeout=120)[0]
        got = data[key]
    return Link(float(got["bandwidth"]), float(got["latency"]), "measured (gloo, this host)")
