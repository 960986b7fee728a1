"""The V schedules: two chunks per rank, stage s and stage 2p-1-s on rank s (ir.v_shape).

A microbatch goes down the ranks on its first chunks and back up on its second, so the
first and the last stage share rank 0 and the turn (stages p-1 and p) happens on rank p-1
without a transfer. Every rank holds one early and one late stage: its memory is balanced,
and rank 0, which 1F1B loads most, no longer waits for the whole pipeline before its first
backward. The backward is split into I and W (zerobubble.py).

`zbv` (ZB-V, Qi et al. 2023, section 6), exactly torch.distributed.pipelining's
ScheduleZBVZeroBubble order. 2 ranks (rank 0 runs stages 0 and 3), 3 microbatches,
F = I = W = 1 per chunk::

    rank 0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0I0 0W0 3F2 3I2 3W2 0I1 0W1 0I2 0W2 .
    rank 1 | .   1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1I1 2I2 1I2 1W1 2W2 1W2

With m >= 2p and F = I = W, no rank idles between its first and its last action, and the
step takes 6m + p - 1 chunk-costs: rank p-1 cannot start before p-1 forwards have passed,
so no schedule takes less. Each rank holds at most 2p chunk-microbatches, the activations
of 1F1B's first rank (p microbatches of a stage twice as large).

`vhalf` and `vmin` are the controllable-memory V family (Qi et al. 2024, "Pipeline
Parallelism with Controllable Memory"): a building block fixes, for rank r, the slot of
each of one microbatch's four passes (F and I of both chunks); microbatch j repeats it 6j
slots later; the Ws go in the free slots, first come first served, as the authors' code
does. The blocks are the authors' (their `stable_pattern_v_half` / `_v_min`):

    vhalf  F0 at 2r, F1 at 3p-r-2, I1 at 3p+g+2r-1, I0 at 6p+g-r-2   (g = 3 for even p)
    vmin   F0 at r,  F1 at 2p-r-1, I1 at 2p+g+r,    I0 at 4p+g-r-1   (g = 2 when 3 | p)

A shorter block keeps fewer microbatches alive. Counted with W freeing the activations (as
this simulator and the authors' own count do), for m >= 2p each rank holds at most

    vhalf  2(floor(p/2) + 1)       chunk-microbatches = (floor(p/2) + 1)/p of 1F1B's peak
    vmin   2(floor((p+1)/3) + 1)   chunk-microbatches = (floor((p+1)/3) + 1)/p of it

against 1F1B's 2p (p microbatches of a stage twice as large): about a half and a third,
plus one stage's worth (vhalf 3/4 at p = 4, 5/8 at p = 8; vmin 1/2 at p = 4, 1/2 at p = 8,
5/12 at p = 12). Both take less time than 1F1B at F = I = W; which of the two idles less
depends on p (vmin at p = 2 and 4, vhalf at 3, 5, 6, 8). `vhalf` at p = 3, m = 2, then
`vmin` at p = 2, m = 3::

    rank 0 | 0F0 0F1 .   .   .   5F0 5I0 5W0 .   .   5F1 5I1 5W1 0I0 0W0 .   .   0I1 0W1
    rank 1 | .   1F0 .   .   4F0 1F1 .   4I0 4W0 4F1 .   1I0 4I1 1W0 4W1 .   1I1 1W1 .
    rank 2 | .   .   2F0 3F0 .   .   2F1 3F1 3I0 3W0 2I0 2W0 .   3I1 3W1 2I1 2W1 .   .

    rank 0 | 0F0 .   .   3F0 3I0 3W0 0F1 0I0 0W0 3F1 3I1 3W1 0F2 0I1 0W1 3F2 3I2 3W2 .
    rank 1 | .   1F0 2F0 .   .   2I0 1I0 1F1 2F1 2W0 1W0 2I1 1I1 1F2 2F2 2W1 1W1 2I2 1I2

(the last row of `vmin` goes on: 0I2 0W2 on rank 0, 2W2 1W2 on rank 1). The authors also
squeeze the warm-up and cool-down of a block schedule; here the simulator's as-soon-as-
possible timing does part of that, and `schedule=auto` searches further.
"""

from __future__ import annotations

from collections.abc import Callable

from splitgraph.schedule.ir import Action, F, I, W, chunks_per_rank


def _two_chunks(name: str, num_ranks: int, num_stages: int) -> None:
    v = chunks_per_rank(name, num_ranks, num_stages)
    if v != 2:
        raise ValueError(f"{name} runs two chunks per rank in a V; got {v}")


