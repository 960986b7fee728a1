"""Draw the partitioned computational graph in the textbook's style.

Variables are boxes, operators are circles, edges run forward. Per layer i: the weight W_i
(and bias b_i) feed a matrix-product operator that makes z_i; phi makes h_i, the next
layer's input; the output o meets the labels y in the loss operator l, giving L. Above the
chain, each stage's weights give its share s_k = lambda/2 sum ||W||^2 of the L2 term (no
communication), the shares add to s, and J = L + s. Everything a stage computes is
coloured by its stage; a dashed line marks each cut, with the activation sent forward
(send/recv h) and its gradient sent backward (send/recv dJ/dh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitgraph.plan import Plan

_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
_GREY = "#9E9E9E"
_BOX_W, _BOX_H, _R = 0.62, 0.42, 0.26


@dataclass
class _Node:
    x: float
    y: float
    label: str
    kind: str  # "var" | "op"
    stage: int | None  # None: assembled from every stage


def _tint(hex_colour: str, amount: float = 0.78) -> tuple[float, float, float]:
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _colour(stage: int | None) -> str:
    return _GREY if stage is None else _COLOURS[stage % len(_COLOURS)]


def _edge_point(node: _Node, tx: float, ty: float) -> tuple[float, float]:
    """Where the segment from the node's centre toward (tx, ty) leaves its outline."""
    dx, dy = tx - node.x, ty - node.y
    d = math.hypot(dx, dy) or 1.0
    if node.kind == "op":
        return node.x + dx / d * _R, node.y + dy / d * _R
    sx = (_BOX_W / 2) / abs(dx) if dx else math.inf
    sy = (_BOX_H / 2) / abs(dy) if dy else math.inf
    s = min(sx, sy)
    return node.x + dx * s, node.y + dy * s


@dataclass
class Layout:
    """Node positions, edges (forward), and where each cut falls (stage -> x)."""

    nodes: dict[str, _Node]
    edges: list[tuple[str, str]]
    curved: set[tuple[str, str]]
    cut_x: dict[int, float]
    right: float
    top: float


def layout(
    plan: Plan, task: str = "classification", bias: bool | None = None, one_based: bool = False
) -> Layout:
    """The graph of `plan`'s model: variables, operators, forward edges, stage of each."""
    n = plan.num_layers
    has_bias = plan.layers[0].bias if bias is None else bias
    off = 1 if one_based else 0

    def stage_of(layer: int) -> int:
        return next(s for s in range(plan.num_stages) if layer in plan.stage_range(s))

    nodes: dict[str, _Node] = {}
    edges: list[tuple[str, str]] = []
    curved: set[tuple[str, str]] = set()  # drawn as arcs so parallel edges stay apart
    x = 0.0
    nodes["x"] = _Node(x, 0, "$x$", "var", 0)
    prev = "x"
    last_stage = plan.num_stages - 1
    cut_x: dict[int, float] = {}  # boundary -> x position of the cut
    for i in range(n):
        st = stage_of(i)
        k = i + off
        if i > 0 and i == plan.bounds[st]:
            cut_x[st] = x + 0.5
        x += 1.0
        op = f"mm{i}"
        nodes[op] = _Node(x, 0, r"$\times$" + ("$+$" if has_bias else ""), "op", st)
        nodes[f"W{i}"] = _Node(x, 1.15, f"$W_{{{k}}}$", "var", st)
        edges += [(prev, op), (f"W{i}", op)]
        if has_bias:
            nodes[f"b{i}"] = _Node(x, -1.15, f"$b_{{{k}}}$", "var", st)
            edges.append((f"b{i}", op))
        x += 1.0
        if i < n - 1:
            nodes[f"z{i}"] = _Node(x, 0, f"$z_{{{k}}}$", "var", st)
            nodes[f"phi{i}"] = _Node(x + 1.0, 0, r"$\phi$", "op", st)
            nodes[f"h{i}"] = _Node(x + 2.0, 0, f"$h_{{{k}}}$", "var", st)
            edges += [(op, f"z{i}"), (f"z{i}", f"phi{i}"), (f"phi{i}", f"h{i}")]
            x += 2.0
            prev = f"h{i}"
        else:
            nodes["o"] = _Node(x, 0, "$o$", "var", st)
            edges.append((op, "o"))
    x += 1.0
    loss = "$l$" if task == "regression" else r"$\ell$"
    nodes["loss"] = _Node(x, 0, loss, "op", last_stage)
    nodes["y"] = _Node(x, -1.15, "$y$", "var", last_stage)
    nodes["L"] = _Node(x + 1.0, 0, "$L$", "var", last_stage)
    nodes["plusJ"] = _Node(x + 2.0, 0, "$+$", "op", None)
    nodes["J"] = _Node(x + 3.0, 0, "$J$", "var", None)
    edges += [("o", "loss"), ("y", "loss"), ("loss", "L"), ("L", "plusJ"), ("plusJ", "J")]
    right = x + 3.0

    # the L2 term: one share per stage, computed where its weights live
    top = 2.35
    for s in range(plan.num_stages):
        r = plan.stage_range(s)
        cx = sum(nodes[f"W{i}"].x for i in r) / len(r)
        nodes[f"norm{s}"] = _Node(cx, top, r"$\|\cdot\|^2$", "op", s)
        nodes[f"s{s}"] = _Node(cx, top + 1.05, f"$s_{{{s}}}$", "var", s)
        edges += [(f"W{i}", f"norm{s}") for i in r] + [(f"norm{s}", f"s{s}")]
    nodes["plusS"] = _Node(right - 1.0, top + 1.05, "$+$", "op", None)
    nodes["s"] = _Node(right, top + 1.05, "$s$", "var", None)
    edges += [(f"s{s}", "plusS") for s in range(plan.num_stages)]
    curved.update((f"s{s}", "plusS") for s in range(plan.num_stages - 1))
    edges += [("plusS", "s"), ("s", "plusJ")]

    return Layout(nodes, edges, curved, cut_x, right, top)


