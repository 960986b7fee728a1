"""Strategies that read the cost model: `time`, `memory` and `optimal`.

* `time`: the split whose slowest stage (forward + backward of its layers, divided by its
  device's speed) is fastest: `minmax_split`, exact.
* `memory`: the split whose largest predicted memory need (parameters, gradients, optimizer
  state and the peak saved activations *under the chosen schedule*, divided by the
  device's memory when devices differ) is smallest: `minmax_split`, exact. Under 1F1B stage
  s keeps up to min(p - s, m) microbatches, so early stages get fewer layers.
* `optimal`: the split with the smallest predicted step time of the chosen schedule
  (compute, transfers at the link's latency and bandwidth, and the bubble: the simulator's
  number, see steptime.py), among those whose every stage fits its device's memory.

`optimal` is exact for that cost model. Because 1F1B's step time is not a sum or maximum of
per-stage terms (steptime.py), no stage-by-stage recurrence can minimise it; the search is a
depth-first enumeration of the contiguous splits, stage by stage, with two exact prunings:
(1) a dynamic program over (stage, first layer) says whether the remaining layers can still
be placed within the memory caps; (2) the step time of a partial split, with the stages not
yet placed costing nothing, is a lower bound on every completion (a longest path only grows
when weights grow), so a prefix whose bound is no better than the best split found is
dropped. Started from the better of the `time` and `memory` splits, it evaluates a small
fraction of the splits. Tests compare it with brute force.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from splitgraph.cost.costs import ModelCosts
from splitgraph.data import microbatch_sizes
from splitgraph.errors import PartitionError
from splitgraph.partition.steptime import StepTimer
from splitgraph.partition.strategies import minmax_split
from splitgraph.schedule import Costs
from splitgraph.schedule.ir import B
from splitgraph.units import format_bytes


def _check_stages(costs: ModelCosts, stages: int) -> None:
    if stages != costs.num_stages:
        raise ValueError(
            f"the cost model describes {costs.num_stages} devices, not {stages} stages: build it "
            "with model_costs(work, stages)"
        )


def time_bounds(costs: ModelCosts, stages: int) -> tuple[int, ...]:
    _check_stages(costs, stages)

    def cost(s: int, i: int, j: int) -> float:
        f, b = costs.stage_time(s, i, j)
        return f + b

    return minmax_split(cost, costs.num_layers, stages)


def _memory_load(costs: ModelCosts, s: int, i: int, j: int) -> float:
    """Bytes, or the share of the device's memory when devices have different caps."""
    need = costs.stage_memory(s, i, j)
    caps = {d.memory for d in costs.devices}
    cap = costs.cap(s)
    return need / cap if len(caps) > 1 and cap else float(need)


def memory_bounds(costs: ModelCosts, stages: int) -> tuple[int, ...]:
    _check_stages(costs, stages)
    return minmax_split(lambda s, i, j: _memory_load(costs, s, i, j), costs.num_layers, stages)


def fits(costs: ModelCosts, stage: int, start: int, stop: int) -> bool:
    cap = costs.cap(stage)
    return cap is None or costs.stage_memory(stage, start, stop) <= cap


def check_fits(costs: ModelCosts, bounds: Sequence[int]) -> None:
    """Raise the no-fit error if a stage of this split exceeds its device's memory."""
    k = len(bounds) - 1
    if all(fits(costs, s, bounds[s], bounds[s + 1]) for s in range(k)):
        return
    if not _feasible_table(costs, k)[0][0]:
        raise PartitionError(no_fit_message(costs, k))
    over = [s for s in range(k) if not fits(costs, s, bounds[s], bounds[s + 1])]
    s = over[0]
    raise PartitionError(
        f"stage {s} (layers {bounds[s]}-{bounds[s + 1] - 1}) needs "
        f"{format_bytes(costs.stage_memory(s, bounds[s], bounds[s + 1]))}, over its "
        f"{format_bytes(costs.cap(s) or 0)} cap; partition=optimal finds a split that fits."
    )


