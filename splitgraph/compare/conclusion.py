"""The report's conclusion, computed from the rows: who fits, who wins on time to the target,
on device-seconds and on accuracy, and why, each reason an arithmetic fact of the same rows
(time to target = epochs needed x seconds per epoch; device-seconds = devices x seconds).
"""

from __future__ import annotations

import math
from typing import Any

from splitgraph.compare.analysis import CONTENDERS, EARLY_STEPS, FULL_BATCH
from splitgraph.compare.predict import static_bytes
from splitgraph.units import format_bytes


def _n(count: int, noun: str) -> str:
    """`1 rank`, `3 ranks`: the count and its noun, agreed."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _s(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.2f} s" if x < 100 else f"{x:.0f} s")


def _ranked(rows: list[dict[str, Any]], key: str, high: bool = False) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key], reverse=high)


def _then(others: list[dict[str, Any]], key: str, fmt: str) -> str:
    if not others:
        return ""
    return " (then " + ", ".join(f"{r['label']} {fmt.format(r[key])}" for r in others) + ")"


def seconds_per_epoch(r: dict[str, Any]) -> float | None:
    dse = r.get("device_seconds_per_epoch")
    return dse / r["devices"] if dse is not None else None


def fitting(rows: list[dict[str, Any]], cap: int | None) -> list[dict[str, Any]]:
    """The contenders that ran to the end within the cap (all that ran, without a cap)."""
    ok = [r for r in rows if r["kind"] in CONTENDERS and r["status"] == "ok"]
    return ok if cap is None else [r for r in ok if r["fits"]]


def conclude(
    rows: list[dict[str, Any]], cap: int | None, target: float | None, k: int
) -> list[str]:
    main = [r for r in rows if r["phase"] == "epochs"]
    fit = fitting(main, cap)
    out = [answer(main, cap, target)]
    out += _fit_lines(main, cap)
    out += _memory_check_lines(main)
    if not fit:
        return [*out, "No variant fits the cap, so there is nothing to compare."]
    if target is not None:
        out += _time_lines(fit, target, k)
    out += _accuracy_lines(fit, [r for r in rows if r["phase"] == "time" and r["status"] == "ok"])
    out += _pipeline_lines(main, fit)
    out += _recompute_lines(main)
    out += _exactness_lines(main, k)
    out += _noise_lines(main)
    return out


# -- the answer ------------------------------------------------------------------------------


def _one_device_record(main: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The accounting of one device holding the whole model and minibatch: `full`'s (or the
    uncapped reference's, when full was not asked for), its total at least the bytes the run
    was refused for."""
    for kind in ("full", "reference"):
        r = next((x for x in main if x["kind"] == kind and x["accounted_per_rank"]), None)
        if r is not None:
            rec = max(r["accounted_per_rank"], key=lambda a: a["total"])
            total = max(rec["total"], r["peak_bytes"] or 0)
            return {"static": static_bytes(rec), "total": total}
    return None


def regime(main: list[dict[str, Any]], cap: int | None) -> str | None:
    """Where one device with the whole minibatch stands against the cap, from its accounting:
    `weights` (parameters, gradients and optimizer state alone exceed it), `activations` (they
    fit; the saved activations put it over), `fits`, or None (no cap, or no such record)."""
    rec = _one_device_record(main)
    if cap is None or rec is None:
        return None
    if rec["static"] > cap:
        return "weights"
    return "activations" if rec["total"] > cap else "fits"