def draw_graph(
    plan: Plan,
    path: str | Path,
    activation: str = "relu",
    task: str = "classification",
    bias: bool | None = None,
    one_based: bool = False,
    title: str | None = None,
) -> Path:
    """Write the picture of `plan`'s graph to `path` (PNG, SVG or PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = layout(plan, task, bias, one_based)
    right, top = g.right, g.top
    n, off = plan.num_layers, 1 if one_based else 0
    width = right + 1.4
    fig, ax = plt.subplots(figsize=(max(8.0, 0.62 * width), 5.2))
    ax.set_xlim(-0.8, right + 0.8)
    ax.set_ylim(-2.3, top + 2.4)
    ax.set_aspect("equal")
    ax.set_axis_off()

    _draw_bands(ax, plan, g)
    _draw_edges(ax, g)
    _draw_nodes(ax, g)
    _draw_cuts(ax, plan, g, off)

    caption = title or (
        f"{plan.strategy} split of {n} layers into {plan.num_stages} stages "
        f"(boxes: variables, circles: operators; dashed: cut, activations forward, "
        f"gradients backward)"
    )
    ax.set_title(caption, fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def _draw_bands(ax: Any, plan: Plan, g: Layout) -> None:
    """One tinted band per stage, labelled with the stage and its rank."""
    from matplotlib.patches import Rectangle

    nodes, cut_x, top = g.nodes, g.cut_x, g.top
    starts = [-0.6] + [cut_x[s] for s in range(1, plan.num_stages)]
    ends = [cut_x[s] for s in range(1, plan.num_stages)] + [nodes["L"].x + 0.55]
    for s, (a, b) in enumerate(zip(starts, ends)):
        c = _colour(s)
        ax.add_patch(
            Rectangle((a, -1.75), b - a, top + 1.9 + 1.75, color=_tint(c, 0.9), zorder=0, lw=0)
        )
        ax.text(
            (a + b) / 2,
            top + 1.95,
            f"stage {s} · rank {plan.rank_of(s)}",
            ha="center",
            va="bottom",
            fontsize=10,
            color=c,
            fontweight="bold",
        )


def _draw_edges(ax: Any, g: Layout) -> None:
    """The graph's edges as arrows (curved where they would cross a node)."""
    nodes, edges, curved = g.nodes, g.edges, g.curved
    for a, b in edges:
        na, nb = nodes[a], nodes[b]
        p0, p1 = _edge_point(na, nb.x, nb.y), _edge_point(nb, na.x, na.y)
        rad = -min(0.3, 1.3 / max(nb.x - na.x, 1.0)) if (a, b) in curved else 0.0
        ax.annotate(
            "",
            xy=p1,
            xytext=p0,
            zorder=2,
            arrowprops={
                "arrowstyle": "-|>",
                "color": "#333333",
                "lw": 1.0,
                "shrinkA": 0,
                "shrinkB": 0,
                "mutation_scale": 9,
                "connectionstyle": f"arc3,rad={rad}",
            },
        )


def _draw_nodes(ax: Any, g: Layout) -> None:
    """Variables as boxes, operators as circles, in their stage's colour."""
    from matplotlib.patches import Circle, FancyBboxPatch

    for node in g.nodes.values():
        c = _colour(node.stage)
        if node.kind == "var":
            ax.add_patch(
                FancyBboxPatch(
                    (node.x - _BOX_W / 2, node.y - _BOX_H / 2),
                    _BOX_W,
                    _BOX_H,
                    boxstyle="square,pad=0",
                    facecolor=_tint(c, 0.55),
                    edgecolor=c,
                    lw=1.4,
                    zorder=3,
                )
            )
        else:
            ax.add_patch(
                Circle((node.x, node.y), _R, facecolor="white", edgecolor=c, lw=1.4, zorder=3)
            )
        fs = 8 if node.label.startswith(r"$\|") else 11
        ax.text(node.x, node.y, node.label, ha="center", va="center", fontsize=fs, zorder=4)


def _draw_cuts(ax: Any, plan: Plan, g: Layout, off: int) -> None:
    """The cuts: activations forward, their gradients backward."""
    cut_x, top = g.cut_x, g.top
    for s in range(1, plan.num_stages):
        cx, h = cut_x[s], plan.bounds[s] - 1 + off
        ax.plot([cx, cx], [-1.7, top - 0.45], ls="--", color="#333333", lw=1.1, zorder=1)
        fwd, bwd = _colour(s - 1), "#B22222"
        ax.annotate(
            "",
            xy=(cx + 0.3, 0.45),
            xytext=(cx - 0.3, 0.45),
            zorder=5,
            arrowprops={"arrowstyle": "-|>", "color": fwd, "lw": 2.0},
        )
        ax.text(
            cx - 0.36,
            0.45,
            f"send/recv $h_{{{h}}}$",
            ha="right",
            va="center",
            fontsize=8,
            color=fwd,
            zorder=5,
        )
        ax.annotate(
            "",
            xy=(cx - 0.3, -0.45),
            xytext=(cx + 0.3, -0.45),
            zorder=5,
            arrowprops={"arrowstyle": "-|>", "color": bwd, "lw": 2.0, "ls": "--"},
        )
        ax.text(
            cx - 0.36,
            -0.45,
            rf"send/recv $\partial J/\partial h_{{{h}}}$",
            ha="right",
            va="center",
            fontsize=8,
            color=bwd,
            zorder=5,
        )
