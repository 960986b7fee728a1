"""Schedules side by side on real runs: step time, throughput, bubble measured and reconstructed,
and activation memory per stage.

    python -m splitgraph.bench.schedules --nproc 2 --repeats 3
    python -m splitgraph.bench.schedules --nproc 2 --overhead      # what tracing costs

Each configuration (schedule x microbatches, at fixed ranks) is a real `torchrun` launch of
`splitgraph.train`. Every round runs every configuration once, in a rotated order, so drift
on the machine lands on all of them; the table reports the median over rounds of each
launch's median step. The reconstruction is the simulator fed with that launch's own measured
per-stage costs (see observe/trace.py): it checks the simulator, it is not a prediction (the
planner's a-priori prediction is `python -m splitgraph.bench.predict`'s). `--overhead`
alternates the default run with tracing on (every step recorded) and off, and reports the
ratio of median step times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from splitgraph.bench.launch import RunFailed, machine, run_training

#: (label, overrides) per schedule; microbatches are swept separately.
SCHEDULES = [
    ("naive", ["schedule=naive"]),
    ("gpipe", ["schedule=gpipe"]),
    ("1f1b", ["schedule=1f1b"]),
    ("zb1", ["schedule=zb1"]),
    ("interleaved v=2", ["schedule=interleaved", "schedule.virtual_stages=2"]),
    ("loopedbfs v=2", ["schedule=loopedbfs", "schedule.virtual_stages=2"]),
    ("zb2", ["schedule=zb2"]),
    # the V placement: stage s and 2p-1-s on rank s (2p stages: the model needs 2p layers)
    ("zbv v=2", ["schedule=zbv"]),
    ("vhalf v=2", ["schedule=vhalf"]),
    ("vmin v=2", ["schedule=vmin"]),
    # built for the run from the planner's costs and the memory cap, one or two chunks
    ("auto", ["schedule=auto"]),
    ("auto v=2", ["schedule=auto", "schedule.virtual_stages=2"]),
]


#: Untraced steps before the traced window: the first steps run slower (allocator, gloo's
#: connections, caches).
WARMUP = 10


def configurations(
    nproc: int, microbatches: list[int], names: list[str] | None = None
) -> list[tuple[str, int, list[str]]]:
    """(label, m, overrides) for each schedule named (default: all) at each m it accepts."""
    known = [label.split()[0] for label, _ in SCHEDULES]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"--schedules: unknown {unknown}; choose from {known}")
    out = []
    for label, ov in SCHEDULES:
        if names and label.split()[0] not in names:
            continue
        for m in [1] if label == "naive" else microbatches:
            if label.startswith("interleaved") and m % nproc:
                continue
            out.append((label, m, [*ov, f"pipeline.microbatches={m}"]))
    return out


def _one(summary: dict[str, Any]) -> dict[str, float]:
    tl = summary["timeline"]
    mem = [r["saved_activation_peak_bytes"] for r in summary["memory_per_rank"]]
    return {
        "step_ms": 1e3 * tl["measured"]["step_time_median_s"],
        "pred_ms": 1e3 * tl["reconstructed"]["step_time_s"],
        "samples_per_s": summary["config"]["train"]["batch_size"]
        / tl["measured"]["step_time_median_s"],
        "bubble": tl["measured"]["bubble"],  # simulate.idle_share, as the run printed it
        "bubble_pred": tl["reconstructed"]["bubble"],
        "ratio": tl["measured_over_reconstructed_step_time"],
        "span_ratio": tl["measured_over_reconstructed_span"],
        "saved_kib": [b / 1024 for b in mem],
        # backward compute per (mean-size) microbatch, summed over stages: B, or I + W (zb1)
        "backward_ms": 1e3 * sum(tl["costs_per_stage_s"]["backward"]),
    }


def sweep(
    nproc: int,
    microbatches: list[int],
    repeats: int,
    steps: int,
    extra: list[str],
    workdir: Path,
    names: list[str] | None = None,
) -> list[dict[str, Any]]:
    configs = configurations(nproc, microbatches, names)
    runs: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(configs))}
    errors: dict[int, str] = {}
    common = [  # WARMUP untraced steps, then `steps` traced ones
        f"train.steps={steps + WARMUP}",
        f"trace.warmup={WARMUP}",
        f"trace.steps={steps}",
        "checkpoint.save=false",
        *extra,
    ]
    for rnd in range(repeats):
        order = list(range(len(configs)))
        order = order[rnd % len(order) :] + order[: rnd % len(order)]  # rotate each round
        for i in order:
            label, m, ov = configs[i]
            t0 = time.monotonic()
            try:
                summary = run_training(nproc, [*common, *ov], workdir / f"r{rnd}c{i}")
                runs[i].append(_one(summary))
            except RunFailed as e:
                errors[i] = e.tail.strip().splitlines()[-1] if e.tail.strip() else str(e)
            print(
                f"round {rnd + 1}/{repeats} {label:16s} m={m}: "
                f"{runs[i][-1]['step_ms'] if runs[i] else float('nan'):.2f} ms "
                f"({time.monotonic() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for i, (label, m, _) in enumerate(configs):
        r = runs[i]
        if not r:
            rows.append({"schedule": label, "m": m, "error": errors.get(i, "no run")})
            continue
        med = {k: statistics.median(x[k] for x in r) for k in r[0] if k != "saved_kib"}
        med["saved_kib"] = [
            statistics.median(x["saved_kib"][s] for x in r) for s in range(len(r[0]["saved_kib"]))
        ]
        spread = (max(x["step_ms"] for x in r) - min(x["step_ms"] for x in r)) / med["step_ms"]
        rows.append({"schedule": label, "m": m, "launches": len(r), "spread": spread, **med})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| schedule | m | step ms (median) | samples/s | reconstructed ms | measured/reconstructed "
        "| span measured/reconstructed | bubble measured | bubble reconstructed "
        "| saved KiB per rank | spread |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['schedule']} | {r['m']} | failed: {r['error']} |" + " |" * 8)
            continue
        saved = " / ".join(f"{k:.0f}" for k in r["saved_kib"])
        lines.append(
            f"| {r['schedule']} | {r['m']} | {r['step_ms']:.2f} | {r['samples_per_s']:.0f} | "
            f"{r['pred_ms']:.2f} | {r['ratio']:.2f} | {r['span_ratio']:.2f} | {r['bubble']:.0%} | "
            f"{r['bubble_pred']:.0%} | {saved} | {r['spread']:.0%} |"
        )
    return "\n".join(lines + backward_lines(rows))


def backward_lines(rows: list[dict[str, Any]]) -> list[str]:
    """zb1's backward (I + W) against 1f1b's (B) at each m, both measured per microbatch: W must
    be deferred work, not a second backward."""
    by = {(r["schedule"], r["m"]): r for r in rows if "error" not in r and "backward_ms" in r}
    out = []
    for (name, m), zb in sorted(by.items()):
        ref = by.get(("1f1b", m))
        if name == "zb1" and ref is not None and ref["backward_ms"] > 0:
            out.append(
                f"zb1 m={m}: backward (I + W) {zb['backward_ms']:.3f} ms per microbatch over all "
                f"stages, 1f1b (B) {ref['backward_ms']:.3f} ms: "
                f"ratio {zb['backward_ms'] / ref['backward_ms']:.3f}"
            )
    return ["", *out] if out else []


def event_cost(n: int = 200_000) -> float:
    """Seconds one recorded event costs (`Tracer.begin` + `Tracer.end`), median of 5 runs."""
    from splitgraph.observe.trace import Tracer

    tr = Tracer()
    tr.active = True
    runs = []
    for _ in range(5):
        tr.events.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            tr.end(tr.begin(), "0F0", "F")
        runs.append((time.perf_counter() - t0) / n)
    tr.events.clear()
    return statistics.median(runs)


def overhead(nproc: int, repeats: int, steps: int, extra: list[str], workdir: Path) -> dict:
    """Median step time with every step traced vs tracing off, alternating launches."""
    on, off = [], []
    for rnd in range(repeats):
        for traced in (True, False) if rnd % 2 == 0 else (False, True):
            ov = [
                f"train.steps={steps}",
                f"trace.enabled={str(traced).lower()}",
                "trace.warmup=0",
                f"trace.steps={steps}",
                "checkpoint.save=false",
                *extra,
            ]
            s = run_training(nproc, ov, workdir / f"o{rnd}{int(traced)}")
            (on if traced else off).append(s["step_time_median_s"])
            print(
                f"round {rnd + 1}/{repeats} trace={traced}: {1e3 * s['step_time_median_s']:.3f} ms",
                file=sys.stderr,
                flush=True,
            )
    m_on, m_off = statistics.median(on), statistics.median(off)
    # Launch-to-launch noise hides a 1% effect, so also price the recording itself: the
    # events of a traced step times what one event costs this process (measured below).
    trace = json.loads((workdir / "o01" / "trace.json").read_text())  # round 0, traced
    slices = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    per_step = len(slices) / (steps * nproc)  # events per rank per step
    per_event = event_cost()
    return {
        "traced_ms": 1e3 * m_on,
        "untraced_ms": 1e3 * m_off,
        "ratio": m_on / m_off,
        "events_per_rank_per_step": per_step,
        "event_cost_us": 1e6 * per_event,
        "recording_share": per_step * per_event / m_off,
        "launches_each": repeats,
        "traced_all_ms": [1e3 * x for x in on],
        "untraced_all_ms": [1e3 * x for x in off],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m splitgraph.bench.schedules", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--microbatches", default="1,2,4,8")
    ap.add_argument("--schedules", help="comma-separated subset, e.g. 1f1b,zb1 (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--overhead", action="store_true", help="measure the cost of tracing")
    ap.add_argument("--out", type=Path, help="write the result here (.md and .json)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    cmd = "python -m splitgraph.bench.schedules " + " ".join(argv or sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="splitgraph-bench-") as tmp:
        if args.overhead:
            result = overhead(args.nproc, args.repeats, args.steps, args.overrides, Path(tmp))
            text = (
                f"tracing every step: {result['traced_ms']:.3f} ms median step, "
                f"untraced {result['untraced_ms']:.3f} ms: ratio {result['ratio']:.4f} "
                f"({result['launches_each']} launches each, alternating; launch medians "
                f"{min(result['untraced_all_ms']):.2f}-{max(result['untraced_all_ms']):.2f} ms "
                f"untraced)\nrecording: {result['events_per_rank_per_step']:.0f} events per "
                f"rank per step x {result['event_cost_us']:.2f} us = "
                f"{result['recording_share']:.2%} of the untraced step"
            )
        else:
            mbs = [int(x) for x in args.microbatches.split(",")]
            names = args.schedules.split(",") if args.schedules else None
            try:
                configurations(args.nproc, mbs, names)
            except ValueError as e:
                ap.error(str(e))
            rows = sweep(
                args.nproc, mbs, args.repeats, args.steps, args.overrides, Path(tmp), names
            )
            result = {"rows": rows}
            text = table(rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"<!-- {cmd} -->\n\nMachine: {machine()}; gloo, OMP_NUM_THREADS=1, "
            f"{time.strftime('%Y-%m-%d')}.\n\n"
        )
        args.out.with_suffix(".md").write_text(header + text + "\n")
        args.out.with_suffix(".json").write_text(
            json.dumps({"command": cmd, "machine": machine(), **result}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
