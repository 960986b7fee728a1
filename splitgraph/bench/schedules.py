"""Schedules side by side on real runs: step time, throughput, bubble measured and reconstructed,
and activation memory per stage.

    python -m splitgraph.bench.schedules --nproc 2 --repeats 3
    python -m splitgraph.bench.schedules --nproc 2 --overhead      # what tracing costs
    launch/bench_schedules.sh                      # issue 18's tables at p=2 and p=4 (~14 min)

Each configuration (schedule x microbatches, at fixed ranks) is a real launch
(`splitgraph-train --nproc N`) of
`splitgraph.train`. Every round runs every configuration once, in a rotated order, so drift
on the machine lands on all of them; the table reports the median over rounds of each
launch's median step. The reconstruction is the simulator fed with that launch's own measured
per-stage costs (see observe/trace.py): it checks the simulator, it is not a prediction (the
planner's a-priori prediction is `python -m splitgraph.bench.predict`'s). `--overhead`
alternates the default run with tracing on (every step recorded) and off, and reports the
ratio of median step times.

After the rows each table reads off issue 18's criteria at each m (zbv and auto against zb1's
bubble and 1F1B's saved peak, zb2 below zb1, auto's step against the best fixed schedule
within the noise floor, zb1's I+W over B), printing yes or NO with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
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
    # auto within 1F1B's memory: pipeline.memory_cap set, per run, to the largest per-rank
    # bytes (parameters, gradients, optimizer state and saved activations) 1F1B needs there.
    # Two chunks only: with one, the cap leaves auto 1F1B's own room (zb1 does not fit).
    ("auto-cap1f1b v=2", ["schedule=auto", "schedule.virtual_stages=2"]),
]

#: Labels whose memory cap is 1F1B's (see `onefoneb_bytes`).
CAPPED = "auto-cap1f1b"


#: Untraced steps before the traced window: the first steps run slower (allocator, gloo's
#: connections, caches).
WARMUP = 10


def onefoneb_bytes(nproc: int, m: int, extra: Sequence[str]) -> tuple[list[int], list[int]]:
    """Per rank, what 1F1B holds at m microbatches with these overrides: the saved-activation
    peak and the whole (static + saved: what `pipeline.memory_cap` counts), from the exact
    memory model (tests/test_memory*.py hold it to the measured bytes)."""
    from splitgraph.config import Workload, load_config
    from splitgraph.cost.costs import model_costs
    from splitgraph.cost.memory_model import plan_walk, predict_saved_peak
    from splitgraph.partition import make_plan
    from splitgraph.schedule import build_schedule

    cfg = load_config(
        [*extra, f"pipeline.stages={nproc}", f"pipeline.microbatches={m}", "schedule=1f1b"]
    )
    work = Workload.of(cfg)
    plan = make_plan(work, nproc)
    mc = model_costs(work, plan.num_stages, times=False)
    walk = plan_walk(mc.shape, plan.bounds, mc.sizes, mc.recompute)
    saved = predict_saved_peak(build_schedule("1f1b", nproc, len(mc.sizes), 1), walk)
    static = [mc.static_bytes(plan.bounds[r], plan.bounds[r + 1]) for r in range(nproc)]
    return list(saved), [a + b for a, b in zip(saved, static)]


def auto_link(extra: Sequence[str]) -> list[str]:
    """pipeline.bandwidth and latency for the auto rows: this host's gloo link as the planner
    measures it (cached), measured here, before the launch, if never measured. The
    trainer's auto reads the same cache entry (costs.auto_link); naming the numbers makes
    the rows' schedules independent of the cache."""
    from splitgraph.config import load_config
    from splitgraph.cost.profiler import measured_link

    link = measured_link(load_config(list(extra)).costs)
    return [f"pipeline.bandwidth={int(link.bandwidth)}", f"pipeline.latency={link.latency:.3e}"]


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


def compute_medians(trace: dict[str, Any]) -> dict[tuple[str, int], float]:
    """(kind, stage) -> median seconds of one compute action (F, B, I, W) in a run's
    trace.json, less the time it sat blocked on its own receive. Medians, not the
    prediction's means: on a shared machine a descheduled action inflates a mean, and more
    so where the backward is two actions; the ratio I+W over B is about the work."""
    import re

    waits: dict[tuple[int, int, str], list[tuple[float, float]]] = {}
    acts = []
    for e in trace["traceEvents"]:
        if e.get("ph") != "X":
            continue
        key = (e["pid"], e["args"]["step"], e["name"])
        if e["cat"] == "wait":
            waits.setdefault(key, []).append((e["ts"], e["ts"] + e["dur"]))
        elif e["cat"] in ("F", "B", "I", "W"):
            acts.append(e)
    out: dict[tuple[str, int], list[float]] = {}
    for e in acts:
        match = re.fullmatch(r"(\d+)[FBIW](\d+)", e["name"])
        if match is None:
            raise ValueError(f"trace.json: unexpected compute event name {e['name']!r}")
        stage, mb = match.groups()
        recv = f"{stage}RECV_F{mb}" if e["cat"] == "F" else f"{stage}RECV_B{mb}"
        lo, hi = e["ts"], e["ts"] + e["dur"]
        blocked = sum(
            min(b, hi) - max(a, lo)
            for a, b in waits.get((e["pid"], e["args"]["step"], recv), [])
            if e["cat"] != "W" and b > lo and a < hi
        )
        out.setdefault((e["cat"], int(stage)), []).append(1e-6 * (e["dur"] - blocked))
    return {k: statistics.median(v) for k, v in out.items()}


