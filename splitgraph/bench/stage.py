"""Does a pipeline stage run its layers as fast as plain PyTorch? One device, same layers.

    python -m splitgraph.bench.stage                                   # CPU, small
    python -m splitgraph.bench.stage --device cuda --dtype bfloat16 \\
        model.hidden=[8192,8192,8192,8192] data.features=8192 train.batch_size=8192

Times one training step of the same MLP, batch and precision three ways, alternating:
plain PyTorch (`nn.Sequential` of `nn.Linear` + activation, autocast for bf16, forward,
cross-entropy, backward), and splitgraph's `PipelineEngine` on one rank (one stage, one
microbatch: the executor, the saved-tensor meter and the tracer on the path) with the memory
meter on and off. CUDA events on GPU, the wall clock on CPU; medians of `--repeats` after
`--warmup`. Prints the ratios (splitgraph / plain); the acceptance line is 1.10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitgraph.config import Workload, load_config
from splitgraph.model import compute_dtype, layer_dims, torch_dtype
from splitgraph.runtime.engine import PipelineEngine

_PHI = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def plain_model(work: Workload, device: torch.device) -> nn.Sequential:
    model = work.model
    dims = layer_dims(model)
    act = str(model.activation.value)
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1], bias=model.bias))
        if i < len(dims) - 2:
            mods.append(_PHI[act]())
    return nn.Sequential(*mods).to(device=device, dtype=torch_dtype(work.runtime.dtype))


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def measure(overrides: list[str], device: str, repeats: int, warmup: int) -> dict[str, Any]:
    dev = torch.device(device)
    base = [*overrides, "schedule=naive", f"runtime.device={dev.type}", "trace.enabled=false"]
    cfg = load_config(base)
    B, d = cfg.train.batch_size, cfg.model.in_features
    dtype = torch_dtype(cfg.runtime.dtype)
    autocast = compute_dtype(cfg.runtime.dtype) != dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g).to(dev, dtype)
    y = torch.randint(0, cfg.model.out_features, (B,), generator=g).to(dev)

    plain = plain_model(Workload.of(cfg), dev)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-6)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(plain(x), y)
        loss.backward()
        plain_opt.step()

    engines = {
        "splitgraph": PipelineEngine(
            Workload.of(load_config([*base, "runtime.track_memory=true"])), device=dev
        ),
        "splitgraph, meter off": PipelineEngine(
            Workload.of(load_config([*base, "runtime.track_memory=false"])), device=dev
        ),
    }
    steps: dict[str, Callable[[], None]] = {"plain PyTorch": plain_step}
    for name, eng in engines.items():
        steps[name] = lambda eng=eng: eng.step(x, y)  # type: ignore[misc]
    time_it = _timer(dev)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))  # alternate
        for name in order:
            t = time_it(steps[name])
            if i >= warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = 6 * B * sum(a * b for a, b in zip(layer_dims(cfg), layer_dims(cfg)[1:]))
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(cfg.runtime.dtype.value),
        "dims": layer_dims(cfg),
        "batch": B,
        "median_s": med,
        "tflops": {k: flops / v / 1e12 for k, v in med.items()},
        "ratio": {k: v / med["plain PyTorch"] for k, v in med.items() if k != "plain PyTorch"},
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m splitgraph.bench.stage", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    result = measure(
        [*args.overrides, f"runtime.dtype={args.dtype}"], args.device, args.repeats, args.warmup
    )
    for name, r in result["ratio"].items():
        print(
            f"{name:22s} {1e3 * result['median_s'][name]:9.3f} ms  ratio {r:.3f} "
            f"({'within' if r <= 1.10 else 'OVER'} 1.10 of plain PyTorch)"
        )
    print(
        f"{'plain PyTorch':22s} {1e3 * result['median_s']['plain PyTorch']:9.3f} ms  "
        f"{result['tflops']['plain PyTorch']:.1f} TFLOP/s on {result['device']}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
