"""Exercise 5: the graph is too large for one device. Split it, or train on a smaller minibatch?

Answered live, in both of its regimes, by the comparison harness (splitgraph/compare/) on
small versions of the two committed reference experiments:

    activations  experiment=too_large          the parameters, gradients and optimizer state
                                               fit one device; the whole minibatch's saved
                                               activations put it over the cap
    weights      experiment=too_large_weights  the parameter state alone exceeds one device

`--size small` (the default: a minute or two on 2 CPU cores) trims epochs, samples and the
variant grid but keeps each experiment's model, minibatch and cap, so each regime stays what
it is; `--size tiny` (the test suite's, seconds) keeps only the variants that decide the
regime. Variants the memory model puts over the cap are refused before launch
(compare.confirm_refusals=false; the full-size references launch them, and the runtime
refuses them itself). Every sentence printed is computed from the rows just measured
(`compare.conclusion`); the committed reports are named as the full-size evidence.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitgraph.compare.conclusion import fitting
from splitgraph.units import format_bytes

#: regime -> the experiment that shows it
EXPERIMENTS = {"activations": "too_large", "weights": "too_large_weights"}

_QUICK = ["compare.confirm_refusals=false", "compare.time_budget=null", "compare.target_loss=null"]

#: per size and experiment: the overrides that shrink the run (model, minibatch, cap untouched)
SIZES: dict[str, dict[str, list[str]]] = {
    "small": {
        "too_large": [
            *_QUICK,
            "data.samples=16384",
            "compare.epochs=4",
            "compare.evals_per_epoch=2",
            "compare.variants=[full,small,accumulate,pipeline]",
            "compare.small_lr=[same]",
            "compare.schedules=[1f1b]",
            "compare.pipeline_recompute=[false]",
        ],
        "too_large_weights": [
            *_QUICK,
            "compare.epochs=3",
            "compare.evals_per_epoch=2",
            "compare.variants=[full,small,accumulate,data,pipeline]",
            "compare.stages=[2]",
            "compare.schedules=[1f1b]",
            "compare.pipeline_recompute=[false,true]",
            "compare.dp=[1]",
        ],
    },
    "tiny": {
        "too_large": [
            *_QUICK,
            "data.samples=2048",
            "compare.epochs=1",
            "compare.evals_per_epoch=1",
            "compare.variants=[full,small]",
            "compare.small_lr=[same]",
            "compare.reference=false",
        ],
        "too_large_weights": [
            *_QUICK,
            "compare.epochs=1",
            "compare.evals_per_epoch=1",
            "compare.variants=[full,small,accumulate,pipeline]",
            "compare.stages=[2]",
            "compare.schedules=[1f1b]",
            "compare.pipeline_recompute=[false]",
            "compare.dp=[1]",
            "compare.reference=false",
        ],
    },
}


@dataclass
class Regime:
    experiment: str
    overrides: list[str]
    report: str  # this run's report.md
    reference: str  # the committed full-size report
    regime: str | None  # compare.conclusion.regime: weights | activations | fits
    setup: str
    answer: str
    lines: list[str]  # what fits, what does not and why, predicted vs accounted
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        keep = (
            "variant",
            "kind",
            "status",
            "launched",
            "devices",
            "peak_bytes",
            "predicted_peak_bytes",
            "predicted_static_bytes",
            "memory_mismatches",
            "time_to_target_s",
            "device_seconds_to_target",
            "final_test_accuracy",
        )
        return {
            "experiment": self.experiment,
            "overrides": self.overrides,
            "report": self.report,
            "reference": self.reference,
            "regime": self.regime,
            "answer": self.answer,
            "lines": self.lines,
            "seconds": self.seconds,
            "rows": [{k: r.get(k) for k in keep} for r in self.rows],
        }


@dataclass
class Exercise5:
    size: str
    regimes: list[Regime]
    summary: str
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "summary": self.summary,
            "load_average": list(self.load),
            "regimes": [r.to_dict() for r in self.regimes],
        }


def run(
    overrides: list[str] | None = None,
    size: str = "small",
    out: Path = Path("outputs/exercise5"),
    progress: bool | None = None,
) -> Exercise5:
    """Both experiments at `size`, each into `out/<experiment>/`; `overrides` apply to both."""
    from splitgraph.compare import conclusion
    from splitgraph.compare.config import load
    from splitgraph.compare.main import compare

    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    show = sys.stderr.isatty() if progress is None else progress
    load_start = os.getloadavg()[0]
    regimes = []
    for name in EXPERIMENTS.values():
        over = [f"experiment={name}", *SIZES[size][name], *(overrides or [])]
        cfg = load([*over, f"compare.progress={str(show).lower()}"])
        t0 = time.monotonic()
        # the report's command: the comparison this is, as splitgraph-compare runs it
        command = shlex.join(["splitgraph-compare", *over, "--out", str(out / name)])
        done = compare(cfg, out / name, command)
        seconds = time.monotonic() - t0
        rows = done["rows"]
        main = [r for r in rows if r["phase"] == "epochs"]
        cap, meta = done["meta"]["cap_bytes"], done["meta"]
        facts = [
            line
            for line in done["conclusion"]
            if line.startswith(("**What fits**", "**Out of memory", "**Memory", "**Did not run"))
        ]
        regimes.append(
            Regime(
                experiment=name,
                overrides=over,
                report=str(done["report"]),
                reference=f"results/{name}/report.md",
                regime=conclusion.regime(main, cap),
                setup=(
                    f"{meta['model']}, {meta['data']}, B={meta['batch']}, {meta['optim']}, "
                    f"cap {format_bytes(cap) if cap else 'none'} per device"
                ),
                answer=done["conclusion"][0],
                lines=facts,
                rows=rows,
                seconds=seconds,
            )
        )
    return Exercise5(size, regimes, summary(regimes), (load_start, os.getloadavg()[0]))


_REGIME_TITLE = {
    "activations": "only the activations overflow one device",
    "weights": "the parameter state itself overflows one device",
    "fits": "everything fits one device",
    None: "no regime (no cap, or no one-device record)",
}


def summary(regimes: list[Regime]) -> str:
    """One sentence per regime, from its rows: what fit on one device, and who was first to
    the target."""
    parts = []
    for g in regimes:
        main = [r for r in g.rows if r["phase"] == "epochs"]
        cap = next((r["cap_bytes"] for r in main), None)
        fit = fitting(main, cap)
        one = [r["label"] for r in fit if r["devices"] == 1]
        many = [r for r in fit if r["devices"] > 1]
        timed = sorted(
            (r for r in fit if r.get("time_to_target_s") is not None),
            key=lambda r: r["time_to_target_s"],
        )
        first = (
            f"first to the target: {timed[0]['label']} ({timed[0]['time_to_target_s']:.2f} s)"
            if timed
            else "nobody reached the target"
        )
        where = f"on one device {', '.join(one)} fit" if one else "nothing fits on one device"
        several = f"{len(many)} multi-device variant{'' if len(many) == 1 else 's'} fit"
        title = _REGIME_TITLE[g.regime]
        parts.append(f"Where {title} ({g.experiment}): {where}; {several}; {first}.")
    return " ".join(parts)


def render(result: Exercise5) -> str:
    total = sum(g.seconds for g in result.regimes)
    lo, hi = result.load
    lines = [
        "Can a graph too large for one device be split across several, and how does that",
        "compare with training on a smaller minibatch? Two regimes, each a small version of a",
        "committed reference comparison, run now.",
        f"(--size {result.size}: {total:.0f} s; load average {lo:.2f} at the start and {hi:.2f} "
        f"at the end on {os.cpu_count()} cores; times are this run's, memory verdicts exact.)",
    ]
    for i, g in enumerate(result.regimes, 1):
        lines += [
            "",
            f"{i}. {_REGIME_TITLE[g.regime].capitalize()}: experiment={g.experiment}",
            f"   {g.setup}",
            f"   {g.answer}",
            *[f"   - {x}" for x in g.lines],
            f"   This run's report: {g.report}",
            f"   Full-size evidence: {g.reference} "
            f"(splitgraph-compare experiment={g.experiment} --out results/{g.experiment})",
        ]
    lines += ["", "In short: " + result.summary]
    return "\n".join(lines)