def zbv(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """ZB-V, torch's ScheduleZBVZeroBubble order: warm-up, F I W of each chunk, cool-down."""
    _two_chunks("zbv", num_ranks, num_stages)
    p, m = num_ranks, num_microbatches
    n = max(2 * p - 1, m)  # torch builds a full pipeline, then drops microbatches >= m
    out = []
    for r in range(p):
        c0, c1 = r, 2 * p - 1 - r
        f0 = f1 = b0 = b1 = 0
        acts: list[Action] = []
        for _ in range(2 * (p - r) - 1):  # warm-up: fill the way down
            acts.append(Action(c0, F, f0))
            f0 += 1
        for _ in range(r):  # the way back up starts
            acts += [Action(c1, F, f1), Action(c0, F, f0)]
            f1, f0 = f1 + 1, f0 + 1
        for _ in range(p - r):  # second chunk: F, I, W as they come
            acts += [Action(c1, F, f1), Action(c1, I, b1), Action(c1, W, b1)]
            f1, b1 = f1 + 1, b1 + 1
        while f1 < f0 or f0 < n:  # steady state: F I W on each chunk
            if f0 < n:
                acts.append(Action(c0, F, f0))
                f0 += 1
            acts += [Action(c0, I, b0), Action(c0, W, b0)]
            acts += [Action(c1, F, f1), Action(c1, I, b1), Action(c1, W, b1)]
            f1, b0, b1 = f1 + 1, b0 + 1, b1 + 1
        w0, w1 = b0, b1
        for _ in range(r):  # cool-down: input gradients first
            acts += [Action(c0, I, b0), Action(c1, I, b1)]
            b0, b1 = b0 + 1, b1 + 1
        for _ in range(p - r):
            acts += [Action(c0, I, b0), Action(c0, W, w0)]
            b0, w0 = b0 + 1, w0 + 1
        acts += [Action(c1, W, k) for k in range(w1, b1)]
        acts += [Action(c0, W, k) for k in range(w0, b0)]
        out.append([a for a in acts if a.mb < m])
    return out


#: (p, r) -> slots of F chunk 0, F chunk 1, I chunk 1, I chunk 0 for microbatch 0.
Block = Callable[[int, int], tuple[int, int, int, int]]


def _vhalf_block(p: int, r: int) -> tuple[int, int, int, int]:
    g = 3 if p % 2 == 0 else 0
    return 2 * r, 3 * p - r - 2, 3 * p + g + 2 * r - 1, 6 * p + g - r - 2


def _vmin_block(p: int, r: int) -> tuple[int, int, int, int]:
    g = 2 if p % 3 == 0 else 0
    return r, 2 * p - r - 1, 2 * p + g + r, 4 * p + g - r - 1


def from_block(
    name: str, block: Block, num_ranks: int, num_stages: int, num_microbatches: int
) -> list[list[Action]]:
    """Repeat the block every 6 slots, order each rank by slot, fill free slots with W."""
    _two_chunks(name, num_ranks, num_stages)
    p, m = num_ranks, num_microbatches
    out = []
    for r in range(p):
        f0, f1, i1, i0 = block(p, r)
        c0, c1 = r, 2 * p - 1 - r
        slots = sorted(
            (
                (t + 6 * k, Action(stage, op, k))
                for t, stage, op in ((f0, c0, F), (f1, c1, F), (i1, c1, I), (i0, c0, I))
                for k in range(m)
            ),
            key=lambda x: x[0],
        )
        if len({t for t, _ in slots}) != len(slots):
            raise AssertionError(f"{name}: two passes share a slot on rank {r} (p={p})")
        acts: list[Action] = []
        waiting: list[Action] = []  # Ws whose I has run, oldest first
        slot, i = 0, 0
        while i < len(slots) or waiting:
            if i < len(slots) and slots[i][0] == slot:
                a = slots[i][1]
                acts.append(a)
                if a.op == I:
                    waiting.append(Action(a.stage, W, a.mb))
                i += 1
            elif waiting:
                acts.append(waiting.pop(0))
            slot += 1
        out.append(acts)
    return out


def vhalf(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """V-Half's building block; about half of 1F1B's activations (see the docstring)."""
    return from_block("vhalf", _vhalf_block, num_ranks, num_stages, num_microbatches)


def vmin(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """V-Min's building block; half of 1F1B's activations for even p (see the docstring)."""
    return from_block("vmin", _vmin_block, num_ranks, num_stages, num_microbatches)
