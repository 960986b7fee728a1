"""Scaling out: data x pipeline layouts measured on real launches, and projected on paper.

    python -m splitgraph.bench.scale measure --nproc 4 --repeats 5 --out results/scale/measured
    python -m splitgraph.bench.scale project --out results/scale/projection

`measure` runs the same training (same global batch, same microbatches per replica) as
dp=1 x pp=4, dp=2 x pp=2 and dp=4 x pp=1 on the same ranks, plus dp=2 x pp=2 with and
without the all-reduce overlap, each a real launch (`--nproc N`) of `splitgraph.train`. Every
round runs every configuration once in a rotated order; the table reports medians over
rounds of each launch's median step.

`project` is a paper projection, not a measurement: the schedule simulator fed with per-layer
costs derived from FLOPs at a stated sustained rate, pipeline transfers and the ring
all-reduce (schedule/allreduce.py) at stated link bandwidths, for every dp x pp layout of
8..64 GPUs. Every assumption is an option and is printed above the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from splitgraph.bench.launch import RunFailed, machine, run_training
from splitgraph.schedule import Costs, build_schedule, simulate
from splitgraph.schedule.allreduce import Link, stage_allreduce_times, with_allreduce

# -- measured --------------------------------------------------------------------------------

#: glibc otherwise returns multi-MiB gradient buffers to the kernel each step (DESIGN.md)
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def configurations(nproc: int) -> list[tuple[str, list[str]]]:
    out = []
    dp = 1
    while dp <= nproc:
        if nproc % dp == 0:
            out.append((f"dp={dp} x pp={nproc // dp}, 1f1b", [f"parallel.dp={dp}"]))
        dp *= 2
    il = ["schedule=interleaved", "schedule.virtual_stages=2", "parallel.dp=2"]
    out += [
        ("dp=2 x pp=2, 1f1b, no overlap", ["parallel.dp=2", "parallel.overlap=false"]),
        ("dp=2 x pp=2, interleaved v=2", il),
        ("dp=2 x pp=2, interleaved v=2, no overlap", [*il, "parallel.overlap=false"]),
    ]
    return out


def _record(summary: dict[str, Any]) -> dict[str, Any]:
    waits = [r.get("allreduce_wait_median_s") for r in summary["memory_per_rank"]]
    waits = [w for w in waits if w is not None]
    return {
        "step_ms": 1e3 * summary["step_time_median_s"],
        "samples_per_s": summary["samples_per_s_median"],
        "allreduce_wait_ms": 1e3 * statistics.mean(waits) if waits else 0.0,
    }


def measure(
    nproc: int, repeats: int, steps: int, extra: list[str], workdir: Path
) -> list[dict[str, Any]]:
    configs = configurations(nproc)
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(configs))}
    errors: dict[int, str] = {}
    common = [f"train.steps={steps}", "checkpoint.save=false", "trace.enabled=false", *extra]
    for rnd in range(repeats):
        order = list(range(len(configs)))
        order = order[rnd % len(order) :] + order[: rnd % len(order)]
        for i in order:
            label, ov = configs[i]
            t0 = time.monotonic()
            try:
                s = run_training(nproc, [*common, *ov], workdir / f"r{rnd}c{i}", env=ALLOCATOR)
                runs[i].append(_record(s))
            except RunFailed as e:
                errors[i] = e.tail.strip().splitlines()[-1] if e.tail.strip() else str(e)
            last = runs[i][-1]["step_ms"] if runs[i] else float("nan")
            print(
                f"round {rnd + 1}/{repeats} {label}: {last:.2f} ms ({time.monotonic() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for i, (label, ov) in enumerate(configs):
        r = runs[i]
        if not r:
            rows.append({"layout": label, "overrides": ov, "error": errors.get(i, "no run")})
            continue
        med = {k: statistics.median(x[k] for x in r) for k in r[0]}
        steps_ms = [x["step_ms"] for x in r]
        spread = (max(steps_ms) - min(steps_ms)) / med["step_ms"]
        rows.append({"layout": label, "overrides": ov, "launches": len(r), "spread": spread, **med})
    return rows


def measured_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if "error" not in r), None)
    lines = [
        "| layout | step ms (median) | samples/s | vs first row | blocked on all-reduce, ms "
        "(mean over ranks) | spread over launches |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | failed: {r['error']} | | | | |")
            continue
        rel = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        lines.append(
            f"| {r['layout']} | {r['step_ms']:.2f} | {r['samples_per_s']:.0f} | {rel:.2f}x | "
            f"{r['allreduce_wait_ms']:.2f} | {r['spread']:.0%} |"
        )
    return "\n".join(lines)


# -- paired, in one launch -------------------------------------------------------------------


def paired_worker(
    rank: int, world: int, configs: list[tuple[str, list[str]]], rounds: int, steps: int
) -> dict[str, list[float]]:
    """Every configuration's engine in one process group, run in turns of `steps` steps, so
    that the machine's drift (other jobs) lands on all of them alike. Step time ends when
    every rank has finished (a barrier, as train.py's all-reduce of the loss)."""
    import torch.distributed as dist

    from splitgraph.config import Workload, load_config, validate
    from splitgraph.data import BatchOrder, load_dataset, replica_rows
    from splitgraph.runtime.engine import PipelineEngine
    from splitgraph.runtime.mesh import build_mesh, layout_of

    meshes: dict[tuple[int, int], Any] = {}
    runs = []
    for _, ov in configs:
        cfg = load_config(ov)
        validate(cfg, world)
        layout = layout_of(cfg.pipeline, cfg.parallel, world)
        if (layout.dp, layout.pp) not in meshes:
            meshes[(layout.dp, layout.pp)] = build_mesh(layout, "cpu")
        engine = PipelineEngine.from_mesh(Workload.of(cfg), meshes[(layout.dp, layout.pp)])
        ds = load_dataset(cfg.data, Workload.of(cfg)).to(engine.dtype, "cpu")
        order = BatchOrder(ds.num_train, engine.batch_size, True, cfg.train.seed)
        runs.append((engine, ds, order))
    times: dict[str, list[float]] = {label: [] for label, _ in configs}
    step = 0
    for rnd in range(rounds):
        turn = list(range(len(configs)))
        turn = turn[rnd % len(turn) :] + turn[: rnd % len(turn)]
        for i in turn:
            engine, ds, order = runs[i]
            dist.barrier()
            for k in range(steps + 1):  # the first step of a turn warms up, unrecorded
                idx = replica_rows(order.indices(step), engine.dp_rank, engine.dp)
                t0 = time.perf_counter()
                engine.step(ds.X[idx], ds.y[idx])
                dist.barrier()
                if k:
                    times[configs[i][0]].append(time.perf_counter() - t0)
                step += 1
    return times


def paired(
    nproc: int, rounds: int, steps: int, extra: list[str], timeout: float
) -> list[dict[str, Any]]:
    import os

    from splitgraph.spawn import run_ranks

    os.environ.update(ALLOCATOR)  # read by glibc in the spawned ranks
    configs = [(label, [*extra, *ov]) for label, ov in configurations(nproc)]
    times = run_ranks(paired_worker, nproc, configs, rounds, steps, timeout=timeout)[0]
    base = configs[0][0]
    rows = []
    for label, ov in configs:
        t = times[label]
        # paired per turn: the ratio to the first configuration's turn of the same round
        per_turn = [
            statistics.median(times[base][r * steps : (r + 1) * steps])
            / statistics.median(t[r * steps : (r + 1) * steps])
            for r in range(rounds)
        ]
        med = statistics.median(t)
        rows.append(
            {
                "layout": label,
                "overrides": ov[len(extra) :],
                "step_ms": 1e3 * med,
                "samples_per_s": None,
                "speed_vs_first": statistics.median(per_turn),
                "speed_vs_first_range": [min(per_turn), max(per_turn)],
                "steps": len(t),
            }
        )
    return rows


def paired_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| layout | step ms (median of all steps) | speed vs first row: median over rounds "
        "(min-max) |",
        "|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["speed_vs_first_range"]
        lines.append(
            f"| {r['layout']} | {r['step_ms']:.2f} | {r['speed_vs_first']:.2f}x "
            f"({lo:.2f}-{hi:.2f}) |"
        )
    return "\n".join(lines)


# -- projected -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    """What the projection assumes; every field is a command-line option."""

    layers: int = 64
    width: int = 4096
    batch: int = 131072  # rows per optimizer step (global)
    microbatch: int = 2048  # rows per microbatch (m = batch / (dp * microbatch))
    tflops: float = 400.0  # sustained bf16 matmul rate per GPU, TFLOP/s
    gpus_per_node: int = 8
    nvlink_gbps: float = 360.0  # GB/s per GPU per direction, achieved
    nvlink_latency_us: float = 5.0  # per ring step / per transfer
    ib_gbps: float = 40.0  # GB/s per GPU (one 400 Gb/s NIC each), achieved
    ib_latency_us: float = 10.0
    grad_bytes: int = 4  # fp32 gradients all-reduced
    act_bytes: int = 2  # bf16 activations between stages
    state_bytes: int = 18  # per parameter: bf16 weight, fp32 master, grad, Adam m and v
    bucket_mb: float = 25.0

    def text(self) -> str:
        d = self.width
        f_ms = 2 * self.microbatch * d * d / (self.tflops * 1e12) * 1e3
        return (
            f"model: {self.layers} Linear layers {d}x{d} (no bias), "
            f"{self.layers * d * d / 1e9:.2f} B parameters; global batch {self.batch} rows, "
            f"microbatches of {self.microbatch} rows.\n"
            f"compute: forward of one layer on one microbatch = 2*{self.microbatch}*{d}^2 FLOP "
            f"at {self.tflops:g} TFLOP/s sustained = {f_ms:.3f} ms; backward = 2x forward "
            f"(input grad I = weight grad W = 1x).\n"
            f"links: NVLink {self.nvlink_gbps:g} GB/s and {self.nvlink_latency_us:g} us within "
            f"a node of {self.gpus_per_node} GPUs, InfiniBand {self.ib_gbps:g} GB/s and "
            f"{self.ib_latency_us:g} us across nodes (per GPU, per direction). Pipeline "
            f"activations bf16 ({self.act_bytes} B), gradients all-reduced in fp32 "
            f"({self.grad_bytes} B) in {self.bucket_mb:g} MiB buckets, ring algorithm.\n"
            f"layout: rank = d*pp + p (runtime/mesh.py), ranks numbered node by node, so a "
            f"pipeline stays in a node when pp <= {self.gpus_per_node}.\n"
            f"memory per GPU: {self.state_bytes} B per parameter held (activations excluded)."
        )


def _nvlink(a: Assumptions) -> Link:
    return Link("NVLink", a.nvlink_gbps * 1e9, a.nvlink_latency_us * 1e-6)


def _ib(a: Assumptions) -> Link:
    return Link("InfiniBand", a.ib_gbps * 1e9, a.ib_latency_us * 1e-6)


def _parse(schedule: str) -> tuple[str, int]:
    """ "interleaved:2" -> ("interleaved", 2 virtual stages per rank)."""
    name, _, v = schedule.partition(":")
    return name, int(v or 1)


def feasible(a: Assumptions, dp: int, pp: int, schedule: str) -> bool:
    _, v = _parse(schedule)
    m = a.batch // (dp * a.microbatch) if a.batch % (dp * a.microbatch) == 0 else 0
    return m >= 1 and a.layers % (pp * v) == 0


def project_layout(a: Assumptions, dp: int, pp: int, schedule: str, overlap: bool) -> dict:
    """One layout's predicted step: the simulator plus the data-parallel all-reduce."""
    name, v = _parse(schedule)
    gpn = a.gpus_per_node
    m = a.batch // (dp * a.microbatch)
    stages = pp * v
    per_stage = a.layers // stages
    f = per_stage * 2 * a.microbatch * a.width**2 / (a.tflops * 1e12)
    node = [[(d * pp + p) // gpn for p in range(pp)] for d in range(dp)]
    comm = []
    for b in range(stages - 1):  # a boundary crossing nodes in any replica: InfiniBand
        lo, hi = b % pp, (b + 1) % pp
        link = _ib(a) if any(row[lo] != row[hi] for row in node) else _nvlink(a)
        comm.append(a.microbatch * a.width * a.act_bytes / link.bandwidth + link.latency)
    costs = Costs([f] * stages, [2 * f] * stages, [f] * stages, [f] * stages, comm)
    sched = build_schedule(name, pp, m, v)
    sim = simulate(sched, costs)
    dp_link = _nvlink(a) if all(len({row[p] for row in node}) == 1 for p in range(pp)) else _ib(a)
    nbytes = [per_stage * a.width**2 * a.grad_bytes] * stages
    ar = stage_allreduce_times(nbytes, dp, dp_link, a.bucket_mb * 2**20)
    step = with_allreduce(sim, sched, ar, overlap=overlap)
    ideal = 6 * a.batch * a.layers * a.width**2 / (dp * pp * a.tflops * 1e12)
    return {
        "gpus": dp * pp,
        "dp": dp,
        "pp": pp,
        "schedule": name if v == 1 else f"{name} v={v}",
        "overlap": overlap,
        "microbatches": m,
        "pipeline_ms": 1e3 * step.pipeline_time,
        "allreduce_ms": 1e3 * sum(ar) / pp,  # per rank: its stages' all-reduces
        "allreduce_link": dp_link.name if dp > 1 else "-",
        "exposed_ms": 1e3 * step.exposed,
        "step_ms": 1e3 * step.step_time,
        "samples_per_s": a.batch / step.step_time,
        "efficiency": ideal / step.step_time,
        "memory_gb": v * per_stage * a.width**2 * a.state_bytes / 1e9,
    }


def project(a: Assumptions, gpus: list[int], schedules: list[str]) -> list[dict[str, Any]]:
    rows = []
    for n in gpus:
        for pp in (p for p in range(1, n + 1) if n % p == 0):
            dp = n // pp
            for schedule in schedules if pp > 1 else schedules[:1]:
                if feasible(a, dp, pp, schedule):
                    for overlap in (True, False):
                        rows.append(project_layout(a, dp, pp, schedule, overlap))
    return rows


def projection_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| GPUs | dp x pp | schedule | m | pipeline ms | all-reduce per rank ms (link) | "
        "exposed ms (overlap / none) | step ms (overlap) | samples/s | efficiency | "
        "GB per GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["gpus"], r["dp"], r["schedule"], r["overlap"]): r for r in rows}
    for r in rows:
        if not r["overlap"]:
            continue
        off = by_key[(r["gpus"], r["dp"], r["schedule"], False)]
        best = max(
            (x for x in rows if x["gpus"] == r["gpus"] and x["overlap"]),
            key=lambda x: x["samples_per_s"],
        )
        mark = " **best**" if r is best else ""
        lines.append(
            f"| {r['gpus']} | {r['dp']} x {r['pp']}{mark} | {r['schedule']} | "
            f"{r['microbatches']} | {r['pipeline_ms']:.1f} | {r['allreduce_ms']:.1f} "
            f"({r['allreduce_link']}) | {r['exposed_ms']:.1f} / {off['exposed_ms']:.1f} | "
            f"{r['step_ms']:.1f} | {r['samples_per_s']:,.0f} | {r['efficiency']:.0%} | "
            f"{r['memory_gb']:.1f} |"
        )
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m splitgraph.bench.scale", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("measure", help="real launches of every dp x pp layout on --nproc ranks")
    m.add_argument("--nproc", type=int, default=4)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--steps", type=int, default=60)
    m.add_argument("--out", type=Path)
    m.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    q = sub.add_parser("paired", help="every layout in one launch, in turns (less noise)")
    q.add_argument("--nproc", type=int, default=4)
    q.add_argument("--rounds", type=int, default=12)
    q.add_argument("--steps", type=int, default=20, help="steps per turn")
    q.add_argument("--timeout", type=float, default=1800.0)
    q.add_argument("--out", type=Path)
    q.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    p = sub.add_parser("project", help="the simulator's projection for 8..64 GPUs")
    for field, value in asdict(Assumptions()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--gpus", default="8,16,32,64")
    p.add_argument("--schedules", default="1f1b,zb1,interleaved:2", help="name[:virtual]")
    p.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cmd = "python -m splitgraph.bench.scale " + " ".join(argv or sys.argv[1:])

    if args.what == "measure":
        with tempfile.TemporaryDirectory(prefix="splitgraph-scale-") as tmp:
            rows = measure(args.nproc, args.repeats, args.steps, args.overrides, Path(tmp))
        text = measured_table(rows)
        allocator = " ".join(f"{k}={v}" for k, v in ALLOCATOR.items())
        header = (
            f"Machine: {machine()}; gloo, OMP_NUM_THREADS=1, {allocator}, "
            f"{time.strftime('%Y-%m-%d')}. {args.nproc} ranks per launch, medians of "
            f"{args.repeats} launches per row, rows alternating in rotated order.\n\n"
        )
        result: dict[str, Any] = {"rows": rows}
    elif args.what == "paired":
        rows = paired(args.nproc, args.rounds, args.steps, args.overrides, args.timeout)
        text = paired_table(rows)
        header = (
            f"Machine: {machine()}; gloo, OMP_NUM_THREADS=1, {time.strftime('%Y-%m-%d')}. One "
            f"launch of {args.nproc} ranks holding every configuration's engine; {args.rounds} "
            f"rounds, each running every configuration for {args.steps} steps in a rotated "
            "order; a step ends when all ranks are done.\n\n"
        )
        result = {"rows": rows}
    else:
        a = Assumptions(**{k: getattr(args, k) for k in asdict(Assumptions())})
        gpus = [int(x) for x in args.gpus.split(",")]
        rows = project(a, gpus, args.schedules.split(","))
        text = projection_table(rows)
        header = "PROJECTION (simulated, not measured). Assumptions:\n\n" + a.text() + "\n\n"
        result = {"assumptions": asdict(a), "rows": rows}
    print(header + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"<!-- {cmd} -->\n\n" + header + text + "\n")
        payload = {"command": cmd, **result}
        if args.what != "project":
            payload["machine"] = machine()
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