def _feasible_table(costs: ModelCosts, stages: int) -> list[list[bool]]:
    """ok[s][i]: layers [i, n) can go to stages s..k-1 with every stage within its cap."""
    n = costs.num_layers
    ok = [[False] * (n + 1) for _ in range(stages + 1)]
    ok[stages][n] = True
    for s in range(stages - 1, -1, -1):
        for i in range(s, n - (stages - s) + 1):
            ok[s][i] = any(
                ok[s + 1][j] and fits(costs, s, i, j) for j in range(i + 1, n - (stages - s) + 2)
            )
    return ok


def optimal_bounds(
    costs: ModelCosts, stages: int, stats: dict[str, int] | None = None
) -> tuple[int, ...]:
    """The split minimising the simulated step time subject to every stage's memory cap.

    `stats`, if given, receives how many (partial) splits were evaluated."""
    _check_stages(costs, stages)
    n, k = costs.num_layers, stages
    ok = _feasible_table(costs, k)
    if not ok[0][0]:
        raise PartitionError(no_fit_message(costs, k))
    timer = StepTimer(costs.schedule(k))
    fwd = [0.0] * k
    bwd = [0.0] * k
    comm = [0.0] * max(k - 1, 0)
    scale = [size / costs.n for size in costs.sizes]
    speeds = [d.speed for d in costs.devices]

    evaluated = 0

    def evaluate() -> float:
        nonlocal evaluated
        evaluated += 1
        return timer(Costs(forward=fwd, backward=bwd, comm=comm, mb_scale=scale))

    best_t, best = math.inf, None
    for start in (time_bounds(costs, k), memory_bounds(costs, k)):
        if all(fits(costs, s, start[s], start[s + 1]) for s in range(k)):
            t = _price(costs, timer, start)
            if t < best_t:
                best_t, best = t, start

    cuts = [0] * (k + 1)
    cuts[k] = n
    layer_work = [f + b for f, b in zip(costs.forward, costs.backward)]
    suffix_work = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_work[i] = suffix_work[i + 1] + layer_work[i]
    low, total = min(scale), sum(scale)
    # Every rank's list ends with a B whose gradient flows on through the stages before it
    # (true of naive, GPipe, 1F1B; a schedule ending on W would drop that term).
    ends_on_b = all(row[-1].op == B for row in timer.schedule.actions if row)

    def bound(s: int, j: int, t: float) -> float:
        """A lower bound on every completion of stages 0..s (stage s ending before j)."""
        rest = suffix_work[j]
        placed_f = sum(fwd[: s + 1]) + sum(comm[:s]) + costs.comm(j)
        placed_b = sum(bwd[: s + 1]) + sum(comm[:s]) + costs.comm(j)
        # microbatch 0's round trip visits every stage once
        trip = (placed_f + placed_b) * scale[0] + rest * scale[0] / max(speeds[s + 1 :])
        # some unplaced stage holds >= rest / (their total speed) per microbatch; its rank
        # runs all m of them between the first forward reaching it and the last backward
        busiest = rest * total / sum(speeds[s + 1 :])
        busy = (placed_f + (placed_b if ends_on_b else 0.0)) * low + busiest
        return max(t, trip, busy)

    def place(s: int, i: int) -> None:
        """Try every end j for stage s starting at layer i (the last stage must end at n)."""
        nonlocal best_t, best
        last = s == k - 1
        for j in range(i + 1, n - (k - s - 1) + 1):
            if not (ok[s + 1][j] and fits(costs, s, i, j)):
                continue
            fwd[s], bwd[s] = costs.stage_time(s, i, j)
            if s > 0:
                comm[s - 1] = costs.comm(i)
            cuts[s + 1] = j
            t = evaluate()
            if not last:
                # a longest path only grows with its weights: the unplaced stages, costing
                # nothing in `t`, can only add
                if bound(s, j, t) < best_t * (1 - 1e-12):
                    place(s + 1, j)
            elif t < best_t * (1 - 1e-12):
                best_t, best = t, tuple(cuts)
        fwd[s] = bwd[s] = 0.0
        if s > 0:
            comm[s - 1] = 0.0

    place(0, 0)
    if stats is not None:
        stats["evaluated"] = evaluated
    assert best is not None
    return best


