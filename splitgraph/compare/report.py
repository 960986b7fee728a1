"""report.md, summary.csv, results.json and the figures of one comparison."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from splitgraph.compare.predict import static_bytes
from splitgraph.units import format_bytes

#: the columns of summary.csv, in order (rows keep more, for results.json)
CSV_COLUMNS = [
    "variant",
    "label",
    "kind",
    "phase",
    "status",
    "devices",
    "batch",
    "schedule",
    "microbatches",
    "lr",
    "cap_bytes",
    "peak_bytes",
    "predicted_peak_bytes",
    "predicted_static_bytes",
    "accounted_source",
    "fits",
    "peak_rss_bytes",
    "steps",
    "epochs",
    "train_time_s",
    "wall_s",
    "step_time_median_s",
    "samples_per_s",
    "device_seconds_per_epoch",
    "comm_bytes_per_step",
    "comm_messages_per_step",
    "time_to_target_s",
    "epochs_to_target",
    "device_seconds_to_target",
    "final_train_loss",
    "final_train_accuracy",
    "final_test_loss",
    "final_test_accuracy",
    "weights_rel_diff",
    "loss_early_diff",
    "loss_same_until",
    "loss_max_abs_diff",
    "test_loss_gap",
    "memory_mismatches",
    "dp",
    "launched",
    "error",
]

FIGURES = {
    "loss_vs_time": "held-out loss and accuracy against training seconds",
    "loss_vs_samples": "held-out loss and accuracy against samples seen (epochs)",
    "memory": "accounted peak memory per device, by component, with the cap",
    "throughput": "samples per second and device-seconds per epoch",
}


def write_csv(path: Path, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    cols = [*(extra or {}), *CSV_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**(extra or {}), **{c: _csv_value(r.get(c)) for c in CSV_COLUMNS}})


def _csv_value(v: Any) -> Any:
    if isinstance(v, list):
        return " | ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return v.replace("\n", " | ")
    return v


def write_json(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Everything the report and the figures are drawn from, the held-out curves included (the
    per-step training loss stays in each run's metrics.jsonl); one row per line."""
    clean = [{k.lstrip("_"): v for k, v in r.items() if k != "_steps"} for r in rows]
    lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in clean)
    path.write_text(f'{{"meta": {json.dumps(meta, indent=1)},\n"rows": [\n{lines}\n]}}\n')


