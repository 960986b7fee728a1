"""splitgraph against its peer, torch.distributed.pipelining, on identical work.

    python -m splitgraph.bench.peer --out results/peer/peer        # p=2 and p=4, m=1,2,4,8
    launch/bench_peer.sh                                            # the same, pinned settings

Both systems train the same MLP, cut into the same uniform stages, on the same minibatches
cut into the same microbatches, with the same loss scaling, L2 term and optimizer (see
bench/torchpp.py): splitgraph's gpipe / 1f1b / interleaved (v=2) / zbv against the peer's
ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B / ScheduleZBVZeroBubble (its stages
on the V's ranks, I and W its own way). Per world size one set of processes
(gloo, one thread each) runs every configuration:

1. equal work: one step of each in float64; every rank compares its gradients with
   single-device full-batch training (max over parameters of max|g - g_ref| / max|g_ref|);
2. memory: one step of each under the same `SavedTensorMeter` (exact saved-for-backward
   bytes), peak per rank;
3. time: rounds of short blocks of steps going over every configuration and, within each,
   over splitgraph without instrumentation, splitgraph counting saved bytes as
   `splitgraph.train` does by default (`runtime.track_memory=true`) and the peer (who goes
   first rotates), so drift on the machine lands on every cell alike. Every step starts
   after a barrier; its time is the slowest rank's. The table gives medians over all steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor

from splitgraph.bench.torchpp import PEER_SCHEDULES, TorchPipeline, peer_problem
from splitgraph.config import Task, Workload, load_config
from splitgraph.data import BatchOrder, load_dataset
from splitgraph.model import build_mlp, objective
from splitgraph.observe.memory import SavedTensorMeter
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.schedule import SCHEDULES
from splitgraph.spawn import run_ranks

#: The benchmark's model: the default widths and batch, 8 layers so 4 ranks x 2 chunks fit.
MODEL = ["model.hidden=[256,256,256,256,256,256,256]"]

#: glibc returns multi-MiB buffers to the kernel every step unless told otherwise
#: (docs: DESIGN.md); both systems run under these settings unless `--glibc-defaults`.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}

#: the timed variants, in the table's order
SYSTEMS = ("splitgraph", "splitgraph_tracking", "peer")


@dataclass(frozen=True)
class Case:
    schedule: str  # splitgraph's name; the peer's class is PEER_SCHEDULES[schedule][0]
    microbatches: int

    @property
    def virtual(self) -> int:
        return PEER_SCHEDULES[self.schedule][1]

    def overrides(self) -> list[str]:
        return [
            f"schedule.name={self.schedule}",
            f"schedule.virtual_stages={self.virtual}",
            f"pipeline.microbatches={self.microbatches}",
        ]

    def problems(self, ranks: int, work: Workload) -> dict[str, str]:
        """Why either system cannot run this case on `ranks` ranks (empty if both can)."""
        out = {}
        layers = len(work.model.hidden) + 1
        if ranks * self.virtual > layers:
            out["both"] = f"{ranks * self.virtual} stages need as many layers (have {layers})"
            return out
        ours = SCHEDULES[self.schedule].problems(ranks, self.virtual, self.microbatches)
        if ours:
            out["splitgraph"] = " ".join(ours)
        theirs = peer_problem(self.schedule, ranks, self.microbatches, work.batch_size)
        if theirs:
            out["peer"] = theirs
        return out


@dataclass
class Spec:
    """What every rank of one launch runs."""

    overrides: list[str]
    cases: list[Case]
    rounds: int = 10  # blocks per system
    steps: int = 6  # timed steps per block
    check: bool = True  # the float64 gradient comparison
    timed: bool = True


def _with(cfg: Any, overrides: Sequence[str]) -> Any:
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


# -- inside each rank -------------------------------------------------------------------------


def max_rel_err(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """Largest over parameters of max|got - want| / max|want|; inf when any value is NaN or
    infinite (a non-finite gradient is a failure: `max(0.0, nan)` would report 0.0)."""
    errors = []
    for k, g in got.items():
        w = want[k].to(g.dtype)
        if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(w).all())):
            return math.inf
        errors.append((g - w).abs().max().item() / (w.abs().max().item() or 1.0))
    return worst(errors)


def worst(errors: Any) -> float:
    """The largest of `errors`, inf if any is NaN or infinite (Python's max ignores a NaN
    that is not first)."""
    values = [float(e) for e in errors]
    return max(values) if values and all(map(math.isfinite, values)) else math.inf


def _grads(params: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    return {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}


#: the gradient check's settings: float64, no saved-tensor meter
FLOAT64 = ("runtime.dtype=float64", "runtime.track_memory=false")


def check_gradients(
    work: Workload, rank: int, world: int, x: Tensor, y: Tensor
) -> dict[str, float]:
    """One float64 step of each system on (x, y) (`work`: a FLOAT64 workload): this rank's
    gradients against single-device full-batch training and against each other."""
    x = x.double()
    y = y.double() if y.is_floating_point() else y
    full = build_mlp(work.model, dtype=torch.float64)
    _, J = objective(full, x, y, Task(work.model.task), work.optim.weight_decay)
    J.backward()
    ref = {k: p.grad for k, p in full.named_parameters()}
    engine = PipelineEngine(work, rank, world)
    engine.forward_backward(x, y)
    ours = _grads(engine.named_parameters())
    peer = TorchPipeline(work, rank, world, torch.float64)
    peer.forward_backward(x, y)
    theirs = _grads(peer.named_parameters())
    if set(ours) != set(theirs) or not ours:
        raise AssertionError(f"rank {rank}: the systems hold different parameters")
    return {
        "splitgraph_vs_reference": max_rel_err(ours, ref),
        "peer_vs_reference": max_rel_err(theirs, ref),
        "splitgraph_vs_peer": max_rel_err(ours, theirs),
    }


def _timed(step: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def prepare(
    spec: Spec, case: Case, base: Any, data: Any, rank: int, world: int
) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
    """Check gradients, build both systems, warm them up and count memory; returns the row
    so far and one step function per timed system."""
    cfg = _with(base, case.overrides())
    order = BatchOrder(data.num_train, cfg.train.batch_size, True, cfg.train.seed)
    batches = [(data.X[order.indices(s)], data.y[order.indices(s)]) for s in range(4)]
    row: dict[str, Any] = {}
    if spec.check:
        float64 = Workload.of(_with(cfg, FLOAT64))
        row["grad_error"] = check_gradients(float64, rank, world, *batches[0])
    engine = PipelineEngine(Workload.of(_with(cfg, ["runtime.track_memory=false"])), rank, world)
    meter = SavedTensorMeter(engine.parameters())
    peer = TorchPipeline(Workload.of(cfg), rank, world, torch.float32)
    count = [0]

    def stepper(system: str) -> Callable[[], Any]:
        def step() -> Any:
            x, y = batches[count[0] % len(batches)]
            count[0] += 1
            if system == "peer":
                return peer.step(x, y)
            engine.executor.meter = meter if system == "splitgraph_tracking" else None
            return engine.step(x, y)

        return step

    steps = {name: stepper(name) for name in SYSTEMS}
    for name in SYSTEMS:  # warm-up: the peer's first step sets up its neighbours
        steps[name]()
    # memory: one step of each under its own meter, the same accounting
    meter.reset_peak()
    sent, msgs = engine.p2p.bytes_sent, engine.p2p.messages_sent
    steps["splitgraph_tracking"]()
    row["p2p_per_step"] = {
        "messages": engine.p2p.messages_sent - msgs,
        "bytes": engine.p2p.bytes_sent - sent,
    }
    peer_meter = SavedTensorMeter(peer.parameters())
    with peer_meter:
        steps["peer"]()
    row["saved_bytes"] = {"splitgraph": meter.peak, "peer": peer_meter.peak}
    return row, steps


def worker(rank: int, world: int, spec: Spec) -> list[dict[str, Any]]:
    """Every case of `spec` on this rank. Timing goes round by round over all cases and, in
    each case, all systems (the first rotating), so drift lands on every cell alike."""
    base = load_config(spec.overrides)
    data = load_dataset(base.data, Workload.of(base))
    rows: list[dict[str, Any]] = []
    timed: list[tuple[dict[str, Any], dict[str, Callable[[], Any]]]] = []
    for case in spec.cases:
        why = case.problems(world, Workload.of(base))
        if why:
            rows.append({"undefined": why})
            continue
        row, steps = prepare(spec, case, base, data, rank, world)
        rows.append(row)
        timed.append((row, steps))
    if spec.timed and timed:
        load = [os.getloadavg()[0]]
        for row, _ in timed:
            row["times"] = {name: [] for name in SYSTEMS}
        for rnd in range(spec.rounds):
            k = rnd % len(SYSTEMS)
            for row, steps in timed:
                for name in SYSTEMS[k:] + SYSTEMS[:k]:  # rotate who goes first
                    steps[name]()  # one untimed step after switching
                    row["times"][name] += _timed(steps[name], spec.steps)
        load.append(os.getloadavg()[0])
        for row, _ in timed:
            row["load"] = load
    return rows


# -- the launch, the rows, the table ----------------------------------------------------------


def collect(spec: Spec, per_rank: list[list[dict[str, Any]]], p: int, batch: int) -> list[dict]:
    """One row per case: the worst rank's gradient error, every rank's memory, and per
    system the median over steps of the slowest rank's step time."""
    rows = []
    for i, case in enumerate(spec.cases):
        ranks = [r[i] for r in per_rank]
        row: dict[str, Any] = {"p": p, "schedule": case.schedule, "m": case.microbatches}
        if "undefined" in ranks[0]:
            rows.append({**row, "undefined": ranks[0]["undefined"]})
            continue
        if "grad_error" in ranks[0]:
            row["grad_error"] = {
                k: worst(r["grad_error"][k] for r in ranks) for k in ranks[0]["grad_error"]
            }
        row["saved_bytes_per_rank"] = {
            name: [r["saved_bytes"][name] for r in ranks] for name in ("splitgraph", "peer")
        }
        row["splitgraph_p2p_per_step"] = {
            k: sum(r["p2p_per_step"][k] for r in ranks) for k in ("messages", "bytes")
        }
        if "times" in ranks[0]:
            row["load"] = ranks[0]["load"]
            for name in SYSTEMS:
                per_step = [max(ts) for ts in zip(*(r["times"][name] for r in ranks))]
                med = statistics.median(per_step)
                q = statistics.quantiles(per_step, n=4) if len(per_step) > 1 else [med] * 3
                row[name] = {
                    "step_ms": 1e3 * med,
                    "samples_per_s": batch / med,
                    "quartiles_ms": [1e3 * q[0], 1e3 * q[2]],
                    "steps": len(per_step),
                }
            row["ratio"] = row["splitgraph"]["step_ms"] / row["peer"]["step_ms"]
            row["ratio_tracking"] = row["splitgraph_tracking"]["step_ms"] / row["peer"]["step_ms"]
        rows.append(row)
    return rows


