"""schedule=auto and the list scheduler: never worse than the best fixed schedule that fits,
always valid, and honest about why."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitgraph.config import Workload
from splitgraph.schedule import SCHEDULES, Costs, build_schedule, render_ascii, simulate, validate
from splitgraph.schedule.auto import AutoInput, plan_auto
from splitgraph.schedule.cli import main as schedule_main
from splitgraph.schedule.ir import B, I, W, make_schedule, round_robin, v_shape
from splitgraph.schedule.listsched import Policy, list_schedule
from splitgraph.schedule.simulate import peak_activation


def _best_fixed(inp: AutoInput, cap: float | None) -> tuple[float, str] | None:
    """Independently of auto: the fastest fixed schedule whose peak fits `cap`."""
    best = None
    for name, spec in SCHEDULES.items():
        if spec.generate is None or spec.problems(inp.ranks, inp.virtual, inp.microbatches):
            continue
        sched = build_schedule(name, inp.ranks, inp.microbatches, inp.virtual)
        if cap is not None and max(peak_activation(sched)) > cap + 1e-9:
            continue
        step = simulate(sched, inp.costs).step_time
        if best is None or step < best[0]:
            best = (step, name)
    return best


@st.composite
def runs(draw: st.DrawFn) -> tuple[AutoInput, float | None]:
    p = draw(st.integers(1, 4))
    v = draw(st.sampled_from([1, 2]))
    m = draw(st.integers(1, 8))
    n = p * v
    cost = st.floats(0.2, 3.0, allow_nan=False)
    f = draw(st.lists(cost, min_size=n, max_size=n))
    i = draw(st.lists(cost, min_size=n, max_size=n))
    w = draw(st.lists(cost, min_size=n, max_size=n))
    b = [x + y * draw(st.floats(0.6, 1.0)) for x, y in zip(i, w)]  # B <= I + W
    comm = draw(st.lists(st.floats(0.0, 1.0), min_size=n - 1, max_size=n - 1))
    cap = draw(st.one_of(st.none(), st.floats(0.25, 2.5)))
    return AutoInput(p, m, Costs(f, b, i, w, comm), v, cap=cap), cap


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_auto_is_never_slower_than_the_best_fixed_schedule_that_fits(
    run: tuple[AutoInput, float | None],
) -> None:
    inp, cap = run
    best = _best_fixed(inp, cap)
    try:
        result = plan_auto(inp)
    except ValueError as e:
        assert best is None, f"auto refused ({e}) but {best} fits"
        assert "no schedule fits the cap" in str(e)
        return
    sched = result.schedule
    validate(sched)
    step = simulate(sched, inp.costs).step_time
    assert step == pytest.approx(result.chosen.step_time)
    if cap is not None:
        assert max(peak_activation(sched)) <= cap + 1e-9
    if best is not None:
        assert step <= best[0] + 1e-9, (result.chosen.name, best)
        assert result.best_fixed() is not None
        assert result.best_fixed().step_time == pytest.approx(best[0])  # type: ignore[union-attr]


def test_auto_beats_every_fixed_schedule_where_memory_lies_between_them() -> None:
    """F = I = W with transfers of half a forward, and room for 1.5x 1F1B's activations:
    zb2 (1.75) does not fit, zb1 and 1F1B leave the transfers exposed; the list scheduler
    uses the extra room to hide them, 10% faster than the best fixed schedule that fits."""
    inp = AutoInput(4, 8, Costs.uniform(4, 1.0, 2.0, w=1.0, comm=0.5), 1, cap=1.5)
    result, best = plan_auto(inp), _best_fixed(inp, 1.5)
    assert best == (33.0, "zb1")
    assert not result.chosen.fixed
    assert result.chosen.step_time == pytest.approx(30.0)
    assert max(result.chosen.peak) <= 1.5
    table = result.table()
    assert table.splitlines()[0].startswith("schedule=auto (cap 1.5 1.5 1.5 1.5;")
    assert f"than the best fixed schedule that fits ({best[1]})" in table
    for name in ("1f1b", "zb1", "zb2", "gpipe"):
        assert f"\n{name} " in table


def test_auto_refuses_a_cap_nothing_fits_naming_the_least_memory() -> None:
    why = r"no schedule fits the cap \(0\.1 model-microbatches per rank\).* the least memory is"
    with pytest.raises(ValueError, match=why):
        plan_auto(AutoInput(2, 4, Costs.uniform(2), 1, cap=0.1))


@pytest.mark.parametrize(
    ("place_name", "p", "v"),
    [("one", p, 1) for p in (1, 2, 3, 4)]
    + [("rr", p, 2) for p in (2, 3)]
    + [("v", p, 2) for p in (2, 3, 4)],
)
def test_list_schedules_are_valid_or_refuse(place_name: str, p: int, v: int) -> None:
    """Every list schedule validates (strict dry run included) under every cap and policy;
    with one stage per rank or the V it never stalls while one microbatch fits."""
    S = p * v
    place = v_shape(p, S) if place_name == "v" else round_robin(p, S)
    f = [1.0 + 0.3 * s for s in range(S)]
    costs = Costs(f, [2.0] * S, [1.2] * S, [0.7] * S, [0.4] * (S - 1))
    for m, k, split, late_b, late_f in itertools.product(
        (1, 3, 6), (1, 2, p, 2 * p), (True, False), (True, False), (True, False)
    ):
        cap = (float(k * v),) * p
        policy = Policy(cap, split=split, late_backward=late_b, late_forward=late_f)
        rows = list_schedule(place, m, costs, policy)
        if rows is None:
            assert place_name == "rr", "one stage per rank and the V never stall"
            continue
        sched = make_schedule("list", rows, place, m)
        validate(sched)
        held = max(peak_activation(sched)) * S  # in stage-microbatches
        assert held <= k * v + 1e-9


def test_zb2_is_the_list_scheduler_at_unit_costs() -> None:
    rows = list_schedule(range(3), 5, Costs.uniform(3, 1.0, 2.0, w=1.0), Policy(cap=(5.0,) * 3))
    assert rows is not None
    assert [list(map(str, r)) for r in rows] == [
        [str(a) for a in build_schedule("zb2", 3, 5).compute(r)] for r in range(3)
    ]


def test_planner_input_prices_exact_bytes_under_the_schedules_placement() -> None:
    """ModelCosts.auto_input: memory is static bytes of the rank's stages + the memory
    model's saved peak; auto's choice fits the byte cap."""
    from splitgraph.config import load_config
    from splitgraph.cost.costs import model_costs
    from splitgraph.cost.link import Link
    from splitgraph.cost.memory_model import plan_walk, predict_saved_peak

    cfg = load_config(
        [
            "costs.times=flops",
            "pipeline.microbatches=4",
            "pipeline.memory_cap=1MiB",
            "model.hidden=[32,32,32]",
        ]
    )
    mc = model_costs(Workload.of(cfg), stages=2, link=Link(1e9))
    bounds = [0, 1, 2, 3, 4]
    inp = mc.auto_input(bounds, 2, split_overhead=1.2)
    assert inp.virtual == 2 and inp.cap == [2.0**20, 2.0**20] and inp.unit == "bytes"
    zbv = build_schedule("zbv", 2, 4, 2)
    saved = predict_saved_peak(zbv, plan_walk(mc.shape, bounds, mc.sizes))
    static = [mc.static_bytes(bounds[s], bounds[s + 1]) for s in range(4)]
    want = [saved[0] + static[0] + static[3], saved[1] + static[1] + static[2]]
    assert list(inp.peaks(zbv)) == want
    assert inp.costs.compute(I, 0, 0) == pytest.approx(inp.costs.backward[0] / 2 * 1.2)
    result = plan_auto(inp)
    assert max(result.chosen.peak) <= 2**20


def test_schedule_command_shows_why_auto_is_better(capsys: pytest.CaptureFixture[str]) -> None:
    code = schedule_main(
        [
            "auto",
            "pipeline.stages=2",
            "pipeline.microbatches=4",
            "schedule.virtual_stages=2",
            "--cap",
            "1",
            "--no-picture",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "auto = zbv" in out and "vs auto" in out
    for name in ("interleaved", "loopedbfs", "vhalf", "vmin"):
        assert f"\n{name} " in out
    assert schedule_main(["1f1b", "pipeline.stages=2", "--cap", "1", "--no-picture"]) == 2
    assert "--cap is auto's memory cap" in capsys.readouterr().err


def test_the_docstring_picture_auto_against_zb1() -> None:
    costs = Costs.uniform(3, 1.0, 2.0, w=1.0, comm=1.0)
    result = plan_auto(AutoInput(3, 5, costs, 1, cap=1.5))
    assert result.best_fixed() is not None and result.best_fixed().name == "zb1"  # type: ignore[union-attr]
    assert render_ascii(simulate(result.schedule, costs)).splitlines() == [
        "rank 0 | F0 F1 F2 F3 .  .  .  .  .  I0 W0 I1 F4 I2 W1 I3 W2 W3 .  .  .  I4 W4",
        "rank 1 | .  .  F0 F1 F2 F3 .  I0 W0 I1 W1 I2 W2 I3 F4 W3 .  .  .  I4 W4 .  .",
        "rank 2 | .  .  .  .  F0 I0 F1 I1 F2 I2 F3 I3 W0 W1 W2 W3 F4 I4 W4 .  .  .  .",
    ]


@pytest.mark.timeout(120)
def test_ranks_that_built_different_schedules_all_stop_naming_them() -> None:
    """schedule=auto's order is built on each rank from its own costs: a rank whose order
    differs from rank 0's would pair the wrong transfers, so every rank stops, naming it."""
    from splitgraph.spawn import run_ranks
    from tests.workers import schedule_agreement_worker

    cases = [["1f1b", "1f1b"], ["1f1b", "gpipe"]]
    per_rank = run_ranks(schedule_agreement_worker, 2, cases, timeout=90)
    assert [r[0] for r in per_rank] == ["agree", "agree"]
    for r in per_rank:  # both ranks, the same message
        assert "built a different schedule on ranks [1] than on rank 0" in r[1], r[1]
        assert "costs.times=flops" in r[1]


