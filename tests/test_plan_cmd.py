"""`splitgraph-plan`: the table, plan.json, the picture of the partitioned graph, the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitgraph.config import Workload, load_config
from splitgraph.observe.draw import layout
from splitgraph.partition import make_plan
from splitgraph.planner.cli import main

UNBALANCED = [
    "model.hidden=[4096,256,256,256,2048]",
    "costs.times=flops",
    "pipeline.bandwidth=1GB",
    "pipeline.latency=5e-5",
]


def test_plan_writes_json_and_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    over = [*UNBALANCED, "partition=optimal", "pipeline.memory_cap=64MiB"]
    assert main(["--nproc", "3", *over, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "plan: optimal, 6 layers on 3 stages; schedule 1f1b" in out
    assert "predicted step" in out and "bubble" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["plan"]["bounds"] == [0, 1, 2, 6] and plan["fits"] is True
    stages = plan["stages"]
    assert [s["layers"] for s in stages] == [[0, 0], [1, 1], [2, 5]]
    for s in stages:
        assert s["memory_bytes"] == s["static_bytes"] + s["saved_peak_bytes"] <= 64 * 2**20
        assert 0 < s["share_of_step"] <= 1 and s["forward_s"] > 0
    assert stages[0]["sends_bytes_per_microbatch"] == 64 * 4096 * 4
    assert stages[-1]["sends_bytes_per_microbatch"] is None
    assert plan["step_time_s"] > 0 and 0 < plan["bubble"] < 1
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_picture_with_biases(tmp_path: Path) -> None:
    assert main(["--nproc", "2", *UNBALANCED, "model.bias=true", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    plan = make_plan(Workload.of(load_config(["model.bias=true", "model.hidden=[8,8]"])), 2)
    g = layout(plan)
    assert {"b0", "b1", "b2"} <= set(g.nodes) and ("b2", "mm2") in g.edges
    assert g.nodes["b2"].stage == 1 and g.nodes["W0"].stage == 0
    assert set(g.cut_x) == {1}  # one cut, before layer 2's product
    assert g.nodes["h1"].x < g.cut_x[1] < g.nodes["mm2"].x
    assert {"s0", "s1", "s", "J", "L", "y"} <= set(g.nodes) and g.nodes["J"].stage is None
    no_bias = layout(make_plan(Workload.of(load_config(["model.hidden=[8,8]"])), 2))
    assert not any(name.startswith("b") for name in no_bias.nodes)


def test_search_ranks_candidates_under_the_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    over = [*UNBALANCED, "pipeline.memory_cap=16MiB", "search=true", "--top", "4"]
    assert main(["--nproc", "3", *over, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "search:" in out and "why:" in out and "fastest that fits" in out
    found = json.loads((tmp_path / "plan.json").read_text())["search"]
    fitting = [c for c in found if c["fits"]]
    assert found[0]["fits"] and fitting and not all(c["fits"] for c in found)
    times = [c["step_time_s"] for c in fitting]
    assert times == sorted(times)
    assert {c["schedule"] for c in found} == {"naive", "gpipe", "1f1b", "zb1"}
    assert {c["recompute"] for c in found} == {True, False}
    assert any("=" in "=".join(c["strategies"]) for c in found)  # agreeing strategies merged
    assert any("optimal" in c["strategies"] for c in fitting)
    best_optimal = min(c["step_time_s"] for c in fitting if "optimal" in c["strategies"])
    setting = ("schedule", "microbatches", "recompute")
    same_setting = [c for c in fitting if all(c[k] == found[0][k] for k in setting)]
    assert best_optimal <= min(c["step_time_s"] for c in same_setting)


def test_bad_requests_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "--nproc N" in capsys.readouterr().err
    assert main(["--nproc", "9"]) == 2
    assert "only 4 layers" in capsys.readouterr().err
    assert main(["--nproc", "3", *UNBALANCED, "partition=optimal", "pipeline.memory_cap=1MiB"]) == 2
    assert "smallest cap that fits" in capsys.readouterr().err


def test_interleaved_plans_ranks_times_virtual_stages(tmp_path: Path) -> None:
    """Interleaved on 2 ranks: 4 stages, two per rank (the cost model once had 2 and failed)."""
    over = [*UNBALANCED, "schedule=interleaved", "schedule.virtual_stages=2"]
    assert main(["--nproc", "2", *over, "pipeline.microbatches=4", "--out", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["plan"]["bounds"]) == 5
    assert [s["rank"] for s in plan["stages"]] == [0, 1, 0, 1]
    assert plan["step_time_s"] > 0


def test_interleaved_is_simulated_on_its_ranks_not_one_rank_per_stage() -> None:
    """The cost model's schedule for 4 interleaved stages is the runtime's: 2 ranks of 2
    stages. Priced as 4 ranks (one stage each), the step came out shorter than 2 ranks can
    run it."""
    from splitgraph.cost.costs import model_costs
    from splitgraph.planner.predict import predict
    from splitgraph.schedule import build_schedule, simulate

    over = [*UNBALANCED, "schedule=interleaved", "schedule.virtual_stages=2"]
    work = Workload.of(load_config([*over, "pipeline.microbatches=4"]))
    costs = model_costs(work, 4)
    sched = costs.schedule()
    assert (sched.num_ranks, sched.num_stages) == (2, 4)
    plan = make_plan(work, 2, costs)
    got = predict(plan, costs).step_time
    four_ranks = simulate(build_schedule("interleaved", 4, 4), costs.sim_costs(plan.bounds))
    assert got > four_ranks.step_time * 1.05
