"""launch/gpu_check.sh's last step: what comes back from a lent GPU machine.

    python launch/gpu_collect.py OUT SCRATCH CARD

Writes OUT/results.json (every step's outcome and time, the throughput ratios, each
pipeline run's step time, memory and timeline figures, the comparison's verdicts) and
OUT/runs.tar.gz: the runs' summaries, metrics, traces, timelines, memory pictures and the
comparison's report and figures, never weights or checkpoints. The device tool returns at most
8 files of 16 MiB each (64 MiB in all, at most 2 folders deep), so the tarball is kept under
16 MiB: if it is larger, the traces go first, then the run logs, then everything but the
summaries and reports, each cut said in results.json.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path
from typing import Any

LIMIT = 16 * 2**20  # per file, what comes back
KEPT = (".json", ".jsonl", ".png", ".md", ".csv", ".txt", ".log")
NEVER = (".pt", ".pth", ".distcp", ".safetensors", ".bin")
#: the comparison's columns brought into results.json (the report has them all)
ROW_KEYS = (
    "variant",
    "status",
    "error",
    "fits",
    "cap_bytes",
    "peak_bytes",
    "peak_bytes_per_rank",
    "step_time_median_s",
    "samples_per_s",
    "final_test_loss",
    "weights_rel_diff",
    "wall_s",
)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(scratch: Path) -> list[dict[str, Any]]:
    rows = []
    path = scratch / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, outcome, seconds = (line.split("\t") + ["", ""])[:3]
        rows.append({"step": name, "outcome": outcome, "seconds": float(seconds or 0)})
    return rows


def _pipeline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one pipeline run, without the per-sample series."""
    mem = []
    for m in summary.get("memory_per_rank") or []:
        m = dict(m)
        nvml = m.pop("nvml", None) or {}
        m["nvml"] = {k: v for k, v in nvml.items() if k != "series"}
        mem.append(m)
    timeline = summary.get("timeline") or {}
    prediction = summary.get("prediction") or {}
    return {
        "step_time_median_s": summary.get("step_time_median_s"),
        "samples_per_s_median": summary.get("samples_per_s_median"),
        "transport": summary.get("transport"),
        "shared_gpu": summary.get("shared_gpu"),
        "note": summary.get("note"),
        "schedule": summary.get("schedule"),
        "memory_per_rank": mem,
        "timeline": {k: timeline.get(k) for k in ("measured", "predicted")},
        "measured_over_predicted_step_time": timeline.get("measured_over_predicted_step_time"),
        "prediction_step_time_s": prediction.get("step_time_s"),
        "link": prediction.get("link"),
        "torch": summary.get("torch"),
    }


def _files(runs: Path, drop: tuple[str, ...]) -> list[Path]:
    out = []
    for p in sorted(runs.rglob("*")):
        if not p.is_file() or p.suffix in NEVER or "checkpoints" in p.parts:
            continue
        if p.suffix in KEPT and not any(p.match(d) for d in drop):
            out.append(p)
    return out


def _tar(out: Path, scratch: Path, drop: tuple[str, ...]) -> int:
    path = out / "runs.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for f in _files(scratch / "runs", drop):
            tar.add(f, arcname=str(f.relative_to(scratch)))
    return path.stat().st_size


def collect(out: Path, scratch: Path, card: str) -> dict[str, Any]:
    res: dict[str, Any] = {"card": card, "steps": _steps(scratch)}
    env = _load(scratch / "env.json")
    if env:
        res["environment"] = env
    for name in ("stage_bf16", "stage_fp32"):
        got = _load(scratch / f"{name}.json")
        if got is not None:
            res[name] = got
    runs = scratch / "runs"
    for s in sorted(runs.glob("pp*/summary.json")):
        d = _load(s) or {}
        res[s.parent.name] = _pipeline(d) if d.get("status") == "ok" else d
    compare = _load(runs / "compare" / "results.json")
    if compare is not None:
        res["compare"] = {
            "conclusion": (compare.get("meta") or {}).get("conclusion"),
            "rows": [{k: r.get(k) for k in ROW_KEYS} for r in compare.get("rows") or []],
        }
    cuts: list[str] = []
    for drop, what in (
        ((), None),
        (("trace.json",), "traces (trace.json)"),
        (("trace.json", "*.log"), "run logs (*.log)"),
        (("trace.json", "*.log", "metrics.jsonl", "*.png"), "metrics and pictures"),
    ):
        if what:
            cuts.append(what)
        size = _tar(out, scratch, drop)
        if size <= LIMIT:
            break
    res["tarball"] = {"bytes": size, "left_out_to_fit_16MiB": cuts}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return res


def main(argv: list[str]) -> int:
    out, scratch, card = Path(argv[0]), Path(argv[1]), argv[2]
    res = collect(out, scratch, card)
    brief = {
        k: (v.get("ratio") if isinstance(v, dict) and "ratio" in v else v.get("step_time_median_s"))
        for k, v in res.items()
        if isinstance(v, dict) and ("ratio" in v or "step_time_median_s" in v)
    }
    print(json.dumps({"card": card, **brief, "tarball": res["tarball"]}, indent=1))
    for s in res["steps"]:
        print(f"{s['step']:<60} {s['outcome']:<24} {s['seconds']:6.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