def _price(costs: ModelCosts, timer: StepTimer, bounds: Sequence[int]) -> float:
    return timer(costs.sim_costs(bounds))


# -- when nothing fits ---------------------------------------------------------------------


def smallest_cap(costs: ModelCosts, stages: int) -> tuple[int, tuple[int, ...]]:
    """The smallest memory cap, equal on every device, that some split fits; and that split."""
    _check_stages(costs, stages)
    bounds = minmax_split(
        lambda s, i, j: float(costs.stage_memory(s, i, j)), costs.num_layers, stages
    )
    need = max(costs.stage_memory(s, bounds[s], bounds[s + 1]) for s in range(stages))
    return need, bounds


def _with(costs: ModelCosts, **changes: object) -> ModelCosts:
    return dataclasses.replace(costs, _memo={}, **changes)  # type: ignore[arg-type]


def no_fit_message(costs: ModelCosts, stages: int) -> str:
    """Why no split fits, the smallest cap that would, and what each change would need."""
    need, bounds = smallest_cap(costs, stages)
    m, n = len(costs.sizes), costs.n
    caps = sorted({d.memory for d in costs.devices if d.memory is not None})
    cap_text = " / ".join(format_bytes(c) for c in caps)
    worst = max(range(stages), key=lambda s: costs.stage_memory(s, bounds[s], bounds[s + 1]))
    lo, hi = bounds[worst], bounds[worst + 1]
    static = costs.static_bytes(lo, hi)
    big = max(range(costs.num_layers), key=lambda i: costs.static_bytes(i, i + 1))
    lines = [
        f"no split of the {costs.num_layers} layers into {stages} stages fits the memory cap "
        f"({cap_text}) under schedule {costs.schedule_name} with {m} microbatches of {n}.",
        f"The smallest cap that fits is {format_bytes(need)} ({need} bytes): split "
        f"{list(bounds)}, stage {worst} needs {format_bytes(static)} for parameters, gradients "
        f"and optimizer state + {format_bytes(need - static)} of saved activations.",
        f"No split needs less than {format_bytes(costs.static_bytes(big, big + 1))}: layer "
        f"{big} alone ({costs.layers[big].params:,} parameters) holds that in parameters, "
        "gradients and optimizer state.",
        "Smallest cap with one change (against the cap):",
    ]
    cap = min(caps) if caps else 0

    def option(text: str, bytes_needed: int) -> None:
        verdict = "fits" if bytes_needed <= cap else "still over"
        lines.append(f"  - {text}: {format_bytes(bytes_needed)} ({verdict})")

    if stages < costs.num_layers:
        more = stages + 1
        devices = costs.devices + (costs.devices[-1],)
        need_more, _ = smallest_cap(_with(costs, devices=devices), more)
        option(f"{more} stages (launch {more} ranks)", need_more)
    batch = sum(costs.sizes)
    if 2 * m <= batch:
        sizes = tuple(microbatch_sizes(batch, 2 * m))
        naive = costs.schedule_name == "naive"  # one microbatch by definition
        name = "1f1b" if naive else costs.schedule_name
        need_m, _ = smallest_cap(_with(costs, sizes=sizes, schedule_name=name), stages)
        option(f"{'schedule=1f1b ' if naive else ''}pipeline.microbatches={2 * m}", need_m)
    if costs.schedule_name == "gpipe":
        need_1f1b, _ = smallest_cap(_with(costs, schedule_name="1f1b"), stages)
        option("schedule=1f1b (at most min(p - s, m) microbatches on stage s)", need_1f1b)
    if len(costs.recompute) < stages:
        everywhere = frozenset(range(stages))
        need_rc, _ = smallest_cap(_with(costs, recompute=everywhere), stages)
        option(
            "activation recomputation, schedule.recompute=true (keeps each stage's input "
            "per microbatch in flight)",
            need_rc,
        )
    return "\n".join(lines)