def test_auto_under_a_byte_cap_is_never_slower_than_a_fixed_schedule_that_fits() -> None:
    """The trainer's path (costs.ModelCosts.auto_input: exact bytes, caps from
    pipeline.memory_cap): the default model on 2 ranks, capped at 1F1B's bytes as
    bench.schedules' auto-cap1f1b row is. Whatever auto picks fits every rank's cap and
    simulates no slower than any fixed schedule that fits the same cap (with one chunk
    1F1B fits and zb1 does not; with two no fixed schedule fits: auto still must)."""
    from splitgraph.bench.schedules import onefoneb_bytes
    from splitgraph.config import load_config
    from splitgraph.cost.costs import model_costs
    from splitgraph.partition import make_plan

    link = ["pipeline.bandwidth=1GB", "pipeline.latency=2.5e-4", "costs.times=flops"]
    for v, m in ((1, 4), (1, 8), (2, 4)):
        _, total = onefoneb_bytes(2, m, link)
        cfg = load_config(
            [*link, "pipeline.stages=2", f"pipeline.microbatches={m}", "schedule=auto"]
            + [f"schedule.virtual_stages={v}", f"pipeline.memory_cap={max(total)}"]
        )
        work = Workload.of(cfg)
        plan = make_plan(work, 2)
        inp = model_costs(work, plan.num_stages).auto_input(plan.bounds, 2)
        result = plan_auto(inp)
        assert all(x <= max(total) for x in inp.peaks(result.schedule))
        step = simulate(result.schedule, inp.costs).step_time
        fitting = [c for c in result.candidates if c.fixed and c.fits]
        assert any(not c.fits for c in result.candidates if c.fixed)  # the cap binds
        assert bool(fitting) == (v == 1), [c.name for c in fitting]
        for c in fitting:
            assert step <= simulate(c.schedule, inp.costs).step_time + 1e-12, c.name


