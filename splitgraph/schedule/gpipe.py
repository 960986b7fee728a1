"""The breadth-first family: all forwards, then all backwards.

GPipe (Huang et al. 2019), 3 stages, 4 microbatches, unit F and B (`.` idle)::

    rank 0 | F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
    rank 1 | .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .
    rank 2 | .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .

Bubble (p-1)/(m+p-1); every stage holds the activations of all m microbatches at its peak.

`naive` is GPipe with one microbatch: the plain "split the model across devices" case, where
only one rank works at a time.

`loopedbfs` (breadth-first pipeline parallelism, Lamy-Poirier 2023) is GPipe over v model
chunks per rank, placed round-robin like interleaved 1F1B: chunk 0 of every rank forwards all
microbatches, then chunk 1, ..., then the backwards in reverse, last chunk and last
microbatch first (torch.distributed.pipelining's ScheduleLoopedBFS order, action for
action). Why it is here: it reaches the same bubble as interleaved 1F1B, (p-1)/(vm+p-1),
while holding all m microbatches on every chunk (v*m per rank). Side by side with
`interleaved`, it shows that the bubble shrinks with the number of chunks whatever the
order, and that it is the depth-first (1F1B) order that saves the memory.
"""

from __future__ import annotations

from splitgraph.schedule.ir import Action, B, F, chunks_per_rank, one_stage_per_rank


def gpipe(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Compute actions per rank; one stage per rank."""
    one_stage_per_rank("gpipe", num_ranks, num_stages)
    m = num_microbatches
    return [
        [Action(s, F, i) for i in range(m)] + [Action(s, B, i) for i in range(m)]
        for s in range(num_stages)
    ]


def naive(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    if num_microbatches != 1:
        raise ValueError(f"naive runs one microbatch, got {num_microbatches}")
    return gpipe(num_ranks, num_stages, 1)


def looped_bfs(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Rank r holds stages r, r+p, r+2p, ...: forwards chunk by chunk, backwards in reverse
    (last chunk first, each from the last microbatch down, as torch's ScheduleLoopedBFS)."""
    p, m = num_ranks, num_microbatches
    v = chunks_per_rank("loopedbfs", p, num_stages)
    out = []
    for r in range(p):
        acts = []
        for k in range(v):
            acts += [Action(k * p + r, F, i) for i in range(m)]
        for k in reversed(range(v)):
            acts += [Action(k * p + r, B, i) for i in reversed(range(m))]
        out.append(acts)
    return out
