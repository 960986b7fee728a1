"""Sweeps: every point of a Hydra multirun is a whole comparison in `<sweep dir>/<job>/`;
`collect` gathers their variants into one table, `sweep.md` and `sweep.csv`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from splitgraph.compare.report import CSV_COLUMNS
from splitgraph.units import format_bytes


def collect(sweep_dir: Path) -> Path | None:
    """One table of every finished sweep point's variants (rewritten after each point)."""
    points = []
    for path in sorted(sweep_dir.glob("*/results.json"), key=lambda p: _job_key(p.parent.name)):
        data = json.loads(path.read_text())
        points.append((path.parent.name, data["meta"], data["rows"]))
    if not points:
        return None
    rows_out, lines = [], []
    cols = [
        "job",
        "overrides",
        "variant",
        "status",
        "devices",
        "peak",
        "median step",
        "samples/s",
        "time to target",
        "test acc",
    ]
    lines += [
        f"# Sweep: {len(points)} point(s)",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for job, meta, rows in points:
        over = " ".join(meta.get("overrides", []))
        for r in rows:
            rows_out.append({"job": job, "overrides": over, **r})
            cells = [
                job,
                f"`{over}`",
                r["label"],
                r["status"],
                r["devices"],
                format_bytes(r["peak_bytes"]) if r["peak_bytes"] else "",
                _opt(r["step_time_median_s"], ".4f"),
                _opt(r["samples_per_s"], ".0f"),
                _opt(r.get("time_to_target_s"), ".2f"),
                _opt(r["final_test_accuracy"], ".4f"),
            ]
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    (sweep_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "overrides", *CSV_COLUMNS], extrasaction="ignore")
        w.writeheader()
        for r in rows_out:
            w.writerow(r)
    return sweep_dir / "sweep.md"


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def _opt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)
