"""The depth-first family: 1F1B and Megatron's interleaved 1F1B.

1F1B (PipeDream-Flush, Narayanan et al. 2021), 3 stages, 4 microbatches, unit F and B::

    rank 0 | F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
    rank 1 | .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .
    rank 2 | .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .

The same bubble as GPipe, (p-1)/(m+p-1), but stage i holds at most min(p-i, m) microbatches
of activations instead of m: a backward frees one as soon as the pipeline is full.

Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): each rank holds v model chunks, placed
round-robin (stage k*p + r on rank r), so activations travel the ring v times. Microbatches go
in rounds; within a round, chunk by chunk. As in torch.distributed.pipelining, there are
max(1, m // p) rounds, so a round holds p microbatches when p divides m and the order is
Megatron's; otherwise the rounds are as even as can be (torch runs only the m it can split
evenly; the first rounds here take one more), which makes it defined for every m >= 1.
2 ranks x 2 chunks (rank 0 runs stages 0 and 2), 4 microbatches, unit costs per chunk::

    rank 0 | 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
    rank 1 | .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .

The bubble shrinks to (p-1)/(v*m+p-1) in units of one chunk's work (m a multiple of p), for
more transfers.
"""

from __future__ import annotations

from splitgraph.schedule.ir import Action, B, F, chunks_per_rank, one_stage_per_rank


def one_f_one_b(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Compute actions per rank (stage s on rank s); any m >= 1, including m < p."""
    one_stage_per_rank("1f1b", num_ranks, num_stages)
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
    """Megatron's interleaved 1F1B; rank r holds stages r, r+p, ..., r+(v-1)p; any m >= 1."""
    p, m = num_ranks, num_microbatches
    v = chunks_per_rank("interleaved", p, num_stages)
    rounds = round_sizes(p, m)
    out = []
    for r in range(p):
        forwards, backwards = [], []
        first = 0
        for size in rounds:
            group = range(first, first + size)
            for k in range(v):  # forward: chunk 0 of the round, then chunk 1, ...
                forwards += [Action(k * p + r, F, i) for i in group]
            for k in reversed(range(v)):  # backward: the last chunk first
                backwards += [Action(k * p + r, B, i) for i in group]
            first += size
        total = len(forwards)
        warmup = min((v - 1) * rounds[0] + 2 * (p - r - 1), total)  # torch's _get_warmup_ops
        acts = forwards[:warmup]  # warm-up
        for i in range(total - warmup):  # steady state: one forward, one backward
            acts += [forwards[warmup + i], backwards[i]]
        acts += backwards[total - warmup :]  # cool-down
        out.append(acts)
    return out


def round_sizes(num_ranks: int, num_microbatches: int) -> list[int]:
    """Microbatches per round: max(1, m // p) rounds, as even as can be, larger ones first.

    p = 4: m = 8 -> [4, 4]; m = 10 -> [5, 5] (torch's too); m = 9 -> [5, 4]; m = 3 -> [3].
    """
    n = max(1, num_microbatches // num_ranks)
    q, extra = divmod(num_microbatches, n)
    return [q + (1 if i < extra else 0) for i in range(n)]
