"""1F1B (PipeDream-Flush, Narayanan et al. 2021): warm-up, one forward one backward, cool-down.

1F1B, 3 stages, 4 microbatches, unit F and B (the simulator's timeline, `.` idle)::

    rank 0 | F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
    rank 1 | .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .
    rank 2 | .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .

The same bubble as GPipe, (p-1)/(m+p-1), but stage i holds at most min(p-i, m) microbatches
of activations instead of m: a backward frees one as soon as the pipeline is full.
"""

from __future__ import annotations

from splitgraph.schedule.ir import Action, B, F


def one_f_one_b(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Compute actions per rank (stage s on rank s); any m >= 1, including m < p."""
    p, m = num_stages, num_microbatches
    out = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        acts = [Action(s, F, i) for i in range(warmup)]  # warm-up: fill the pipeline
        for i in range(m - warmup):  # steady state: one forward, one backward
            acts += [Action(s, F, warmup + i), Action(s, B, i)]
        acts += [Action(s, B, i) for i in range(m - warmup, m)]  # cool-down: drain it
        out.append(acts)
    return out
