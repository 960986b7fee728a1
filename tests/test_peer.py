"""The peer benchmark cannot rot: both systems run, do equal work, and the table says so."""

from __future__ import annotations

import pytest

from splitgraph.bench.peer import Case, Spec, load_note, main, run, table
from splitgraph.bench.torchpp import peer_problem
from splitgraph.config import Workload, load_config

#: 4 layers (2 ranks x 2 chunks fit), biases, batch 12 in equal microbatches.
TINY = [
    "model.hidden=[6,7,5]",
    "model.bias=true",
    "data.features=6",
    "data.outputs=3",
    "data.samples=96",
    "data.test_fraction=0",
    "train.batch_size=12",
]


@pytest.mark.timeout(90)
def test_both_systems_run_one_step_each_with_equal_gradients_and_memory() -> None:
    cases = [
        Case("gpipe", 2),
        Case("1f1b", 2),
        Case("interleaved", 2),
        Case("1f1b", 1),
        Case("zbv", 3),
    ]
    rows = run(2, Spec(TINY, cases, rounds=1, steps=1), timeout=75)
    assert [(r["schedule"], r["m"]) for r in rows] == [
        ("gpipe", 2),
        ("1f1b", 2),
        ("interleaved", 2),
        ("1f1b", 1),
        ("zbv", 3),
    ]
    for r in [*rows[:3], rows[4]]:
        err = r["grad_error"]
        assert err["splitgraph_vs_reference"] < 1e-12, r
        assert err["peer_vs_reference"] < 1e-12, r
        assert err["splitgraph_vs_peer"] < 1e-12, r
        saved = r["saved_bytes_per_rank"]
        assert min(saved["peer"]) > 0, r
        if r["schedule"] == "zbv":  # the peer's I retains the whole graph until its W; ours
            # keeps only what W reads (each linear's input and dz): never more, here less
            assert all(a <= b for a, b in zip(saved["splitgraph"], saved["peer"])), r
            assert saved["splitgraph"] != saved["peer"], r
        else:
            assert saved["splitgraph"] == saved["peer"], r
        for name in ("splitgraph", "splitgraph_tracking", "peer"):
            assert r[name]["steps"] == 1 and r[name]["step_ms"] > 0
        assert r["ratio"] == pytest.approx(r["splitgraph"]["step_ms"] / r["peer"]["step_ms"])
    # one activation and one gradient message per microbatch per boundary
    assert rows[0]["splitgraph_p2p_per_step"]["messages"] == 2 * 2
    assert rows[2]["splitgraph_p2p_per_step"]["messages"] == 2 * 2 * 3
    assert rows[3]["undefined"] == {"peer": "Schedule1F1B needs microbatches >= stages (1 < 2)"}
    text = table(rows, cores=2)
    assert "| 2 | 1f1b | 1 | not compared: peer: Schedule1F1B needs" in text
    assert text.count("**") == 2 * 4  # a bold ratio per compared row
    assert load_note(rows).startswith("Load average (1 min) over the timed rounds")


def test_each_system_says_where_it_is_undefined() -> None:
    cfg = Workload.of(load_config(TINY))
    # interleaved runs any m now (torch's rounds, evened out): m=3 on 2 ranks is defined on
    # both sides (it used to be splitgraph's "sends microbatches in rounds of p")
    assert Case("interleaved", 3).problems(2, cfg) == {}
    assert Case("interleaved", 2).problems(4, cfg) == {
        "both": "8 stages need as many layers (have 4)"
    }
    assert Case("gpipe", 1).problems(2, cfg) == {}
    assert peer_problem("gpipe", 2, 5, 12) == "the batch (12) must split into 5 equal microbatches"
    assert peer_problem("interleaved", 4, 6, 12) is None  # one round of 6
    assert peer_problem("interleaved", 2, 5, 10) == (
        "ScheduleInterleaved1F1B needs m (5) to be a multiple of m // p (2)"
    )


def test_the_command_refuses_a_schedule_without_a_peer(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--schedules", "zb1"])  # the peer's ZB-H1 is not in torch 2.13
    assert "--schedules: ['zb1'] have no peer" in capsys.readouterr().err