def backward_median_ms(trace: dict[str, Any]) -> float:
    """A microbatch's backward summed over the stages, from per-stage medians: B, or I + W."""
    med = compute_medians(trace)
    return 1e3 * sum(v for (kind, _), v in med.items() if kind in ("B", "I", "W"))


def sweep(
    nproc: int,
    microbatches: list[int],
    repeats: int,
    steps: int,
    extra: list[str],
    workdir: Path,
    names: list[str] | None = None,
    warmup: int = WARMUP,
) -> list[dict[str, Any]]:
    configs = configurations(nproc, microbatches, names)
    link = auto_link(extra) if any(c[0].startswith("auto") for c in configs) else []
    for i, (label, m, ov) in enumerate(configs):
        if label.startswith("auto"):
            ov = [*ov, *link]
        if label.startswith(CAPPED):
            saved, total = onefoneb_bytes(nproc, m, extra)
            ov = [*ov, f"pipeline.memory_cap={max(total)}"]
        configs[i] = (label, m, ov)
    runs: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(configs))}
    errors: dict[int, str] = {}
    common = [  # `warmup` untraced steps, then `steps` traced ones
        f"train.steps={steps + warmup}",
        f"trace.warmup={warmup}",
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
                run_dir = workdir / f"r{rnd}c{i}"
                summary = run_training(nproc, [*common, *ov], run_dir)
                one = _one(summary)
                one["round"] = rnd
                one["backward_median_ms"] = backward_median_ms(
                    json.loads((run_dir / "trace.json").read_text())
                )
                runs[i].append(one)
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
        med = {
            k: statistics.median(x[k] for x in r) for k in r[0] if k not in ("saved_kib", "round")
        }
        med["saved_kib"] = [
            statistics.median(x["saved_kib"][s] for x in r) for s in range(len(r[0]["saved_kib"]))
        ]
        spread = (max(x["step_ms"] for x in r) - min(x["step_ms"] for x in r)) / med["step_ms"]
        row = {"schedule": label, "m": m, "launches": len(r), "spread": spread, **med}
        row["per_round"] = {
            int(x["round"]): {
                "step_ms": x["step_ms"],
                "backward_median_ms": x["backward_median_ms"],
            }
            for x in r
        }
        if label.startswith(CAPPED):
            saved, total = onefoneb_bytes(nproc, m, extra)
            row["cap_bytes"] = max(total)
            row["onefoneb_saved_kib"] = [b / 1024 for b in saved]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], nproc: int = 2, cores: int | None = None) -> str:
    """The rows, then zb1's backward against 1f1b's and issue 18's criteria, each checked.
    `p` is marked `*` where the ranks outnumber the cores (oversubscribed: ranks share a
    core, so bubbles and steps include time-slicing)."""
    cores = cores or os.cpu_count() or 1
    ptext = f"{nproc}*" if nproc > cores else str(nproc)
    head = (
        "| schedule | p | m | step ms (median) | samples/s | reconstructed ms "
        "| measured/reconstructed | span measured/reconstructed | bubble measured "
        "| bubble reconstructed | saved KiB per rank | spread |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['schedule']} | {ptext} | {r['m']} | failed: {r['error']} |" + " |" * 8
            )
            continue
        saved = " / ".join(f"{k:.0f}" for k in r["saved_kib"])
        lines.append(
            f"| {r['schedule']} | {ptext} | {r['m']} | {r['step_ms']:.2f} | "
            f"{r['samples_per_s']:.0f} | {r['pred_ms']:.2f} | {r['ratio']:.2f} | "
            f"{r['span_ratio']:.2f} | {r['bubble']:.0%} | {r['bubble_pred']:.0%} | {saved} | "
            f"{r['spread']:.0%} |"
        )
    notes = []
    if nproc > cores:
        notes.append(
            f"\n`p*`: {nproc} ranks on {cores} cores, oversubscribed: ranks take turns on a "
            "core, so a rank's idle time includes waiting for the CPU, not only for data."
        )
    return "\n".join(lines + notes + backward_lines(rows) + criteria(rows))


def _paired(zb: dict[str, Any], ref: dict[str, Any], key: str) -> float | None:
    """Median over rounds of zb's value over ref's from the same round (adjacent launches:
    the machine's drift between rounds cancels); None without a common round."""
    a, b = zb.get("per_round", {}), ref.get("per_round", {})
    ratios = [a[k][key] / b[k][key] for k in a if k in b and b[k][key] > 0]
    return statistics.median(ratios) if ratios else None