def _best(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    ranked = _ranked(rows, key)
    return ranked[0] if ranked else None


def answer(main: list[dict[str, Any]], cap: int | None, target: float | None) -> str:
    """The exercise's answer for this comparison, every clause computed from the rows: which
    regime it is, what fits on one device and on several, and who reaches the target first
    and cheapest."""
    fit = fitting(main, cap)
    rec = _one_device_record(main)
    case = regime(main, cap)
    one = [r for r in fit if r["devices"] == 1]
    many = [r for r in fit if r["devices"] > 1]
    refused_one = [
        r for r in main if r["kind"] in CONTENDERS and r["devices"] == 1 and r["status"] == "oom"
    ]
    refused_copies = [r for r in main if r["kind"] == "data" and r["status"] == "oom"]
    first = _best(fit, "time_to_target_s") if target is not None else None
    out = []
    if case == "weights" and rec is not None and cap is not None:
        names = ", ".join(f"`{r['variant']}`" for r in refused_one) or "nothing"
        head = "split the graph" if many else "nothing fits, not even split as tried"
        out.append(
            f"**The answer here: {head}.** Parameters, gradients and optimizer state "
            f"take {format_bytes(rec['static'])} on one device, over the "
            f"{format_bytes(cap)} cap whatever the batch: {names} "
            f"{'was' if len(refused_one) == 1 else 'were'} refused for that reason"
            + (
                f", and so was data parallelism ({', '.join(r['label'] for r in refused_copies)}"
                "), which copies that state to every replica"
                if refused_copies
                else ""
            )
            + "."
        )
    elif case == "activations" and rec is not None and cap is not None:
        saved = int(rec["total"]) - int(rec["static"])
        if one and first is not None and first["devices"] > 1:
            head = "either fits; splitting the graph reached the target first"
        elif one:
            head = "shrink the activations on one device"
        elif many:
            head = "split the graph (nothing fit on one device)"
        else:
            head = "nothing fits"
        out.append(
            f"**The answer here: {head}.** One device holds the parameter state "
            f"({format_bytes(rec['static'])} of the {format_bytes(cap)} cap) but not the "
            f"whole minibatch's {format_bytes(saved)} of saved activations"
            + (f"; {', '.join(r['label'] for r in one)} fit on one device" if one else "")
            + "."
        )
    elif case == "fits":
        out.append(
            "**The answer here: nothing needs splitting.** One device with the whole minibatch "
            "fits the cap."
        )
    if many:
        peaks = [r["peak_bytes"] for r in many if r["peak_bytes"]]
        stages = sorted({r["devices"] for r in many})
        lo, hi = (format_bytes(min(peaks)), format_bytes(max(peaks))) if peaks else ("", "")
        span = lo if lo == hi else f"{lo} to {hi}"
        out.append(
            f"Split over {'/'.join(map(str, stages))} devices, {_n(len(many), 'variant')} fit"
            + (f" (largest device {span})." if peaks else ".")
        )
    if target is not None:
        out.append(_race(fit, main, target))
    return " ".join(x for x in out if x).strip() or "No cap or no one-device record: no regime."


def _race(fit: list[dict[str, Any]], main: list[dict[str, Any]], target: float) -> str:
    """Who reached the target first and who spent the fewest device-seconds, the best on one
    device set against the best on several, and the uncapped reference beside them."""
    first = _best(fit, "time_to_target_s")
    if first is None:
        return f"Nobody reached the target loss {target:.4f}."
    text = (
        f"First to the held-out loss {target:.4f}: {first['label']} "
        f"({_s(first['time_to_target_s'])})"
    )
    one = _best([r for r in fit if r["devices"] == 1], "time_to_target_s")
    many = _best([r for r in fit if r["devices"] > 1], "time_to_target_s")
    other = many if first["devices"] == 1 else one
    if other is not None and other is not first:
        ratio = other["time_to_target_s"] / max(first["time_to_target_s"], 1e-12)
        text += f"; the best on {'several devices' if other is many else 'one device'}, "
        text += f"{other['label']}, took {ratio:.2f}x as long"
    cheap = _best(fit, "device_seconds_to_target")
    if cheap is not None:
        text += (
            f"; fewest device-seconds: {cheap['label']} "
            f"({cheap['device_seconds_to_target']:.2f} device-s)"
        )
    ref = next((r for r in main if r["kind"] == "reference" and r.get("time_to_target_s")), None)
    if ref is not None:
        text += (
            f". The uncapped reference (one device, {format_bytes(ref['peak_bytes'] or 0)}, "
            f"over the cap) took {_s(ref['time_to_target_s'])}"
        )
    return text + "."


def _memory_check_lines(main: list[dict[str, Any]]) -> list[str]:
    """The harness's prediction of every launched variant's memory against the runtime's
    accounting, part by part and rank by rank."""
    checked = [r for r in main if r.get("memory_mismatches") is not None]
    if not checked:
        return []
    bad = [r for r in checked if r["memory_mismatches"]]
    ranks = sum(len(r["accounted_per_rank"]) for r in checked)
    if not bad:
        return [
            f"**Memory, predicted before launch = accounted by the runtime**, to the byte, for "
            f"{_n(len(checked), 'launched variant')} ({_n(ranks, 'rank')}): parameters, gradients, "
            "optimizer state, all-reduce buckets and the saved-activation peak, each as the "
            "planner's cost model and memory model price them and as the cap counts them."
        ]
    return [
        "**Memory prediction and runtime disagree:** "
        + "; ".join(f"{r['label']}: {', '.join(r['memory_mismatches'][:3])}" for r in bad)
        + "."
    ]


def _recompute_lines(main: list[dict[str, Any]]) -> list[str]:
    """Each pipeline against its twin with recomputation: memory saved, step time paid."""
    by = {r["variant"]: r for r in main}
    out = []
    for name, r in by.items():
        twin = by.get(name.removesuffix("-recompute"))
        if r["kind"] != "pipeline" or twin is None or twin is r:
            continue
        if r["status"] != "ok" or not r["peak_bytes"]:
            continue
        if twin["status"] == "ok" and twin["step_time_median_s"] and r["step_time_median_s"]:
            cost = (
                f"; its median step {r['step_time_median_s'] * 1e3:.1f} ms against "
                f"{twin['step_time_median_s'] * 1e3:.1f} ms "
                f"({r['step_time_median_s'] / twin['step_time_median_s']:.2f}x)"
            )
        else:
            cost = f" ({twin['label']} itself {'ran out' if twin['status'] == 'oom' else 'failed'})"
        out.append(
            f"**Recomputation, {twin['label']}:** largest device {format_bytes(r['peak_bytes'])} "
            f"with it against {format_bytes(twin['peak_bytes'] or 0)} without" + cost + "."
        )
    return out


def _noise_lines(main: list[dict[str, Any]]) -> list[str]:
    """Variants that do identical arithmetic per step (same devices, batch, schedule and m;
    only the learning rate differs) measure this run's timing noise."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in main:
        if r["status"] == "ok" and r["step_time_median_s"] and r["kind"] in CONTENDERS:
            key = (r["kind"], r["devices"], r["batch"], r["schedule"], r["microbatches"])
            key += (r.get("recompute"), r.get("dp"))
            groups.setdefault(key, []).append(r)
    out = []
    for same in groups.values():
        if len(same) < 2:
            continue
        ts = sorted(same, key=lambda r: r["step_time_median_s"])
        lo, hi = ts[0], ts[-1]
        out.append(
            f"**Timing noise in this run.** {' and '.join(r['label'] for r in ts)} do identical "
            "arithmetic per step (only the learning rate differs), yet their median steps are "
            + " and ".join(f"{r['step_time_median_s'] * 1e3:.1f} ms" for r in ts)
            + f" ({hi['step_time_median_s'] / lo['step_time_median_s']:.2f}x): time "
            "differences smaller than that are not evidence here; memory figures are exact."
        )
    return out


def _fit_lines(main: list[dict[str, Any]], cap: int | None) -> list[str]:
    out = []
    full = next((r for r in main if r["kind"] == "full"), None)
    if cap is not None and full is not None and full["peak_bytes"] is not None:
        verdict = "does not fit" if full["status"] == "oom" else "fits"
        out.append(
            f"**The question.** One device with the whole minibatch (`full`) needs "
            f"{format_bytes(full['peak_bytes'])} by the accounting; the cap is "
            f"{format_bytes(cap)} per device, so it {verdict}."
            + _which_case(full, cap, fitting(main, cap))
        )
    fit = fitting(main, cap)
    if fit:
        parts = [f"{r['label']} ({format_bytes(r['peak_bytes'])})" for r in fit if r["peak_bytes"]]
        out.append("**What fits** (largest device): " + "; ".join(parts) + ".")
    oom = [r for r in main if r["status"] == "oom"]
    if oom:
        out.append("**Out of memory:** " + "; ".join(_oom_reason(r, cap) for r in oom) + ".")
    failed = [r for r in main if r["status"] == "failed"]
    if failed:
        reasons = [
            f"{r['label']}: {(r['error'] or '?').splitlines()[0][:160].rstrip('.')}" for r in failed
        ]
        out.append("**Did not run:** " + "; ".join(reasons) + ".")
    return out


def _oom_reason(r: dict[str, Any], cap: int | None) -> str:
    """`label needs X (why)`: the parameter state alone, or the saved activations on top."""
    text = f"{r['label']} needs {format_bytes(r['peak_bytes'] or 0)}"
    per = r["accounted_per_rank"]
    if per and cap is not None:
        worst = max(per, key=lambda a: a["total"])
        static = static_bytes(worst)
        if static > cap:
            text += f" (parameter state alone {format_bytes(static)})"
        else:
            text += (
                f" ({format_bytes(static)} parameter state + "
                f"{format_bytes(worst.get('saved_peak') or 0)} saved activations)"
            )
    return text + ("" if r.get("launched", True) else ", refused before launch")


def _which_case(full: dict[str, Any], cap: int, fit: list[dict[str, Any]]) -> str:
    """Whether the model itself fits one device (then only activations are over the cap)."""
    per = full.get("accounted_per_rank") or []
    if not per:
        return ""
    static = max(static_bytes(r) for r in per)
    saved = max((r.get("saved_peak") or 0) for r in per)
    if static > cap:
        return (
            f" Its parameters, gradients and optimizer state alone take {format_bytes(static)}: "
            "no batch size fits it on one device; only splitting the layers over devices does."
        )
    if full["peak_bytes"] <= cap:
        return ""
    one = sorted({r["kind"] for r in fit if r["devices"] == 1})
    tail = (
        f"; here {', '.join(one)} fit on one device" if one else "; here nothing fit on one device"
    )
    return (
        f" Its parameters, gradients and optimizer state take {format_bytes(static)}, within "
        f"the cap; the {format_bytes(saved)} of saved activations put it over, so shrinking "
        "the activations can fit it without splitting the layers" + tail + "."
    )


def _time_lines(fit: list[dict[str, Any]], target: float, k: int) -> list[str]:
    out = []
    fast = _ranked(fit, "time_to_target_s")
    if not fast:
        budget = max(r["epochs"] or 0 for r in fit)
        best = min(r["final_test_loss"] for r in fit if r["final_test_loss"] is not None)
        return [
            f"**Nobody reached the target** held-out loss {target:.4f} in {budget:.0f} epochs "
            f"(the best final loss is {best:.4f}): raise compare.epochs or the target."
        ]
    if fast:
        w = fast[0]
        rest = ", ".join(
            f"{r['label']} {_s(r['time_to_target_s'])} "
            f"({r['time_to_target_s'] / max(w['time_to_target_s'], 1e-12):.1f}x)"
            for r in fast[1:]
        )
        line = (
            f"**Fastest to the target** (held-out loss {target:.4f}): {w['label']}, "
            f"{_s(w['time_to_target_s'])} of training" + (f"; then {rest}." if rest else ".")
        )
        if len(fast) > 1:
            line += " " + _why_time(w, fast[1], k)
        out.append(line)
    line = _winner(
        fit,
        "device_seconds_to_target",
        "**Cheapest to the target** in device-seconds (devices x seconds)",
        lambda w: f"{w['device_seconds_to_target']:.2f} device-s on {w['devices']} device(s)",
        "{:.2f}",
    )
    if line:
        out.append(
            line + " A p-device run must be p times faster than a one-device run to cost the same."
        )
    return out


def _winner(
    rows: list[dict[str, Any]], key: str, title: str, describe: Any, fmt: str, high: bool = False
) -> str | None:
    """`title: winner, its figures (then the others' values).`, or None if no row has `key`."""
    ranked = _ranked(rows, key, high)
    if not ranked:
        return None
    w = ranked[0]
    return f"{title}: {w['label']}, {describe(w)}" + _then(ranked[1:], key, fmt) + "."


def _why_time(w: dict[str, Any], r: dict[str, Any], k: int) -> str:
    """Time to target = epochs needed x seconds per epoch (both measured up to the target):
    say which factor made the difference."""
    ew, er = w["epochs_to_target"], r["epochs_to_target"]
    if not ew or not er:
        return ""
    sw, sr = w["time_to_target_s"] / ew, r["time_to_target_s"] / er
    text = (
        f"Why: time to target = epochs needed x seconds per epoch: {w['label']} "
        f"{ew:.2f} x {sw:.2f} s, {r['label']} {er:.2f} x {sr:.2f} s"
    )
    fewer, faster = ew < er * 0.98, sw < sr * 0.98
    if fewer and faster:
        return text + f": it needs {er / ew:.2f}x fewer epochs and runs them {sr / sw:.2f}x faster."
    if fewer:
        more = f" ({k}x more updates per epoch)" if w["kind"] == "small" else ""
        return text + f": it needs {er / ew:.2f}x fewer epochs{more}."
    if faster:
        return text + f": its epochs run {sr / sw:.2f}x faster."
    return text + ": they are within 2% on both factors, a tie within this machine's noise."


def _accuracy_lines(fit: list[dict[str, Any]], timed: list[dict[str, Any]]) -> list[str]:
    budget = max(r["epochs"] or 0 for r in fit)
    epochs = _winner(
        fit,
        "final_test_accuracy",
        f"**Most accurate after the epoch budget** ({budget:.0f} epochs)",
        lambda w: (
            f"held-out accuracy {w['final_test_accuracy']:.4f} (loss {w['final_test_loss']:.4f})"
        ),
        "{:.4f}",
        high=True,
    )
    clock = _winner(
        timed,
        "final_test_accuracy",
        "**Most accurate after the wall-clock budget**",
        lambda w: (
            f"held-out accuracy {w['final_test_accuracy']:.4f} after {w['epochs'] or 0:.2f} epochs"
        ),
        "{:.4f}",
        high=True,
    )
    return [line + _chance(rows) for line, rows in ((epochs, fit), (clock, timed)) if line]


def _chance(rows: list[dict[str, Any]]) -> str:
    """Whether the best accuracy's lead over the next is beyond the held-out set's sampling
    noise: the standard error of an accuracy a over n samples is sqrt(a (1 - a) / n)."""
    ranked = _ranked(rows, "final_test_accuracy", high=True)
    if len(ranked) < 2 or not ranked[0].get("test_samples"):
        return ""
    a, n = ranked[0]["final_test_accuracy"], ranked[0]["test_samples"]
    se = math.sqrt(max(a * (1 - a), 1e-12) / n)
    gap = a - ranked[1]["final_test_accuracy"]
    verdict = "within" if gap < 2 * se else "beyond"
    return (
        f" The lead over the next ({gap:.4f}) is {verdict} the held-out set's sampling noise "
        f"(standard error {se:.4f} over {n:.0f} samples; twice that is {2 * se:.4f})."
    )


def _pipeline_lines(main: list[dict[str, Any]], fit: list[dict[str, Any]]) -> list[str]:
    """Each pipeline's measured speed-up over one device doing the same work, against the ideal
    p*m/(m+p-1) that the bubble allows."""
    one = next(
        (r for r in main if r["kind"] in ("reference", "full") and r["step_time_median_s"]), None
    )
    one = one or next(
        (r for r in main if r["kind"] == "accumulate" and r["step_time_median_s"]), None
    )
    if one is None:
        return []
    out = []
    for r in fit:
        if r["kind"] not in ("pipeline", "data") or not r["step_time_median_s"]:
            continue
        dp = int(r.get("dp") or 1)
        p, m = r["devices"] // dp, r["microbatches"] or 1
        ideal = dp * p * m / (m + p - 1)
        got = one["step_time_median_s"] / r["step_time_median_s"]
        bound = (
            f"the bubble allows at most {'dp x ' if dp > 1 else ''}p*m/(m+p-1) = {ideal:.2f}x"
            if p > 1
            else f"{dp} replicas allow at most {ideal:.2f}x"
        )
        out.append(
            f"**{r['label']}** steps {got:.2f}x as fast as {one['label']} (median "
            f"{r['step_time_median_s'] * 1e3:.1f} ms vs {one['step_time_median_s'] * 1e3:.1f} ms); "
            f"{bound}, before the "
            f"{format_bytes(r['comm_bytes_per_step'] or 0)} of activations and gradients it "
            "sends per step"
            + (", the gradient all-reduce" if dp > 1 else "")
            + " and the processes' share of the cores."
        )
    return out


def _exactness_lines(main: list[dict[str, Any]], k: int) -> list[str]:
    out = []
    ref = next((r for r in main if r["kind"] == "reference" and r["status"] == "ok"), None)
    same = [r for r in main if r["kind"] in FULL_BATCH and r.get("loss_early_diff") is not None]
    if same:
        basis = "the reference's (`full` without the cap)" if ref is not None else "`full`'s"
        early = max(r["loss_early_diff"] for r in same)
        worst_l = max(r["loss_max_abs_diff"] for r in same)
        worst_w = max((r["weights_rel_diff"] or 0.0) for r in same)
        until = [r["loss_same_until"] for r in same]
        steps = (
            min(u for u in until if u is not None) if any(u is not None for u in until) else None
        )
        names = ", ".join(r["label"] for r in same)
        if early <= 1e-5:
            text = (
                f"**Same mathematics.** {names} train on full's update: over the first "
                f"{EARLY_STEPS} steps (the same initial weights, then the first updates) their "
                f"training loss matches {basis} to {early:.1e}, float32 rounding (the same sums "
                "taken in another order)."
            )
            if steps is not None:
                text += (
                    f" From step {steps} the gap exceeds 1e-4 and grows to {worst_l:.1e}, with "
                    f"final weights {worst_w:.1e} apart (relative): training amplifies those "
                    "rounding differences, as it would between any two float32 runs that sum "
                    "in another order (in float64 the gradients agree to 1e-10: "
                    "tests/test_equivalence.py)."
                )
            else:
                text += f" The final weights are {worst_w:.1e} apart (relative)."
        else:
            text = (
                f"**Not the same numbers.** {names}: training loss differs from {basis} by "
                f"{early:.1e} within the first {EARLY_STEPS} steps, more than float32 rounding."
            )
        out.append(text)
    for r in main:
        if r["kind"] == "small" and r.get("test_loss_gap") is not None:
            weights = r["weights_rel_diff"]
            out.append(
                f"**A different trajectory.** {r['label']} takes {k}x more, smaller steps: its "
                f"held-out loss differs from full's by up to {r['test_loss_gap']:.4f} at equal "
                "samples seen"
                + (f", and its final weights by {weights:.2f} (relative)." if weights else ".")
            )
    return out


def notes(k: int, rows: list[dict[str, Any]]) -> list[str]:
    """How each variant is made, with the memory facts that explain it, from the numbers."""
    by = {r["variant"]: r for r in rows if r["phase"] == "epochs"}

    def saved(name: str) -> int | None:
        r = by.get(name)
        if not r or not r["accounted_per_rank"]:
            return None
        return max((a.get("saved_peak") or 0) for a in r["accounted_per_rank"]) or None

    full = saved("reference") or saved("full")
    acc, rc = saved("accumulate"), saved("recompute")
    acc_fact = rc_fact = ""
    if full and acc:
        acc_fact = (
            f" Measured: its saved-activation peak is {format_bytes(acc)}, "
            f"{acc / full:.3f} of full's {format_bytes(full)} (1/k = {1 / k:.3f})."
        )
    if full and rc:
        rc_fact = (
            f" Measured: its saved-activation peak is {format_bytes(rc)}, {rc / full:.2f}x "
            f"full's {format_bytes(full)}"
        )
        rc_fact += (
            ": with one stage and one microbatch the backward rebuilds the stage's whole "
            "graph, so the peak stays; recomputation pays where a stage would hold several "
            "microbatches' activations at once (GPipe, the first stages of 1F1B), which it "
            "replaces by their inputs."
            if rc >= 0.99 * full
            else "."
        )
    out = [
        "`full`: one process, the whole minibatch B as one microbatch (`schedule=naive`).",
        f"`small`: one process, minibatch B/k = B/{k}, so {k}x more updates per epoch; learning "
        "rate `same` as full's, or `linear` (scaled by 1/k with the batch).",
        f"`accumulate`: one process, `schedule=1f1b pipeline.microbatches={k}`. On a single "
        "rank 1F1B runs F0 B0 F1 B1 ...: each microbatch's backward runs before the next "
        "forward, so at most one microbatch's activations are saved at a time, while the "
        "gradients of all k add up in `.grad` before one optimizer step (each microbatch's "
        "loss is weighted by its share of B, so the update is full's)." + acc_fact,
        "`recompute`: one process, minibatch B, `schedule.recompute=true`: the forward keeps "
        "only the stage's input and is run again in the backward." + rc_fact,
        "`pipeline`: p processes under `torchrun --standalone`, one stage each, for each "
        "schedule and microbatch count m (and with recomputation if asked); parameters, "
        "gradients, optimizer state and activations are split across the p devices.",
        "`reference`: `full` without the cap, so the others' weights can be compared with "
        "full-batch training after the same steps; it is not a contender.",
        "Every variant trains the same epochs from the same initial weights and data order, "
        "and is evaluated on the same held-out split at the same numbers of samples seen.",
    ]
    for name, r in by.items():
        twin = name.removesuffix("-recompute")
        if r["kind"] == "pipeline" and twin != name and saved(twin) and saved(name):
            out.append(
                f"`{name}`: stage 0's saved-activation peak is {format_bytes(saved(name))} "
                f"against {format_bytes(saved(twin))} without recomputation."
            )
    return out
