"""The schedule on fewer cores than ranks (cost/timeshare.py): with cores enough it is the
simulator exactly; with fewer, the ranks take turns and the step grows as it must."""

from __future__ import annotations

import pytest

from splitgraph.cost.timeshare import shared_tail, simulate_shared
from splitgraph.schedule import Costs, build_schedule, simulate

CASES = [
    ("naive", 2, 1),
    ("gpipe", 2, 4),
    ("1f1b", 4, 8),
    ("zb1", 4, 6),
    ("interleaved", 4, 8),
]


def _costs(stages: int, post: float = 0.0) -> Costs:
    f = [1.0 + 0.3 * s for s in range(stages)]
    b = [2.1 + 0.2 * s for s in range(stages)]
    return Costs(f, b, comm=[0.15] * (stages - 1), post=post)


@pytest.mark.parametrize(("name", "p", "m"), CASES)
@pytest.mark.parametrize("post", [0.0, 0.05])
def test_enough_cores_is_the_simulator(name: str, p: int, m: int, post: float) -> None:
    sched = build_schedule(name, p, m, 2 if name == "interleaved" else 1)
    costs = _costs(sched.num_stages, post)
    want = simulate(sched, costs)
    got = simulate_shared(sched, costs, cores=p)
    assert got.step_time == pytest.approx(want.step_time, rel=1e-9)
    assert list(got.busy) == pytest.approx(want.busy, rel=1e-9)


def test_fewer_cores_take_turns() -> None:
    sched = build_schedule("1f1b", 4, 8)
    costs = _costs(4)
    free = simulate(sched, costs)
    two = simulate_shared(sched, costs, cores=2)
    one = simulate_shared(sched, costs, cores=1)
    # never faster than the free simulator, nor than the work spread over the cores
    assert two.step_time > free.step_time * 1.05
    assert two.step_time >= sum(two.busy) / 2 - 1e-9
    assert one.step_time >= sum(one.busy) - 1e-9
    assert one.step_time > two.step_time
    # one core, never idle except while every rank waits on a transfer
    assert one.step_time <= sum(one.busy) + 0.15 * 2 * 8 * 3 + 1e-9


def test_a_chain_on_one_core_is_its_sum() -> None:
    """naive: one rank works at a time, so sharing costs nothing even on one core."""
    sched = build_schedule("naive", 4, 1)
    costs = _costs(4)
    assert simulate_shared(sched, costs, cores=1).step_time == pytest.approx(
        simulate(sched, costs).step_time
    )


def test_shared_tail() -> None:
    assert shared_tail([1.0, 2.0], cores=2) == pytest.approx(2.0)
    assert shared_tail([1.0, 1.0, 1.0, 1.0], cores=2) == pytest.approx(2.0)
    # 4 ranks on 2 cores: 1,1,1,3 -> the three short ones at 2/4 then 2/3 speed...
    assert shared_tail([1.0, 1.0, 1.0, 3.0], cores=2) == pytest.approx(2.0 + 2.0)
    assert shared_tail([], cores=2) == 0.0


def test_crowding_slows_only_what_runs_past_the_cores() -> None:
    """crowding > 1 stretches the time more ranks than cores work at once, nothing else:
    naive (one rank at a time) is unchanged, 1F1B on 4 ranks and 2 cores grows, and four
    equal tails on 2 cores take crowding times their turns."""
    chain, costs = build_schedule("naive", 4, 1), _costs(4)
    assert simulate_shared(chain, costs, 2, crowding=2.0).step_time == pytest.approx(
        simulate_shared(chain, costs, 2).step_time
    )
    busy = build_schedule("1f1b", 4, 8)
    assert simulate_shared(busy, costs, 2, 1.5).step_time > 1.1 * (
        simulate_shared(busy, costs, 2).step_time
    )
    assert shared_tail([1.0] * 4, cores=2, crowding=1.5) == pytest.approx(3.0)
    assert shared_tail([1.0] * 2, cores=2, crowding=1.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="crowding"):
        simulate_shared(busy, costs, 2, crowding=0.5)
