"""zb1's backward cut in two: its F, I and W against 1f1b's F and B, on one stage, one device.

    python -m splitgraph.bench.split                        # the default model's first stage of 2
    python -m splitgraph.bench.split --rows 64 32 16 --layers 2:4 model.hidden=[1024,1024,1024]

The same layers (`model.build_mlp`, seeded) run a microbatch two ways, alternating in a random
order each repeat: plain (forward, then one autograd backward: 1f1b's F and B) and split (the
forward recording into a `WeightGradStore`, `input_grad`: zb1's I, then `run`: its W), exactly
as the executor calls them. Prints the medians and the two ratios the zero-bubble schedules
live on: F_split / F (the recording's cost on the forward) and (I + W) / B (the cut's cost on
the backward; issue 18 asks <= 1.10). Wall clock on CPU, one thread unless OMP_NUM_THREADS
says otherwise; `uptime` printed with it: timings under load are preliminary.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from splitgraph.config import load_config
from splitgraph.model import WeightGradStore, build_mlp, layer_dims, recording


def measure(
    overrides: Sequence[str], layers: tuple[int, int], rows: int, repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds of F, B (plain) and F, I, W (split) for one microbatch of `rows`."""
    cfg = load_config(list(overrides))
    start, stop = layers
    plain = build_mlp(cfg.model, start, stop)
    split = build_mlp(cfg.model, start, stop)
    dims = layer_dims(cfg.model)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(rows, dims[start], generator=g)
    grad = torch.randn(rows, dims[stop], generator=g)
    times: dict[str, list[float]] = {k: [] for k in ("F", "B", "F_split", "I", "W")}

    def one_plain() -> None:
        x = x0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = plain(x)
        t1 = time.perf_counter()
        torch.autograd.backward(out, grad)
        t2 = time.perf_counter()
        times["F"].append(t1 - t0)
        times["B"].append(t2 - t1)

    def one_split() -> None:
        x = x0.clone().requires_grad_(True)
        store = WeightGradStore()
        t0 = time.perf_counter()
        with recording(store):
            out = split(x)
        t1 = time.perf_counter()
        store.input_grad(out, grad, x)
        t2 = time.perf_counter()
        store.run()
        t3 = time.perf_counter()
        times["F_split"].append(t1 - t0)
        times["I"].append(t2 - t1)
        times["W"].append(t3 - t2)

    kinds = [one_plain, one_split]
    for i in range(warmup + repeats):
        random.Random(i).shuffle(kinds)
        for run in kinds:
            run()
        for module in (plain, split):
            module.zero_grad(set_to_none=True)
        if i < warmup:
            for v in times.values():
                v.clear()
    return {k: statistics.median(v) for k, v in times.items()}


def _layers(text: str | None, num_layers: int) -> tuple[int, int]:
    if text is None:  # the first stage of a uniform split in two
        return 0, max(1, num_layers // 2)
    a, b = (int(v) for v in text.split(":"))
    if not 0 <= a < b <= num_layers:
        raise SystemExit(f"--layers {text}: need 0 <= start < stop <= {num_layers}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m splitgraph.bench.split",
        description=__doc__.split("\n")[0],
        epilog="example: python -m splitgraph.bench.split --rows 64 16 --repeats 300",
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 32, 16], help="microbatch rows")
    ap.add_argument("--layers", help="start:stop of the stage's layers (default: first half)")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.hidden=[512,512]")
    args = ap.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    cfg: Any = load_config(list(args.overrides))
    layers = _layers(args.layers, len(layer_dims(cfg.model)) - 1)
    load = os.getloadavg()[0]
    print(
        f"layers [{layers[0]}, {layers[1]}) of {layer_dims(cfg.model)}, "
        f"{torch.get_num_threads()} thread(s), load {load:.1f}, medians of {args.repeats}"
    )
    for rows in args.rows:
        m = measure(args.overrides, layers, rows, args.repeats, args.warmup)
        us = {k: 1e6 * v for k, v in m.items()}
        print(
            f"rows {rows:5d}: F {us['F']:8.0f} us  B {us['B']:8.0f} us | "
            f"F_split {us['F_split']:8.0f}  I {us['I']:8.0f}  W {us['W']:8.0f} | "
            f"F_split/F {m['F_split'] / m['F']:.2f}  (I+W)/B {(m['I'] + m['W']) / m['B']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