# -- figures --------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves_figure(rows: list[dict[str, Any]], x: str, target: float | None, path: Path) -> None:
    plt = _plt()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        pts = r["_points"]
        if not pts:
            continue
        xs = [p["elapsed"] if x == "time" else p["samples"] / r["_num_train"] for p in pts]
        style = "--" if r["kind"] == "reference" else "-"
        ax_l.plot(xs, [p["test_loss"] for p in pts], style, marker=".", label=r["label"])
        if all("test_accuracy" in p for p in pts):
            ax_a.plot(xs, [p["test_accuracy"] for p in pts], style, marker=".", label=r["label"])
    if target is not None:
        ax_l.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:.3f}")
    xlabel = "training seconds (evaluation excluded)" if x == "time" else "epochs (samples seen)"
    for ax, name in ((ax_l, "held-out loss"), (ax_a, "held-out accuracy")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if ax_l.get_legend_handles_labels()[0]:
        ax_l.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_figure(rows: list[dict[str, Any]], cap: int | None, path: Path) -> None:
    plt = _plt()
    from matplotlib.patches import Patch

    parts = ("params", "grads", "optimizer", "allreduce_buckets", "saved_peak")
    names = (
        "parameters",
        "gradients",
        "optimizer state",
        "all-reduce buckets (dp)",
        "saved activations (peak)",
    )
    colors = ("#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b2")
    labels, stacks, oom = [], [], []
    for r in rows:
        # one replica's ranks: the others hold the same
        per = r["accounted_per_rank"][: max(r["devices"] // int(r.get("dp") or 1), 1)]
        for rank in per:
            labels.append(f"{r['label']}\nrank {rank['rank']}" if len(per) > 1 else r["label"])
            stacks.append([rank.get(k) or 0 for k in parts])
            oom.append(r["status"] == "oom")
    top = max([sum(s) for s in stacks] + [cap or 0])
    unit, scale = ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
    fig, ax = plt.subplots(figsize=(min(max(6, 0.5 * len(labels) + 3), 22), 6))
    xs = list(range(len(labels)))
    bottom = [0.0] * len(labels)
    for i, color in enumerate(colors):
        vals = [s[i] / scale for s in stacks]
        bars = ax.bar(xs, vals, bottom=bottom, color=color, edgecolor="white")
        for bar, hatched in zip(bars, oom):
            bar.set_hatch("//" if hatched else "")
        bottom = [b + v for b, v in zip(bottom, vals)]
    handles = [Patch(color=c, label=n) for c, n in zip(colors, names)]
    if any(oom):
        handles.append(
            Patch(facecolor="white", edgecolor="grey", hatch="//", label="out of memory")
        )
    if cap is not None:
        line = ax.axhline(cap / scale, color="black", ls="--", lw=1.2)
        handles.append(line)
        line.set_label(f"cap {format_bytes(cap)}")
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{unit} per device (accounting)")
    ax.set_title(
        "peak memory per device (one replica's ranks): parameters + gradients + optimizer "
        "(+ all-reduce buckets) + saved activations",
        fontsize=9,
    )
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_figure(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    ok = [r for r in rows if r["samples_per_s"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(ok))
    names = [r["label"] for r in ok]
    a.bar(xs, [r["samples_per_s"] for r in ok], color="#4c72b0")
    a.set_ylabel("samples / s (median step)")
    b.bar(xs, [r["device_seconds_per_epoch"] for r in ok], color="#dd8452")
    b.set_ylabel("device-seconds per epoch")
    for ax in (a, b):
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(
    out: Path, rows: list[dict[str, Any]], cap: int | None, target: float | None
) -> list[str]:
    main = [r for r in rows if r["phase"] == "epochs"]
    ran = [r for r in main if r["status"] == "ok"]
    _curves_figure(ran, "time", target, out / "loss_vs_time.png")
    _curves_figure(ran, "samples", target, out / "loss_vs_samples.png")
    _memory_figure([r for r in main if r["accounted_per_rank"]], cap, out / "memory.png")
    _throughput_figure(ran, out / "throughput.png")
    return [f"{name}.png" for name in FIGURES]


# -- report.md -------------------------------------------------------------------------------


def _b(x: Any) -> str:
    return "" if x is None else format_bytes(x)


def _f(x: Any, spec: str = ".4f") -> str:
    return "" if x is None else format(x, spec)


def _status(r: dict[str, Any]) -> str:
    if r["status"] == "oom":
        per = r["accounted_per_rank"]
        static = max((static_bytes(a) for a in per), default=None)
        over = r["cap_bytes"] is not None and static is not None and static > r["cap_bytes"]
        why = f" (parameter state alone {_b(static)})" if over else ""
        how = "" if r.get("launched", True) else "; refused before launch"
        return f"**OOM**, needed {_b(r['peak_bytes'])}{why}{how}"
    if r["status"] == "failed":
        return "**failed**"
    if r["fits"] is False:
        return "ran uncapped; over the cap"
    return "fits" if r["fits"] else "ran"


def _predicted(r: dict[str, Any]) -> str:
    """The harness's prediction before launch, and whether the runtime's figures equal it."""
    if r.get("predicted_peak_bytes") is None:
        return ""
    text = _b(r["predicted_peak_bytes"])
    bad = r.get("memory_mismatches")
    if bad is None:
        return text
    return text + (" (=)" if not bad else " (**differs**)")


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(fn(r)) for _, fn in cols) + " |")
    return lines


def _header(meta: dict[str, Any]) -> list[str]:
    """The report's title, its command, and what was compared on what."""
    cap, target = meta["cap_bytes"], meta["target_loss"]
    return [
        f"# Comparison `{meta['name']}`: what to do when the graph is too large for one device",
        "",
        "Regenerate with:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- Model: {meta['model']}; data: {meta['data']}; minibatch B={meta['batch']}, "
        f"k={meta['k']}; optimizer: {meta['optim']}; dtype {meta['dtype']}.",
        f"- Memory cap: {_b(cap) or 'none'} per device. On CPU the cap is applied to an exact "
        "accounting per process (parameters + gradients + optimizer state (+ the all-reduce "
        "buckets with data parallelism) + the peak bytes saved for backward, counted by "
        "saved-tensor hooks); peak RSS is measured and shown beside it but not capped. The "
        "held-out evaluation and the final model.pt gather the weights (parameters only) to "
        "rank 0's host: the harness's instruments, outside the cap.",
        f"- Budgets: {meta['epochs']} epochs for every variant"
        + (
            f"; and a wall-clock budget of {meta['time_budget']:g} s of training."
            if meta["time_budget"]
            else "."
        )
        + f" Target held-out loss: {_f(target)} ({meta['target_source']}).",
        f"- Machine: {meta['machine']}. {meta['noise']}",
        "",
        "## Results after the epoch budget",
        "",
    ]


#: the columns of the epoch-budget table
_MAIN_COLUMNS: list[tuple[str, Any]] = [
    ("variant", lambda r: r["label"]),
    ("devices", lambda r: r["devices"]),
    ("memory cap", _status),
    ("peak/device (accounted)", lambda r: _b(r["peak_bytes"])),
    ("predicted", _predicted),
    ("peak RSS", lambda r: _b(r["peak_rss_bytes"])),
    ("median step", lambda r: _f(r["step_time_median_s"], ".4f")),
    ("samples/s", lambda r: _f(r["samples_per_s"], ".0f")),
    ("device-s/epoch", lambda r: _f(r["device_seconds_per_epoch"], ".2f")),
    ("p2p/step", lambda r: _b(r["comm_bytes_per_step"])),
    ("time to target", lambda r: _f(r.get("time_to_target_s"), ".2f")),
    ("epochs to target", lambda r: _f(r.get("epochs_to_target"), ".2f")),
    ("test loss", lambda r: _f(r["final_test_loss"])),
    ("test acc", lambda r: _f(r["final_test_accuracy"])),
    ("train acc", lambda r: _f(r["final_train_accuracy"])),
    ("weights vs ref", lambda r: _f(r.get("weights_rel_diff"), ".1e")),
]


def _errors_and_commands(rows: list[dict[str, Any]]) -> list[str]:
    """The failed variants' errors, then every variant's command."""
    lines: list[str] = []
    bad = [r for r in rows if r["status"] != "ok" and r["error"]]
    if bad:
        lines += ["", "## Errors", ""]
        for r in bad:
            lines += [
                f"`{r['variant']}` ({r['status']}):",
                "",
                "```",
                r["error"].strip(),
                "```",
                "",
            ]
    lines += ["", "## Each variant's command", ""]
    for r in rows:
        lines += [f"`{r['variant']}`:", "", "```", r["command"] or "(not started)", "```", ""]
    return lines


def markdown(
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    conclusion: list[str],
    figures: list[str],
) -> str:
    main = [r for r in rows if r["phase"] == "epochs"]
    timed = [r for r in rows if r["phase"] == "time"]
    lines = _header(meta)
    lines += _table(main, _MAIN_COLUMNS)
    lines += [
        "",
        "Times are training seconds (the sum of step times; held-out evaluation and process "
        "start-up excluded; start-up is in summary.csv as `wall_s`). *predicted*: the largest "
        "device's bytes as the harness priced them before launch (cost model and memory "
        "model); (=) where every part on every rank equals the runtime's accounting (measured "
        "after the first step, or the runtime's own check before it). *weights vs ref*: the "
        "largest relative difference of any weight from the reference after the same epochs.",
        "",
    ]
    if timed:
        lines += [f"## Results after the wall-clock budget ({meta['time_budget']:g} s)", ""]
        lines += _table(
            timed,
            [
                ("variant", lambda r: r["label"]),
                ("status", _status),
                ("steps", lambda r: r["steps"] or ""),
                ("epochs", lambda r: _f(r["epochs"], ".2f")),
                ("test loss", lambda r: _f(r["final_test_loss"])),
                ("test acc", lambda r: _f(r["final_test_accuracy"])),
                ("train acc", lambda r: _f(r["final_train_accuracy"])),
            ],
        )
        lines.append("")
    lines += ["## Conclusion", "", *[f"- {c}" for c in conclusion], ""]
    lines += ["## Figures", ""]
    lines += [f"![{FIGURES[Path(f).stem]}]({f})" for f in figures]
    lines += ["", "## How the variants are built", ""]
    lines += [f"- {n}" for n in meta["notes"]]
    lines += _errors_and_commands(rows)
    return "\n".join(lines).rstrip() + "\n"


def write(
    out: Path,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    conclusion: list[str],
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(out, rows, meta["cap_bytes"], meta["target_loss"])
    write_csv(out / "summary.csv", rows)
    write_json(out / "results.json", rows, {**meta, "conclusion": conclusion})
    path = out / "report.md"
    path.write_text(markdown(rows, meta, conclusion, figures))
    return path
