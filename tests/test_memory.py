"""Saved-for-backward bytes are counted exactly, per rank, and released after the step."""

from __future__ import annotations

import pytest
import torch

from splitgraph.config import Workload, load_config
from splitgraph.observe.memory import SavedTensorMeter
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.spawn import run_ranks
from tests.workers import TINY, _batch, memory_worker

# TINY: 6 -> 5 -> 9 -> 4 -> 8 -> 3 -> 3, relu, no bias, cross-entropy, batch 12, float64.
# Per sample autograd keeps: the input x (6, saved by the first matmul), each ReLU output
# (5+9+4+8+3, shared with the next matmul: counted once), the log-softmax output (3, shared
# with nll_loss) and the int64 label (1): (6 + 29 + 3) * 8 + 8 = 312 bytes; plus nll_loss's
# scalar total_weight (8 bytes) per microbatch.
PER_SAMPLE = (6 + 29 + 3) * 8 + 8


def one_rank(overrides: list[str]) -> PipelineEngine:
    cfg = load_config(TINY + ["runtime.dtype=float64", *overrides])
    engine = PipelineEngine(Workload.of(cfg))
    x, y = _batch(cfg, torch.float64)
    engine.forward_backward(x, y)
    return engine


def test_whole_batch_in_flight_counts_every_saved_tensor_once() -> None:
    engine = one_rank(["schedule=naive"])
    assert engine.meter is not None
    assert engine.meter.peak == 12 * PER_SAMPLE + 8
    assert engine.meter.current == 0  # everything released after backward


def test_1f1b_on_one_rank_holds_one_microbatch_gpipe_all() -> None:
    f1b = one_rank(["schedule=1f1b", "pipeline.microbatches=4"])
    gp = one_rank(["schedule=gpipe", "pipeline.microbatches=4"])
    assert f1b.meter is not None and gp.meter is not None
    assert f1b.meter.peak == 3 * PER_SAMPLE + 8
    assert gp.meter.peak == 12 * PER_SAMPLE + 4 * 8


def test_parameters_and_their_views_are_not_activations() -> None:
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    meter = SavedTensorMeter([w])
    x = torch.randn(2, 3, dtype=torch.float64)
    with meter:
        y = torch.nn.functional.linear(x, w)  # saves x and w.t() (a view of w)
    assert meter.peak == x.numel() * 8
    y.sum().backward()
    del y
    assert meter.current == 0


@pytest.mark.timeout(120)
def test_per_rank_peaks_under_gpipe_and_1f1b_on_two_ranks() -> None:
    """Stage 0 (layers 0-2: x 6, relu outputs 5, 9 and 4: the last one is also what it
    sends) holds 24*8 bytes per sample; stage 1 (layers 3-5: its received input 4, relu 8 and
    3, log-probs 3, label) holds (4+8+3+3)*8+8. With 4 microbatches of 3, GPipe holds all 4
    on both stages; 1F1B holds 2 on stage 0 and 1 on stage 1."""
    (gp0, f1b0), (gp1, f1b1) = run_ranks(_pair, 2, timeout=90)
    s0, s1 = 24 * 8, (4 + 8 + 3 + 3) * 8 + 8
    assert (gp0, gp1) == (12 * s0, 12 * s1 + 4 * 8)
    assert (f1b0, f1b1) == (6 * s0, 3 * s1 + 8)


def _pair(rank: int, world: int) -> list[int]:
    out = []
    for sched in ("gpipe", "1f1b"):
        r = memory_worker(
            rank,
            world,
            [
                "runtime.dtype=float64",
                f"schedule={sched}",
                "pipeline.microbatches=4",
                "partition=manual",
                "partition.boundaries=[3]",
            ],
        )
        assert r["current"] == 0
        out.append(r["peak"])
    return out


def test_recomputation_keeps_only_stage_inputs() -> None:
    """GPipe, 4 microbatches of 3, one rank: without recomputation all 4 microbatches' graphs
    are alive at once; with it, the 4 inputs (3 x 6 floats each) plus, while one microbatch
    is recomputed, that microbatch's graph (its input counted once)."""
    plain = one_rank(["schedule=gpipe", "pipeline.microbatches=4"])
    recomp = one_rank(["schedule=gpipe", "pipeline.microbatches=4", "schedule.recompute=true"])
    assert plain.meter is not None and recomp.meter is not None
    inputs = 4 * 3 * 6 * 8
    one_graph = 3 * PER_SAMPLE + 8
    assert plain.meter.peak == 4 * one_graph
    assert recomp.meter.peak == inputs + one_graph - 3 * 6 * 8
    assert recomp.meter.current == 0


def test_deferred_weight_gradients_are_counted_until_w() -> None:
    """zb1 on one rank: I keeps, per layer, its input x and its output gradient dz for W.
    Inputs: 6+5+9+4+8+3 = 35 floats per sample; output gradients: 5+9+4+8+3+3 = 32."""
    zb = one_rank(["schedule=zb1", "pipeline.microbatches=4"])
    assert zb.meter is not None
    assert zb.meter.peak == 3 * (35 + 32) * 8
    assert zb.meter.current == 0
