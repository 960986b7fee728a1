"""From run directories to one row of numbers per variant, and a conclusion computed from them.

Times are training seconds as each run measured them (`elapsed` in metrics.jsonl: the sum of
step times, held-out evaluation excluded); process start-up is reported apart (`wall_s`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitgraph.compare import predict
from splitgraph.compare.runner import Outcome
from splitgraph.compare.variants import Variant

CONTENDERS = ("full", "small", "accumulate", "recompute", "data", "pipeline")
#: variants that train on full's update (the same mathematics, summed in another order)
FULL_BATCH = ("accumulate", "data", "pipeline")


@dataclass
class Result:
    variant: Variant
    outcome: Outcome
    run_dir: Path


def curve(metrics: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The held-out evaluations: samples seen, training seconds, test loss (and accuracy)."""
    keep = ("step", "samples", "elapsed", "test_loss", "test_accuracy", "L")
    return [{k: r[k] for k in keep if k in r} for r in metrics if "test_loss" in r]


def first_reaching(points: list[dict[str, float]], target: float | None) -> dict | None:
    if target is None:
        return None
    return next((p for p in points if p["test_loss"] <= target), None)


def weights_rel_diff(a: Path, b: Path) -> float | None:
    """max over tensors of max|a - b| / max|b|: 0 for identical weights."""
    if not (a.exists() and b.exists()):
        return None
    sa = torch.load(a, map_location="cpu", weights_only=True)
    sb = torch.load(b, map_location="cpu", weights_only=True)
    if sa.keys() != sb.keys():
        return None
    out = 0.0
    for k, ref in sb.items():
        scale = float(ref.abs().max()) or 1.0
        out = max(out, float((sa[k].double() - ref.double()).abs().max()) / scale)
    return out