def backward_lines(rows: list[dict[str, Any]]) -> list[str]:
    """zb1's backward (I + W) against 1f1b's (B) at each m, both measured per microbatch: W must
    be deferred work, not a second backward. Two readings: per-stage medians of each launch's
    actions (less blocked receives), paired by round; and the means the prediction uses,
    median over launches."""
    by = {(r["schedule"], r["m"]): r for r in rows if "error" not in r and "backward_ms" in r}
    out = []
    for (name, m), zb in sorted(by.items()):
        ref = by.get(("1f1b", m))
        if name == "zb1" and ref is not None and ref["backward_ms"] > 0:
            paired = _paired(zb, ref, "backward_median_ms")
            shown = f"{paired:.3f}" if paired is not None else "n/a"
            out.append(
                f"zb1 m={m}: backward per microbatch over all stages, medians: (I + W) "
                f"{zb['backward_median_ms']:.3f} ms, 1f1b (B) {ref['backward_median_ms']:.3f} ms, "
                f"ratio paired by round {shown}; means: {zb['backward_ms']:.3f} / "
                f"{ref['backward_ms']:.3f} ms = {zb['backward_ms'] / ref['backward_ms']:.3f}"
            )
    return ["", *out] if out else []


def criteria(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 18's 'done when', each read off the rows at each m: yes or no, with the numbers.
    Noise floor: the larger spread of the two rows compared."""
    ok = [r for r in rows if "error" not in r]
    out = []
    for m in sorted({r["m"] for r in ok}):
        at = {r["schedule"]: r for r in ok if r["m"] == m}
        zb1, f1b = at.get("zb1"), at.get("1f1b")
        if zb1 is None or f1b is None:
            continue
        peak_1f1b = max(f1b["saved_kib"])
        for name, r in at.items():
            if name.startswith(("zbv", "auto")):
                b_ok = r["bubble"] <= zb1["bubble"]
                m_ok = max(r["saved_kib"]) <= peak_1f1b * (1 + 1e-9)
                out.append(
                    f"m={m} {name}: bubble {r['bubble']:.0%} <= zb1's {zb1['bubble']:.0%}: "
                    f"{'yes' if b_ok else 'NO'}; peak saved {max(r['saved_kib']):.0f} KiB <= "
                    f"1f1b's {peak_1f1b:.0f}: {'yes' if m_ok else 'NO'}"
                )
        if "zb2" in at:
            z2 = at["zb2"]
            out.append(
                f"m={m} zb2: bubble {z2['bubble']:.0%} < zb1's {zb1['bubble']:.0%}: "
                f"{'yes' if z2['bubble'] < zb1['bubble'] else 'NO'}"
            )
        fixed = [r for n, r in at.items() if not n.startswith("auto")]
        for name, r in at.items():
            if not name.startswith("auto"):
                continue
            pool = fixed
            if name.startswith(CAPPED):  # the fixed schedules that fit the same cap
                pool = [f for f in fixed if max(f["saved_kib"]) <= peak_1f1b * (1 + 1e-9)]
            if not pool:
                continue
            best = min(pool, key=lambda f: f["step_ms"])
            noise = max(best["spread"], r["spread"])
            s_ok = r["step_ms"] <= best["step_ms"] * (1 + noise)
            fits = " that fits" if pool is not fixed else ""
            out.append(
                f"m={m} {name}: step {r['step_ms']:.2f} ms <= best fixed{fits} "
                f"({best['schedule']}) {best['step_ms']:.2f} ms within the noise floor "
                f"{noise:.0%}: {'yes' if s_ok else 'NO'}"
            )
        paired = _paired(zb1, f1b, "backward_median_ms")
        if paired is not None:
            out.append(
                f"m={m} zb1: (I + W) / B {paired:.2f} <= 1.10 (medians, paired by round): "
                f"{'yes' if paired <= 1.10 else 'NO'}"
            )
    return ["", "Issue 18 criteria, read off the rows above:", *out] if out else []


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
    ap.add_argument("--steps", type=int, default=60, help="traced steps per launch")
    ap.add_argument("--warmup", type=int, default=WARMUP, help="untraced steps before them")
    ap.add_argument("--overhead", action="store_true", help="measure the cost of tracing")
    ap.add_argument("--out", type=Path, help="write the result here (.md and .json)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    cmd = "python -m splitgraph.bench.schedules " + " ".join(argv or sys.argv[1:])
    load = os.getloadavg()  # stated with the numbers: other work makes them preliminary
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
                args.nproc,
                mbs,
                args.repeats,
                args.steps,
                args.overrides,
                Path(tmp),
                names,
                args.warmup,
            )
            result = {"rows": rows, "cores": os.cpu_count(), "load_start": load}
            text = table(rows, args.nproc)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"<!-- {cmd} -->\n\nMachine: {machine()}; gloo, OMP_NUM_THREADS=1, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at the start "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end "
            f"{os.getloadavg()[0]:.2f} (the 1-minute average counts the bench's own ranks and, "
            "at the start, the decay of whatever ran just before; other jobs on the machine "
            "make the numbers preliminary).\n\n"
        )
        args.out.with_suffix(".md").write_text(header + text + "\n")
        args.out.with_suffix(".json").write_text(
            json.dumps({"command": cmd, "machine": machine(), **result}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
