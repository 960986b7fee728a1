"""Pipeline timelines as pictures: ranks as rows, one coloured box per action, bubbles white.

The same drawing serves the simulator's prediction (`splitgraph-schedule`) and a run's measured
trace (`timeline.png`), so the two can be laid one above the other and compared box by box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#8FD19E", "W": "#DD8452"}
CHUNK_ALPHA = (1.0, 0.62, 0.4, 0.28)
KIND_NAMES = {"F": "forward", "B": "backward", "I": "input grad (I)", "W": "weight grad (W)"}


@dataclass(frozen=True)
class Box:
    rank: int
    label: str  # e.g. "2F0"
    kind: str  # F B I W, or "comm", "wait", "L2", "SYNC", "OPT", "DP"
    start: float
    end: float


@dataclass(frozen=True)
class Panel:
    title: str
    boxes: Sequence[Box]
    num_ranks: int
    stages_per_rank: int = 1
    unit: str = "s"  # "s" (seconds, drawn in ms) or "" (unitless: the simulator's unit costs)


def _mb(label: str) -> str:
    digits = ""
    for ch in reversed(label):
        if not ch.isdigit():
            break
        digits = ch + digits
    return digits


def _stage(label: str) -> int:
    digits = ""
    for ch in label:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


def draw(panels: Sequence[Panel], path: str | Path, suptitle: str = "") -> Path:
    """Draw one timeline per panel, stacked, and save a PNG."""
    height = sum(0.55 * p.num_ranks + 0.9 for p in panels) + (0.4 if suptitle else 0)
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, height), squeeze=False)
    kinds_seen: set[str] = set()
    for ax, panel in zip(axes[:, 0], panels):
        scale = 1e3 if panel.unit == "s" else 1.0
        t0 = min((b.start for b in panel.boxes), default=0.0)
        for b in panel.boxes:
            x, w = (b.start - t0) * scale, (b.end - b.start) * scale
            y = panel.num_ranks - 1 - b.rank
            if b.kind in COLORS:
                chunk = _stage(b.label) // max(panel.num_ranks, 1)
                alpha = CHUNK_ALPHA[min(chunk, len(CHUNK_ALPHA) - 1)]
                ax.barh(
                    y,
                    w,
                    left=x,
                    height=0.8,
                    color=COLORS[b.kind],
                    alpha=alpha,
                    edgecolor="black",
                    linewidth=0.4,
                )
                kinds_seen.add(b.kind)
                span = max((bb.end for bb in panel.boxes), default=1) - t0
                if w > span * scale / 90:
                    ax.text(
                        x + w / 2,
                        y,
                        _mb(b.label),
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if b.kind in ("F", "B") else "black",
                    )
            elif b.kind == "wait":
                ax.barh(y - 0.47, w, left=x, height=0.12, color="#C44E52")
                kinds_seen.add("wait")
            elif b.kind == "comm":
                ax.barh(y + 0.47, w, left=x, height=0.1, color="#888888")
                kinds_seen.add("comm")
            elif b.kind == "DP":  # a stage's gradient all-reduce (data parallel)
                ax.barh(y + 0.3, w, left=x, height=0.16, color="#8172B3")
                kinds_seen.add("DP")
            elif b.kind == "OPT":
                ax.barh(y, w, left=x, height=0.5, color="#BBBBBB", edgecolor="black", linewidth=0.3)
                kinds_seen.add("OPT")
            elif b.kind == "SYNC":  # the step sum of loss and flags (waits for every rank)
                ax.barh(y, w, left=x, height=0.25, color="#E5C494")
                kinds_seen.add("SYNC")
            elif b.kind == "L2":  # the weight-decay term and its gradient
                ax.barh(y, w, left=x, height=0.25, color="#64B5CD")
                kinds_seen.add("L2")
        ax.set_yticks(range(panel.num_ranks))
        ax.set_yticklabels([f"rank {r}" for r in reversed(range(panel.num_ranks))])
        ax.set_xlabel("ms" if panel.unit == "s" else "time (unit costs)")
        title = panel.title
        if panel.stages_per_rank > 1:
            title += f"  [{panel.stages_per_rank} chunks per rank: lighter = later chunk]"
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=COLORS[k], label=KIND_NAMES[k]) for k in COLORS if k in kinds_seen]
    if "wait" in kinds_seen:
        handles.append(Patch(color="#C44E52", label="waiting for data"))
    if "comm" in kinds_seen:
        handles.append(Patch(color="#888888", label="posting transfers"))
    if "DP" in kinds_seen:
        handles.append(Patch(color="#8172B3", label="gradient all-reduce"))
    if "L2" in kinds_seen:
        handles.append(Patch(color="#64B5CD", label="weight decay"))
    if "SYNC" in kinds_seen:
        handles.append(Patch(color="#E5C494", label="step sum (loss, flags)"))
    if "OPT" in kinds_seen:
        handles.append(Patch(color="#BBBBBB", label="optimizer step"))
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
