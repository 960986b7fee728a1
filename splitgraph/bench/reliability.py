"""What the reliability machinery costs: the numerical guard per step, a checkpoint save/load.

    python -m splitgraph.bench.reliability [--repeats 7] [--steps 20] [overrides...]

One process, one device (the guard's checks are local to each rank, so its cost relative to
the step carries over to several ranks). For each microbatch count it times (process CPU
time, which a loaded machine disturbs far less than wall time) training steps
with the guard off, at `runtime.nan_check=step` and at `microbatch`, interleaved repeat by
repeat so drift hits all three alike, and prints medians and ratios. Then it times a
checkpoint save (DCP, digests while writing, fsync, rename), the SHA-256 of its bytes alone
(what hashing while writing adds to the save), the integrity check before a load (read and
SHA-256 of every file; every rank checks the whole checkpoint), and a load of this rank's share.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from splitgraph.config import NanCheck, Workload, load_config
from splitgraph.data import BatchOrder, load_dataset
from splitgraph.partition import make_plan
from splitgraph.reliability import checkpoint
from splitgraph.runtime.engine import PipelineEngine


def _step_time(engine: PipelineEngine, batches: list[Any]) -> float:
    """Median CPU seconds per step over `batches` with the engine's guard setting (process
    time, not wall time: on a shared machine other processes' load barely moves it)."""
    guard = engine.guard
    times = []
    for x, y in batches:
        t0 = time.process_time()
        if guard is not None:
            guard.begin()
        engine.forward_backward(x, y)
        if guard is not None:
            guard.finish()
        engine.update()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def guard_cost(overrides: list[str], microbatches: int, steps: int, repeats: int) -> dict:
    cfg = load_config([*overrides, f"pipeline.microbatches={microbatches}"])
    engines = {  # the same seeded model three times, each with its guard built in
        "off": PipelineEngine(Workload.of(cfg)),
        "step": PipelineEngine(Workload.of(cfg), nan_check=NanCheck.step),
        "microbatch": PipelineEngine(Workload.of(cfg), nan_check=NanCheck.microbatch),
    }
    ds = load_dataset(cfg.data, Workload.of(cfg)).to(engines["off"].dtype, "cpu")
    order = BatchOrder(ds.num_train, cfg.train.batch_size, True, 0)
    batches = [(ds.X[order.indices(i)], ds.y[order.indices(i)]) for i in range(steps)]
    for engine in engines.values():
        _step_time(engine, batches[:3])  # warm-up
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            runs[name].append(_step_time(engine, batches))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"microbatches": microbatches, **med}


def checkpoint_cost(overrides: list[str], repeats: int) -> dict:
    cfg = load_config(overrides)
    engine = PipelineEngine(Workload.of(cfg))
    ds = load_dataset(cfg.data, Workload.of(cfg)).to(engine.dtype, "cpu")
    idx = BatchOrder(ds.num_train, cfg.train.batch_size, True, 0).indices(0)
    engine.step(ds.X[idx], ds.y[idx])  # optimizer state exists
    saves, loads, verifies, hashes = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            meta = checkpoint.marker(checkpoint.identity(cfg), engine, i + 1, 1, 1)
            t0 = time.perf_counter()
            path = checkpoint.save(engine, d, i + 1, meta, keep=2, rank=0, world_size=1)
            saves.append(time.perf_counter() - t0)
            ck = checkpoint.list_checkpoints(d)[-1]
            t0 = time.perf_counter()
            assert checkpoint.verify(ck) is None
            verifies.append(time.perf_counter() - t0)
            blobs = [(path / n).read_bytes() for n in ck.meta["files"]]
            t0 = time.perf_counter()  # what hashing while writing adds to a save
            for b in blobs:
                hashlib.sha256(b).hexdigest()
            hashes.append(time.perf_counter() - t0)
            names = checkpoint.names_held(cfg.model, make_plan(Workload.of(cfg), 1), 0)
            t0 = time.perf_counter()
            checkpoint.read_rank_state(ck, checkpoint.read_metadata(ck.path), names, 0)
            loads.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
    med = statistics.median
    return {
        "save": med(saves),
        "load": med(loads),
        "verify": med(verifies),
        "hash": med(hashes),
        "bytes": size,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 32])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} thread(s), OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}, overrides {args.overrides or '(defaults)'}"
    )
    print(f"CPU time per step, median of {args.repeats} repeats x median of {args.steps} steps:")
    print("microbatches   guard off   nan_check=step   nan_check=microbatch")
    for m in args.microbatches:
        r = guard_cost(args.overrides, m, args.steps, args.repeats)
        off = r["off"]
        print(
            f"{m:>12}  {off * 1e3:8.2f} ms   {r['step'] * 1e3:8.2f} ms (x{r['step'] / off:.3f})"
            f"   {r['microbatch'] * 1e3:8.2f} ms (x{r['microbatch'] / off:.3f})"
        )
    c = checkpoint_cost(args.overrides, args.repeats)
    mib = c["bytes"] / 2**20
    print(
        f"checkpoint ({mib:.2f} MiB on disk): save {c['save'] * 1e3:.1f} ms (of which SHA-256 "
        f"of the bytes written {c['hash'] * 1e3:.2f} ms), verify before loading "
        f"{c['verify'] * 1e3:.2f} ms ({mib / c['verify']:.0f} MiB/s: read + SHA-256), load "
        f"{c['load'] * 1e3:.1f} ms (medians of {args.repeats})"
    )


if __name__ == "__main__":
    main()
