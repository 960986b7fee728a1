"""The step's scalar sum: the gloo star gives every rank the same, correct sum."""

from __future__ import annotations

import pytest
import torch

from splitgraph.runtime.stepsum import StepSum
from splitgraph.spawn import run_ranks
from tests.workers import step_sums


def test_one_process_returns_its_values() -> None:
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert StepSum(None, torch.device("cpu"))(v) is v


@pytest.mark.timeout(90)
def test_every_rank_gets_the_same_bits_of_the_sum() -> None:
    world = 3
    results = run_ranks(step_sums, world, timeout=60)
    assert results[0] == results[1] == results[2]  # bit for bit: rank 0's sum, sent to all
    for rnd, sums in enumerate(results[0]):
        expected = [
            sum(0.1 * r for r in range(world)),
            sum(r + rnd for r in range(world)),
            sum(1e-17 * r for r in range(world)),
            1.0,
        ]
        assert sums == pytest.approx(expected, rel=1e-15, abs=0)
