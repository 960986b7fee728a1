"""Partition strategies: pure functions from per-layer costs to cut points.

`balanced` is the exact solution of the linear partition problem: over all contiguous
splits of the layers into `k` non-empty stages it returns one whose largest stage cost is
smallest (ties: the smallest sum of squared stage costs, then the earliest cuts). A greedy
split can be far from this; the DP is O(k * n^2) and n is the number of layers.
`minmax_split` is the same DP with costs that depend on the stage too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from splitgraph.errors import PartitionError


def uniform(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Equal layer counts; the first `num_layers % num_stages` stages take one more."""
    _check(num_layers, num_stages)
    q, r = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + q + (1 if s < r else 0))
    return tuple(bounds)


def balanced(costs: Sequence[float], num_stages: int) -> tuple[int, ...]:
    """Contiguous split of `costs` into `num_stages` parts minimising the largest part."""
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    return minmax_split(lambda s, i, j: prefix[j] - prefix[i], len(costs), num_stages)


def minmax_split(
    cost: Callable[[int, int, int], float], num_layers: int, num_stages: int
) -> tuple[int, ...]:
    """The split minimising the largest `cost(stage, first, stop)` over its stages.

    The cost may depend on the stage (a device's speed, a schedule that keeps more
    microbatches on early stages), so this is the linear partition DP with stage-indexed
    costs; ties: the smallest sum of squared stage costs, then the earliest cuts.
    """
    n = num_layers
    _check(n, num_stages)
    inf = (float("inf"), float("inf"))
    # best[k][j]: (max, sum of squares) for the first j layers in k stages; arg[k][j]: last cut.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    arg = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev == inf:
                    continue
                c = float(cost(k - 1, i, j))
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[k][j]:
                    best[k][j], arg[k][j] = cand, i
    bounds = [n]
    for k in range(num_stages, 0, -1):
        bounds.append(arg[k][bounds[-1]])
    return tuple(reversed(bounds))


def manual(boundaries: Sequence[int], num_layers: int, num_stages: int) -> tuple[int, ...]:
    """User-given cut points: the first layer of stages 1..S-1."""
    _check(num_layers, num_stages)
    b = [int(x) for x in boundaries]
    if len(b) != num_stages - 1:
        raise PartitionError(
            f"partition.boundaries={b} has {len(b)} cut points; {num_stages} stages need "
            f"{num_stages - 1}."
        )
    bounds = (0, *b, num_layers)
    if any(x >= y for x, y in zip(bounds, bounds[1:])):
        raise PartitionError(
            f"partition.boundaries={b} must be strictly increasing inside 1..{num_layers - 1}."
        )
    return bounds


def _check(num_layers: int, num_stages: int) -> None:
    if num_stages < 1 or num_stages > num_layers:
        raise PartitionError(
            f"cannot cut {num_layers} layers into {num_stages} non-empty stages; use between "
            f"1 and {num_layers} stages."
        )
