"""zb1's backward cut in two: its F, I and W against 1f1b's F and B, on one stage, one device.

    python -m splitgraph.bench.split                        # the default model's first stage of 2
    python -m splitgraph.bench.split --rows 64 32 16 --layers 2:4 model.hidden=[1024,1024,1024]

The same layers (`model.build_mlp`, seeded) run a microbatch three ways, in a random order
each repeat: plain (forward, then one autograd backward: 1f1b's F and B); split as the
executor runs it (`WeightGradStore.forward`, by hand, then `input_grad`: zb1's I, then `run`:
its W); and split through autograd (the fallback under bf16 autocast: the forward recording
gradient edges). Prints the medians and the two ratios the zero-bubble schedules live on:
F_split / F (the recording's cost on the forward) and (I + W) / B (the cut's cost on the
backward; issue 18 asks <= 1.10). `--meter` counts saved bytes around all three, as
training does by default. Wall clock on CPU, one thread unless OMP_NUM_THREADS says
otherwise; the load average printed with it: timings under load are preliminary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from splitgraph.config import load_config
from splitgraph.model import WeightGradStore, build_mlp, layer_dims, recording
from splitgraph.observe.memory import SavedTensorMeter


def measure(
    overrides: Sequence[str],
    layers: tuple[int, int],
    rows: int,
    repeats: int,
    warmup: int,
    meter: bool = False,
) -> dict[str, float]:
    """Median seconds of F, B (plain), F, I, W split as the executor runs it (by hand:
    `F_split`, `I`, `W`) and split through autograd (the fallback: `*_autograd`), for one
    microbatch of `rows`; with `meter`, inside a `SavedTensorMeter` as `splitgraph.train`
    runs by default (`runtime.track_memory`)."""
    cfg = load_config(list(overrides))
    start, stop = layers
    modules = {k: build_mlp(cfg.model, start, stop) for k in ("plain", "hand", "autograd")}
    dims = layer_dims(cfg.model)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(rows, dims[start], generator=g)
    grad = torch.randn(rows, dims[stop], generator=g)
    kinds = ("F", "B", "F_split", "I", "W", "F_autograd", "I_autograd", "W_autograd")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    counter = SavedTensorMeter() if meter else None

    def one_plain() -> None:
        x = x0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = modules["plain"](x)
        t1 = time.perf_counter()
        torch.autograd.backward(out, grad)
        t2 = time.perf_counter()
        times["F"].append(t1 - t0)
        times["B"].append(t2 - t1)

    def one_split(how: str) -> None:
        x = x0.clone().requires_grad_(True)
        store = WeightGradStore(counter)
        t0 = time.perf_counter()
        if how == "hand":
            out = store.forward(modules[how], x)
        else:
            with recording(store):
                out = modules[how](x)
        t1 = time.perf_counter()
        store.input_grad(out, grad, x)
        t2 = time.perf_counter()
        store.run()
        t3 = time.perf_counter()
        suffix = "" if how == "hand" else "_autograd"
        times[f"F_split{suffix}" if how == "hand" else f"F{suffix}"].append(t1 - t0)
        times[f"I{suffix}"].append(t2 - t1)
        times[f"W{suffix}"].append(t3 - t2)

    runs = [one_plain, lambda: one_split("hand"), lambda: one_split("autograd")]
    context = counter if counter is not None else contextlib.nullcontext()
    with context:
        for i in range(warmup + repeats):
            random.Random(i).shuffle(runs)
            for run in runs:
                run()
            for module in modules.values():
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
    ap.add_argument("--meter", action="store_true", help="count saved bytes, as training does")
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
        f"{', saved bytes counted' if args.meter else ''}"
    )
    for rows in args.rows:
        m = measure(args.overrides, layers, rows, args.repeats, args.warmup, args.meter)
        us = {k: 1e6 * v for k, v in m.items()}
        print(
            f"rows {rows:5d}: F {us['F']:6.0f} us  B {us['B']:6.0f} us | by hand: "
            f"F {us['F_split']:6.0f}  I {us['I']:6.0f}  W {us['W']:6.0f}  "
            f"F_split/F {m['F_split'] / m['F']:.2f}  (I+W)/B {(m['I'] + m['W']) / m['B']:.2f} | "
            f"autograd: F {us['F_autograd']:6.0f}  I {us['I_autograd']:6.0f}  "
            f"W {us['W_autograd']:6.0f}  (I+W)/B "
            f"{(m['I_autograd'] + m['W_autograd']) / m['B']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
