"""GPipe (Huang et al. 2019): every forward, then every backward; and the naive split.

GPipe, 3 stages, 4 microbatches, unit F and B (the simulator's timeline, `.` idle)::

    rank 0 | F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
    rank 1 | .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .
    rank 2 | .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .

Bubble (p-1)/(m+p-1); every stage holds the activations of all m microbatches at its peak.

`naive` is GPipe with one microbatch: the whole batch goes down the stages and back, so only
one rank works at a time, the plain "split the model across devices" case.
"""

from __future__ import annotations

from splitgraph.schedule.ir import Action, B, F


def gpipe(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Compute actions per rank (stage s on rank s)."""
    return [
        [Action(s, F, i) for i in range(num_microbatches)]
        + [Action(s, B, i) for i in range(num_microbatches)]
        for s in range(num_stages)
    ]


def naive(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    if num_microbatches != 1:
        raise ValueError(f"naive runs one microbatch, got {num_microbatches}")
    return gpipe(num_stages, 1)