def test_one_later_reservation_admits_more_of_the_v_under_a_tight_cap() -> None:
    """In the V a microbatch's second chunk runs long after its first: reserving it at
    admission (reserve=True) leaves room for two microbatches per rank under a cap of four
    chunk-microbatches; keeping room for one later chunk only admits a third and runs
    faster (89 against 94) within the same cap, and stays valid. `tight` runs a full B
    where a deferred W would block the next admission: the schedule mixes B with I + W,
    and only under a cap that binds."""
    p, m = 4, 8
    place = v_shape(p, 2 * p)
    costs = Costs.uniform(2 * p, 1.0, 2.0, w=1.0, comm=0.5)
    cap = (4.0,) * p
    steps = {}
    for reserve in (True, False):
        rows = list_schedule(place, m, costs, Policy(cap, split=True, reserve=reserve))
        assert rows is not None
        sched = make_schedule("list", rows, place, m)
        validate(sched)
        assert max(peak_activation(sched)) * 2 * p <= 4.0 + 1e-9  # chunk-microbatches
        steps[reserve] = simulate(sched, costs).step_time
    assert steps == {True: 94.0, False: 89.0}
    ops = {}
    for k in (3.0, 2.0 * m):
        rows = list_schedule(place, m, costs, Policy((k,) * p, split=True, tight=True))
        assert rows is not None
        sched = make_schedule("list", rows, place, m)
        validate(sched)
        assert max(peak_activation(sched)) * 2 * p <= k + 1e-9
        ops[k] = {a.op for r in rows for a in r}
    assert {B, I, W} <= ops[3.0]
    assert B not in ops[2.0 * m]