def run(nproc: int, spec: Spec, timeout: float = 1800.0) -> list[dict[str, Any]]:
    per_rank = run_ranks(worker, nproc, spec, timeout=timeout)
    batch = int(load_config(spec.overrides).train.batch_size)
    return collect(spec, per_rank, nproc, batch)


def _kib(xs: Sequence[int]) -> str:
    return " / ".join(f"{x / 1024:.0f}" for x in xs)


def table(rows: list[dict[str, Any]], cores: int | None = None) -> str:
    head = (
        "| p | schedule | m | splitgraph ms | peer ms | ratio | ratio, tracking memory "
        "| samples/s splitgraph / peer | saved KiB per rank, splitgraph | peer "
        "| grad rel. err splitgraph / peer |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        p = f"{r['p']}" + (" (oversubscribed)" if cores and r["p"] > cores else "")
        lead = f"| {p} | {r['schedule']} | {r['m']} |"
        if "undefined" in r:
            why = "; ".join(f"{k}: {v}" for k, v in r["undefined"].items())
            lines.append(f"{lead} not compared: {why} |" + " |" * 7)
            continue
        ge = r.get("grad_error")
        cells = [
            *(
                [
                    f"{r['splitgraph']['step_ms']:.2f}",
                    f"{r['peer']['step_ms']:.2f}",
                    f"**{r['ratio']:.2f}**",
                    f"{r['ratio_tracking']:.2f}",
                    f"{r['splitgraph']['samples_per_s']:.0f} / {r['peer']['samples_per_s']:.0f}",
                ]
                if "ratio" in r
                else [""] * 5
            ),
            _kib(r["saved_bytes_per_rank"]["splitgraph"]),
            _kib(r["saved_bytes_per_rank"]["peer"]),
            f"{ge['splitgraph_vs_reference']:.1e} / {ge['peer_vs_reference']:.1e}" if ge else "",
        ]
        lines.append(lead + " " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_note(rows: list[dict[str, Any]]) -> str:
    """The machine's 1-minute load average when timing started and ended, per world size."""
    seen: dict[int, list[float]] = {}
    for r in rows:
        if "load" in r:
            seen.setdefault(r["p"], r["load"])
    parts = [f"p={p}: {lo:.1f} -> {hi:.1f}" for p, (lo, hi) in seen.items()]
    return f"Load average (1 min) over the timed rounds, {os.cpu_count()} cores: " + "; ".join(
        parts
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m splitgraph.bench.peer", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--nproc", default="2,4", help="world sizes (default 2,4)")
    ap.add_argument("--microbatches", default="1,2,4,8")
    ap.add_argument("--schedules", default=",".join(PEER_SCHEDULES))
    ap.add_argument("--rounds", type=int, default=10, help="timed blocks per system")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per block")
    ap.add_argument("--glibc-defaults", action="store_true", help="leave malloc's thresholds")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per world size")
    ap.add_argument("--out", type=Path, help="write the result here (.md and .json)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both systems")
    args = ap.parse_args(argv)
    unknown = set(args.schedules.split(",")) - set(PEER_SCHEDULES)
    if unknown:
        ap.error(f"--schedules: {sorted(unknown)} have no peer; choose from {list(PEER_SCHEDULES)}")
    # Set before the ranks are spawned: glibc and OpenMP read them at process start.
    if not args.glibc_defaults:
        for k, v in ALLOCATOR.items():
            os.environ.setdefault(k, v)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = Spec(
        overrides=[*MODEL, *args.overrides],
        cases=[
            Case(s, int(m)) for s in args.schedules.split(",") for m in args.microbatches.split(",")
        ],
        rounds=args.rounds,
        steps=args.steps,
    )
    rows: list[dict[str, Any]] = []
    for p in (int(x) for x in args.nproc.split(",")):
        t0 = time.monotonic()
        rows += run(p, spec, args.timeout)
        print(f"p={p}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    text = table(rows, os.cpu_count()) + "\n\n" + load_note(rows)
    print(text)
    if args.out is not None:
        write(args.out, rows, text, argv if argv is not None else sys.argv[1:])
    return 0


def write(out: Path, rows: list[dict[str, Any]], text: str, argv: Sequence[str]) -> None:
    from splitgraph.bench.launch import machine

    cmd = " ".join(["python -m splitgraph.bench.peer", *argv])
    env = {k: os.environ.get(k) for k in [*ALLOCATOR, "OMP_NUM_THREADS"]}
    env_text = ", ".join(f"{k}={v}" for k, v in env.items() if v is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"<!-- {cmd} -->\n\nMachine: {machine()}; gloo; {env_text}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}.\n\n{text}\n"
    )
    out.with_suffix(".json").write_text(
        json.dumps({"command": cmd, "machine": machine(), "env": env, "rows": rows}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