def _per_rank(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Accounted bytes per rank: from a finished run, or from an OOM record."""
    if summary.get("status") == "oom":
        return list(summary.get("accounted_per_rank") or [])
    return [m["accounted"] for m in summary.get("memory_per_rank", []) if m.get("accounted")]


def accounted_source(o: Outcome, per_rank: list[dict[str, Any]]) -> str | None:
    """Where the accounted figures come from: the runtime, measured after the first step (or
    at the step it stopped), the runtime before its first step, or the prediction alone."""
    if not per_rank:
        return None
    if not o.launched:
        return "predicted, not launched"
    if any(r.get("saved_peak_source") == "predicted" for r in per_rank):
        return "runtime, before the first step"
    return "runtime, measured"


def row(res: Result, num_train: int, cap: int | None, base_lr: float) -> dict[str, Any]:
    v, o = res.variant, res.outcome
    s = o.summary if o.status != "failed" else {}
    accounted = _per_rank(s)
    totals = [r["total"] for r in accounted]
    points = curve(o.metrics)
    final = s.get("final", {}) if o.status == "ok" else {}
    steps = s.get("steps") if o.status == "ok" else None
    spe = s.get("steps_per_epoch")
    med = s.get("step_time_median_s")
    needed = o.needed_bytes if o.status == "oom" else (max(totals) if totals else None)
    comm = s.get("comm_per_rank", [])
    predicted = o.predicted or []
    out: dict[str, Any] = {
        "variant": v.name,
        "label": v.label,
        "kind": v.kind,
        "phase": v.phase,
        "devices": v.nproc,
        "batch": v.batch,
        "schedule": v.settings.get("schedule.name"),
        "microbatches": v.settings.get("pipeline.microbatches"),
        "lr": v.settings.get("optim.lr", base_lr),
        "recompute": bool(v.settings.get("schedule.recompute")),
        "status": o.status,
        "error": o.error,
        "capped": v.capped,
        "cap_bytes": cap,
        "peak_bytes": needed,  # accounted, the largest rank (for OOM: what it needed)
        "fits": (needed <= cap) if (cap is not None and needed is not None) else None,
        "peak_bytes_per_rank": totals,
        "accounted_per_rank": accounted,
        "accounted_source": accounted_source(o, accounted),
        "launched": o.launched,
        "dp": int(v.settings.get("parallel.dp", 1)),
        "predicted_peak_bytes": max((r["total"] for r in predicted), default=None),
        "predicted_static_bytes": max((predict.static_bytes(r) for r in predicted), default=None),
        "predicted_per_rank": predicted,
        # part by part, rank by rank: empty when the runtime's figures equal the prediction
        "memory_mismatches": (
            predict.mismatches(predicted, accounted)
            if predicted and accounted and o.launched
            else None
        ),
        "peak_rss_bytes": max(
            (m.get("peak_rss_bytes") or 0 for m in s.get("memory_per_rank", [])), default=None
        ),
        "steps": steps,
        "epochs": (steps / spe) if (steps and spe) else None,
        "train_time_s": s.get("train_time_s") if o.status == "ok" else None,
        "wall_s": o.wall_s,
        "step_time_median_s": med if o.status == "ok" else None,
        "samples_per_s": s.get("samples_per_s_median") if o.status == "ok" else None,
        "device_seconds_per_epoch": (v.nproc * spe * med) if (o.status == "ok" and spe) else None,
        "comm_bytes_per_step": sum(c["bytes_sent_per_step"] for c in comm) if comm else None,
        "comm_messages_per_step": sum(c["messages_sent_per_step"] for c in comm) if comm else None,
        "final_train_loss": final.get("train", {}).get("loss"),
        "final_train_accuracy": final.get("train", {}).get("accuracy"),
        "final_test_loss": final.get("test", {}).get("loss"),
        "final_test_accuracy": final.get("test", {}).get("accuracy"),
        "test_samples": final.get("test", {}).get("samples"),
        "command": o.command,
    }
    out["_points"] = points
    out["_steps"] = [(r["step"], r["L"]) for r in o.metrics if "L" in r]
    out["_num_train"] = num_train
    return out


def derive(
    rows: list[dict[str, Any]], run_dirs: dict[str, Path], target: float | None
) -> float | None:
    """Fill in the cross-variant figures: the target loss (if not given), time and epochs to
    reach it, and each variant's distance from the reference's weights and trajectory."""
    main = [r for r in rows if r["phase"] == "epochs"]
    if target is None:
        finals = [
            r["final_test_loss"]
            for r in main
            if r["kind"] in CONTENDERS and r["status"] == "ok" and r["final_test_loss"] is not None
        ]
        target = max(finals) if finals else None
    for r in main:
        hit = first_reaching(r["_points"], target)
        r["time_to_target_s"] = hit["elapsed"] if hit else None
        r["epochs_to_target"] = hit["samples"] / r["_num_train"] if hit else None
        r["device_seconds_to_target"] = r["devices"] * hit["elapsed"] if hit else None
    ref = _reference(main)
    for r in main:
        for key in ("weights_rel_diff", "loss_max_abs_diff", "test_loss_gap"):
            r[key] = None
        r["loss_early_diff"] = r["loss_same_until"] = None
        if ref is None or r is ref or r["status"] != "ok":
            continue
        r["weights_rel_diff"] = weights_rel_diff(
            run_dirs[r["variant"]] / "model.pt", run_dirs[ref["variant"]] / "model.pt"
        )
        if r["batch"] == ref["batch"]:  # the same steps: compare the training loss step by step
            r.update(loss_agreement(r["_steps"], ref["_steps"]))
        mine_t = {p["samples"]: p["test_loss"] for p in r["_points"]}
        theirs_t = {p["samples"]: p["test_loss"] for p in ref["_points"]}
        common = sorted(set(mine_t) & set(theirs_t))
        r["test_loss_gap"] = max((abs(mine_t[s] - theirs_t[s]) for s in common), default=None)
    return target


#: the steps whose training loss says whether two runs compute the same update: step 0's
#: forward on the same initial weights, then the losses after the first two updates. Later
#: steps compound rounding (Adam, which moves every weight by about lr * sign(g), flips the
#: update of a weight whose gradient is near zero on a difference in the last bit).
EARLY_STEPS = 3


def loss_agreement(
    mine: list[tuple[int, float]],
    theirs: list[tuple[int, float]],
    early: int = EARLY_STEPS,
    tol: float = 1e-4,
) -> dict[str, Any]:
    """How two runs of the same steps agree in training loss: the largest gap over the first
    `early` steps and over all, and the first step whose gap exceeds `tol` (None: never)."""
    a, b = dict(mine), dict(theirs)
    common = sorted(set(a) & set(b))
    gaps = [(i, abs(a[i] - b[i])) for i in common]
    return {
        "loss_early_diff": max((g for i, g in gaps if i < early), default=None),
        "loss_max_abs_diff": max((g for _, g in gaps), default=None),
        "loss_same_until": next((i for i, g in gaps if g > tol), None),
    }


def _reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The uncapped full run if there is one, else `full` itself when it ran."""
    for kind in ("reference", "full"):
        for r in rows:
            if r["kind"] == kind and r["status"] == "ok":
                return r
    return None