def test_auto_admits_in_bytes_under_a_byte_cap() -> None:
    """With the exact bytes (ModelCosts.auto_input's `weights`, `static`) the list
    scheduler admits microbatches against each rank's cap less its static bytes, where
    whole-microbatch units admit one: under 1F1B's bytes (two chunks, 256 wide) its V and
    round-robin schedules are faster than the same search's without the byte weights."""
    import dataclasses

    from splitgraph.bench.schedules import onefoneb_bytes
    from splitgraph.config import load_config
    from splitgraph.cost.costs import model_costs
    from splitgraph.partition import make_plan

    extra = ["data.features=256", "partition=params", "model.hidden=[256,256,256,256]"]
    extra += ["costs.times=flops", "pipeline.bandwidth=1GB", "pipeline.latency=2.5e-4"]
    _, total = onefoneb_bytes(2, 4, extra)
    over = ["pipeline.stages=4", "pipeline.microbatches=4", "schedule=auto"]
    over += ["schedule.virtual_stages=2", f"pipeline.memory_cap={max(total)}"]
    work = Workload.of(load_config([*extra, *over]))
    plan = make_plan(work, 2)
    inp = model_costs(work, plan.num_stages).auto_input(plan.bounds, 2)
    assert inp.weights is not None and inp.static is not None
    bytes_, units = plan_auto(inp), plan_auto(dataclasses.replace(inp, weights=None))
    assert max(bytes_.chosen.peak) <= max(total)

    def interleaved(result: Any) -> float:  # the V and round-robin (not chunks back to back)
        fits = [c for c in result.candidates if c.fits and not c.fixed]
        return min(c.step_time for c in fits if "contiguous" not in c.name)

    assert interleaved(bytes_) < interleaved(units) * 0.95


def test_the_trainers_auto_prices_transfers_the_same_on_every_rank(tmp_path: Path) -> None:
    """costs.auto_input_for_run (what every rank builds schedule=auto from) prices a
    transfer with pipeline.bandwidth if set, else the node's cached link measurement, else
    an a-priori default; never at zero, and never by measuring (ranks would race)."""
    from splitgraph.config import load_config
    from splitgraph.cost import profiler
    from splitgraph.cost.costs import A_PRIORI_LINK, auto_input_for_run

    over = ["costs.times=flops", f"costs.cache_dir={tmp_path}", "pipeline.stages=2"]
    over += ["schedule=auto", "model.hidden=[32,32,32]"]

    def first_transfer(*extra: str) -> float:
        work = Workload.of(load_config([*over, *extra]))
        return float(auto_input_for_run(work, 2, [0, 2, 4]).costs.comm[0])

    work = Workload.of(load_config(over))
    message = work.local_batch // int(work.pipeline.microbatches) * 32 * 4  # rows x 32 floats
    assert first_transfer() == pytest.approx(A_PRIORI_LINK.time(message))
    with profiler._Cache(tmp_path).locked() as data:  # as measured_link leaves it
        data[profiler._link_key()] = {"bandwidth": 2e8, "latency": 1e-3}
    assert first_transfer() == pytest.approx(1e-3 + message / 2e8)
    assert first_transfer("pipeline.bandwidth=1MB", "pipeline.latency=0") == pytest.approx(
        message / 1e6
    )


def test_two_chunks_per_rank_are_never_slower_than_one_under_1f1bs_bytes() -> None:
    """schedule.virtual_stages=2 lets auto consider two-chunk schedules *too*: the chunks of
    a rank back to back (stages 2r and 2r+1 on rank r) run one stage per rank's orders with
    the same bytes (the boundary between them is one tensor on one rank). Under 1F1B's bytes,
    where the V and round-robin admit about one microbatch, auto is no slower than 1F1B
    over the one-chunk plan of the same model (whose cuts, here, are every other one of
    the two-chunk plan's: layers 0-1 | 2-4 against 0 | 1 | 2 | 3-4)."""
    from splitgraph.bench.schedules import onefoneb_bytes
    from splitgraph.config import load_config
    from splitgraph.cost.costs import model_costs
    from splitgraph.partition import make_plan

    extra = ["data.features=256", "partition=params", "model.hidden=[256,256,256,256]"]
    extra += ["costs.times=flops", "pipeline.bandwidth=1GB", "pipeline.latency=2.5e-4"]
    _, total = onefoneb_bytes(2, 8, extra)
    steps = {}
    for v in (1, 2):
        over = [f"pipeline.stages={2 * v}", "pipeline.microbatches=8", "schedule=auto"]
        over += [f"schedule.virtual_stages={v}", f"pipeline.memory_cap={max(total)}"]
        work = Workload.of(load_config([*extra, *over]))
        plan = make_plan(work, 2)
        assert plan.bounds == ((0, 2, 5) if v == 1 else (0, 1, 2, 3, 5))
        inp = model_costs(work, plan.num_stages).auto_input(plan.bounds, 2)
        result = plan_auto(inp)
        assert max(result.chosen.peak) <= max(total)
        steps[v] = result.chosen.step_time
        if v == 1:
            assert result.chosen.name == "1f1b"  # zb1 does not fit, nor a list schedule
        else:
            assert result.chosen.schedule.stage_to_rank == (0, 0, 1, 1), result.chosen.name
    assert steps[2] <= steps[1] * (1 + 1e-9)
