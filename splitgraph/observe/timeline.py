"""Pipeline timelines as pictures: ranks as rows, one coloured box per action, bubbles white.

The same drawing serves the simulator's prediction (`splitgraph-schedule`) and a run's measured
trace (`timeline.png`), so the two can be laid one above the other and compared box by box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#8FD19E", "W": "#DD8452"}
CHUNK_ALPHA = (1.0, 0.62, 0.4, 0.28)
KIND_NAMES = {"F": "forward", "B": "backward", "I": "input grad (I)", "W": "weight grad (W)"}
#: what every other bar is, in the legend (its colour in `_draw_other`)
LEGEND = {
    "wait": ("#C44E52", "waiting (thin, below): for data, or for the last rank at the step sum"),
    "comm": ("#888888", "posting transfers (thin, above): send/receive calls"),
    "DP": ("#8172B3", "gradient all-reduce across replicas (a run: the wait on it)"),
    "L2": ("#64B5CD", "weight decay: s and its gradient lambda W"),
    "SYNC": ("#E5C494", "step sum: all-reduce of L, s and the NaN/stop flags"),
    "OPT": ("#BBBBBB", "optimizer step"),
}
SPAN_NOTE = "end of the schedule's span: the bubble is the idle (white) share before it"


@dataclass(frozen=True)
class Box:
    rank: int
    label: str  # e.g. "2F0"
    kind: str  # F B I W, or "comm", "wait", "L2", "SYNC", "OPT", "DP"
    start: float
    end: float


@dataclass(frozen=True)
class Panel:
    """One timeline. `t0`: the instant drawn as 0 (default: the earliest box); `span_end`:
    where the schedule's span ends (a dashed line), in the boxes' own clock."""

    title: str
    boxes: Sequence[Box]
    num_ranks: int
    stages_per_rank: int = 1
    unit: str = "s"  # "s" (seconds, drawn in ms) or "" (unitless: the simulator's unit costs)
    t0: float | None = None
    span_end: float | None = None

    def origin(self) -> float:
        if self.t0 is not None:
            return self.t0
        return min((b.start for b in self.boxes), default=0.0)

    def extent(self) -> float:
        """The drawn length, in the panel's drawing unit (ms or unit costs)."""
        scale = 1e3 if self.unit == "s" else 1.0
        end = max((b.end for b in self.boxes), default=0.0)
        return (max(end, self.span_end or 0.0) - self.origin()) * scale


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
    """Draw one timeline per panel, stacked on one time axis, and save a PNG (its titles also
    in the PNG's text: Title, Description)."""
    kinds = {b.kind for p in panels for b in p.boxes}
    handles: list[Any] = [Patch(color=COLORS[k], label=KIND_NAMES[k]) for k in COLORS if k in kinds]
    handles += [Patch(color=c, label=text) for k, (c, text) in LEGEND.items() if k in kinds]
    if any(p.span_end is not None for p in panels):
        handles.append(Line2D([], [], color="black", linestyle="--", lw=0.8, label=SPAN_NOTE))
    ncol = 3
    head = (0.35 if suptitle else 0.05) + 0.16 * -(-len(handles) // ncol)  # inches
    height = sum(0.55 * p.num_ranks + 0.9 for p in panels) + head
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, height), squeeze=False)
    xmax = max((p.extent() for p in panels), default=1.0) or 1.0
    for ax, panel in zip(axes[:, 0], panels):
        scale = 1e3 if panel.unit == "s" else 1.0
        t0 = panel.origin()
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
                if w > xmax / 90:
                    ax.text(
                        x + w / 2,
                        y,
                        _mb(b.label),
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if b.kind in ("F", "B") else "black",
                    )
            elif b.kind in LEGEND:
                _draw_other(ax, b.kind, x, w, y)
        if panel.span_end is not None:
            ax.axvline((panel.span_end - t0) * scale, color="black", linestyle="--", lw=0.8)
        ax.set_yticks(range(panel.num_ranks))
        ax.set_yticklabels([f"rank {r}" for r in reversed(range(panel.num_ranks))])
        ax.set_xlabel("ms" if panel.unit == "s" else "time (unit costs)")
        title = panel.title
        if panel.stages_per_rank > 1:
            title += f"  [{panel.stages_per_rank} chunks per rank: lighter = later chunk]"
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlim(0, xmax * 1.01)  # one time axis for every panel
        ax.grid(axis="x", alpha=0.3)
    if suptitle:
        fig.suptitle(suptitle, x=0.01, y=1 - 0.05 / height, ha="left", va="top", fontsize=10.5)
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.01, 1 - (0.35 if suptitle else 0.05) / height),
        ncol=ncol,
        fontsize=7.5,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - head / height))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = {"Title": suptitle, "Description": "\n".join(p.title for p in panels)}
    fig.savefig(out, dpi=130, metadata=text)
    plt.close(fig)
    return out


def _draw_other(ax: Any, kind: str, x: float, w: float, y: float) -> None:
    """The bars that are not a schedule's compute: thin lines for waits and transfer calls,
    low bars for the step's fixed costs."""
    color = LEGEND[kind][0]
    if kind == "wait":
        ax.barh(y - 0.47, w, left=x, height=0.12, color=color)
    elif kind == "comm":
        ax.barh(y + 0.47, w, left=x, height=0.1, color=color)
    elif kind == "DP":
        ax.barh(y + 0.3, w, left=x, height=0.16, color=color)
    elif kind == "OPT":
        ax.barh(y, w, left=x, height=0.5, color=color, edgecolor="black", linewidth=0.3)
    else:  # L2, SYNC
        ax.barh(y, w, left=x, height=0.25, color=color)
