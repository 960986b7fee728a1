"""The depth-first family: 1F1B and Megatron's interleaved 1F1B.

1F1B (PipeDream-Flush, Narayanan et al. 2021), 3 stages, 4 microbatches, unit F and B::

    rank 0 | F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
    rank 1 | .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .
    rank 2 | .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .

The same bubble as GPipe, (p-1)/(m+p-1), but stage i holds at most min(p-i, m) microbatches
of activations instead of m: a backward frees one as soon as the pipeline is full.

Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): each rank holds v model chunks, placed
round-robin (stage k*p + r on rank r), so activations travel the ring v times. Microbatches go
in groups of p; within a group, chunk by chunk. 2 ranks x 2 chunks (rank 0 runs stages 0 and
2), 4 microbatches, unit costs per chunk::

    rank 0 | 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
    rank 1 | .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .

The bubble shrinks to (p-1)/(v*m+p-1) in units of one chunk's work, for more transfers.
Defined when m is a multiple of p (the grouping needs whole groups).
"""

from __future__ import annotations

from splitgraph.schedule.gpipe import _chunks, _one_stage_per_rank
from splitgraph.schedule.ir import Action, B, F


def one_f_one_b(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Compute actions per rank (stage s on rank s); any m >= 1, including m < p."""
    _one_stage_per_rank("1f1b", num_ranks, num_stages)
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


def interleaved(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B; rank r holds stages r, r+p, ..., r+(v-1)p."""
    p, m = num_ranks, num_microbatches
    v = _chunks("interleaved", p, num_stages)
    if p > 1 and m % p:
        raise ValueError(f"interleaved needs the microbatches ({m}) to be a multiple of {p}")
    out = []
    for r in range(p):
        forwards, backwards = [], []
        for first in range(0, m, p):  # microbatches in groups of p
            group = range(first, min(first + p, m))
            for k in range(v):  # forward: chunk 0 of the group, then chunk 1, ...
                forwards += [Action(k * p + r, F, i) for i in group]
            for k in reversed(range(v)):  # backward: the last chunk first
                backwards += [Action(k * p + r, B, i) for i in group]
        total = len(forwards)
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        acts = forwards[:warmup]  # warm-up
        for i in range(total - warmup):  # steady state: one forward, one backward
            acts += [forwards[warmup + i], backwards[i]]
        acts += backwards[total - warmup :]  # cool-down
        out.append(acts)
    return out
