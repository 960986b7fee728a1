"""Zero-bubble ZB-H1 (Qi et al. 2023): split each backward into I and W, defer the W.

A backward is two jobs: I, the gradient w.r.t. the stage input, which the previous stage is
waiting for, and W, the gradients w.r.t. the stage's weights, which nobody waits for. ZB-H1
runs 1F1B's order of F and I, and stage i runs the W of microbatch j only after the I of
microbatch j+i (the rest at the end). The downstream stages thus return input gradients
sooner, and the deferred Ws fill what would have been the cool-down bubble. 4 stages,
8 microbatches, F = I = W = 1::

    rank 0 | F0 F1 F2 F3 .  .  .  I0 W0 F4 I1 W1 F5 I2 W2 F6 I3 W3 F7 I4 W4 I5 W5 I6 W6 I7 W7
    rank 1 | .  F0 F1 F2 .  .  I0 F3 I1 W0 F4 I2 W1 F5 I3 W2 F6 I4 W3 F7 I5 W4 I6 W5 I7 W6 W7
    rank 2 | .  .  F0 F1 .  I0 F2 I1 F3 I2 W0 F4 I3 W1 F5 I4 W2 F6 I5 W3 F7 I6 W4 I7 W5 W6 W7
    rank 3 | .  .  .  F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 F5 I5 W2 F6 I6 W3 F7 I7 W4 W5 W6 W7

Idle time (p-1)(F+I-W) against 1F1B's (p-1)(F+I+W): a third when F = I = W (m >= p). Every
stage holds at most p microbatches between F and W, which is 1F1B's peak (its first stage);
later stages hold more than under 1F1B, but after I only what W needs (each layer's input
and output gradient), not the whole graph.

ZB-H2 (same paper) lets the early stages run more forwards before their first I, so that no
rank idles between its first and its last action. Here it is list scheduling (listsched.py)
at F = I = W: I when it can, else F while fewer than 2p-1 microbatches are held, else W.
4 stages, 8 microbatches::

    rank 0 | F0 F1 F2 F3 F4 F5 F6 I0 W0 I1 F7 I2 W1 I3 W2 I4 W3 I5 W4 I6 W5 W6 I7 W7 .  .  .
    rank 1 | .  F0 F1 F2 F3 F4 I0 F5 I1 F6 I2 W0 I3 F7 I4 W1 I5 W2 I6 W3 W4 I7 W5 W6 W7 .  .
    rank 2 | .  .  F0 F1 F2 I0 F3 I1 F4 I2 F5 I3 F6 I4 W0 I5 F7 I6 W1 W2 I7 W3 W4 W5 W6 W7 .
    rank 3 | .  .  .  F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 F5 I5 F6 I6 W0 F7 I7 W1 W2 W3 W4 W5 W6 W7

For m >= 2p-1 the step is 3m + p - 1, the least possible (rank p-1 starts after p-1
forwards); zb1 takes as long at F = I = W but idles p-1-r inside rank r's span, and longer
when W < I. Each stage holds up to 2p-1 microbatches: (2p-1)/p of 1F1B's peak.
"""

from __future__ import annotations

from splitgraph.schedule.ir import Action, F, I, W, one_stage_per_rank
from splitgraph.schedule.onefoneb import one_f_one_b


def zb1(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    one_stage_per_rank("zb1", num_ranks, num_stages)
    m = num_microbatches
    out = []
    for s, row in enumerate(one_f_one_b(num_ranks, num_stages, m)):
        acts: list[Action] = []
        next_w = 0
        for a in row:
            if a.op == F:
                acts.append(a)
                continue
            acts.append(Action(s, I, a.mb))
            if a.mb - s >= next_w:  # W of microbatch j after the I of microbatch j + s
                acts.append(Action(s, W, next_w))
                next_w += 1
        acts += [Action(s, W, j) for j in range(next_w, m)]
        out.append(acts)
    return out


def zb2(num_ranks: int, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """ZB-H2: list scheduling (listsched.py) at F = I = W under a cap of 2p-1 microbatches."""
    from splitgraph.schedule.listsched import Policy, list_schedule
    from splitgraph.schedule.simulate import Costs

    one_stage_per_rank("zb2", num_ranks, num_stages)
    p = num_ranks
    policy = Policy(cap=(2.0 * p - 1,) * p, split=True)
    rows = list_schedule(range(p), num_microbatches, Costs.uniform(p, 1.0, 2.0, w=1.0), policy)
    if rows is None:  # cannot happen: one stage per rank never stalls (listsched.py)
        raise AssertionError(f"zb2 stalled at p={p}, m={num_microbatches}")
    return rows
