"""The chapter's exercises: each answer is checked, and the committed outputs
(results/exercises/*.json, made by results/exercises/run.sh) must match a fresh run wherever the
answer is deterministic (shapes, verdicts, bytes). Timings are measured, never asserted.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from splitgraph.config import Workload, load_config
from splitgraph.data import microbatch_sizes
from splitgraph.exercises import bias, first_batch, hessian, memory, shapes, too_large
from splitgraph.exercises.cli import main
from splitgraph.model import build_mlp
from splitgraph.partition import Plan, make_plan
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.schedule import Schedule, build_schedule
from splitgraph.schedule.simulate import peak_inflight
from tests.workers import TINY, _batch

RESULTS = Path(__file__).resolve().parents[1] / "results" / "exercises"


def _committed(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _as_json(result: Any) -> dict[str, Any]:
    """A fresh result as the committed file holds it (tuples become lists)."""
    return json.loads(json.dumps(result.to_dict()))


def _command(name: str) -> list[str]:
    """The overrides of the committed command (first line of NAME.txt)."""
    words = (RESULTS / f"{name}.txt").read_text().splitlines()[0].split()
    assert words[:2] == ["$", "splitgraph-exercise"], words
    args, out = words[3:], []
    skip = False
    for w in args:
        if skip:
            skip = False
        elif w.startswith("--"):
            skip = True
        else:
            out.append(w.strip("'"))
    return out


# -- exercise 1 -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(1, 1), (3, 5), (5, 3), (4, 1), (1, 7)])
def test_exercise1_gradient_of_a_scalar_function_of_an_n_by_m_matrix_is_n_by_m(
    n: int, m: int
) -> None:
    for row in shapes.closed_forms(n, m):
        assert row.gradient_shape == (n, m), row
        assert row.max_abs_diff is not None and row.max_abs_diff < 1e-12, row


def test_exercise1_matrix_gradient_refuses_a_non_scalar_function() -> None:
    with pytest.raises(ValueError, match="must return a scalar"):
        shapes.matrix_gradient(lambda t: t * 2, torch.ones(2, 3))


def test_exercise1_matches_its_committed_output() -> None:
    fresh = _as_json(shapes.run(load_config(_command("ex1"))))
    committed = _committed("ex1")
    assert fresh["all_match"] and committed["all_match"]
    assert [(r["what"], r["variable_shape"], r["gradient_shape"]) for r in fresh["rows"]] == [
        (r["what"], r["variable_shape"], r["gradient_shape"]) for r in committed["rows"]
    ]


# -- exercise 2 -----------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["model.activation=gelu", "model.task=regression"]])
def test_exercise2_hand_derived_bias_gradients_and_no_decay(extra: list[str]) -> None:
    cfg = load_config([*TINY, "model.bias=true", "optim.weight_decay=0.2", *extra])
    result = bias.run(cfg)
    assert result.hand_equals_autograd
    assert result.biases_not_decayed
    names = [r.name for r in result.rows]
    assert names == [f"layers.{i}.{k}" for i in range(6) for k in ("weight", "bias")]
    for r in result.rows:
        if r.name.endswith("weight"):
            assert r.decay_effect < 1e-12  # dJ/dW(lambda) - dJ/dW(0) = lambda W


def test_exercise2_needs_a_bias_and_a_weight_decay() -> None:
    with pytest.raises(ValueError, match=r"model\.bias=true"):
        bias.run(load_config(TINY))
    with pytest.raises(ValueError, match="weight_decay > 0"):
        bias.run(load_config([*TINY, "model.bias=true", "optim.weight_decay=0"]))
    assert main(["2", *TINY, "model.bias=false"]) == 2


def test_exercise2_matches_its_committed_output() -> None:
    fresh = _as_json(bias.run(load_config(["model.bias=true", *_command("ex2")])))
    committed = _committed("ex2")
    for d in (fresh, committed):
        assert d["hand_equals_autograd"] and d["biases_not_decayed"]
    assert [(r["name"], r["shape"]) for r in fresh["rows"]] == [
        (r["name"], r["shape"]) for r in committed["rows"]
    ]


# -- exercise 3 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.momentum=0"],
        ["optim.momentum=0.9"],
        ["optim=adam"],
        ["optim=adam", "model.bias=true"],
        ["optim=adam", "runtime.dtype=float32", "model.bias=true"],
    ],
)
def test_exercise3_state_formulas_are_exact(extra: list[str]) -> None:
    """Parameters, gradients and optimizer state after a real step equal the formulas."""
    cfg = load_config([*TINY, "runtime.dtype=float64", *extra])
    engine = PipelineEngine(Workload.of(cfg))
    engine.step(*_batch(cfg, engine.dtype))
    params, grads, optim = memory.predict_state(cfg.optim, cfg.runtime.dtype, engine.plan, 0)
    state = engine.optimizer.state
    nbytes = memory.tensor_bytes
    assert nbytes(engine.parameters()) == params
    assert nbytes(p.grad for p in engine.parameters()) == grads
    assert sum(nbytes(state[p].values()) for p in engine.parameters()) == optim


def _hand_saved(cfg: Any, plan: Plan, sched: Schedule, sizes: list[int]) -> list[int]:
    """The default model (relu, no bias, cross-entropy, float32) with even microbatches:
    stage i keeps, per sample, its input and every ReLU output (the last one is also what it
    sends); the last stage keeps its ReLU outputs, the log-probabilities and the int64 label,
    and nll_loss's scalar total_weight per microbatch. Times the microbatches in flight."""
    assert len(set(sizes)) == 1
    out = []
    for s, inflight in enumerate(peak_inflight(sched)):
        layers = [plan.layers[i] for i in plan.stage_range(s)]
        per_sample = 4 * (layers[0].in_features + sum(x.out_features for x in layers[:-1]))
        per_mb = 0
        if s == plan.num_stages - 1:
            per_sample += 4 * layers[-1].out_features + 8
            per_mb = 4
        else:
            per_sample += 4 * layers[-1].out_features
        out.append(inflight * (sizes[0] * per_sample + per_mb))
    return out


@cache
def _memory_fresh() -> memory.MemoryResult:
    return memory.run(_command("ex3"), 2, predict_saved=memory.predict_saved, timeout=180)


def test_the_memory_model_agrees_with_the_hand_count_for_forward_backward_schedules() -> None:
    """An independent check of memory.predict_saved: _hand_saved counts F/B schedules by
    hand (zb1's deferred W has its own rule in memory_model)."""
    cfg = load_config(_command("ex3"))
    plan = make_plan(Workload.of(cfg), 2)
    sizes = microbatch_sizes(int(cfg.train.batch_size), int(cfg.pipeline.microbatches))
    for name in ("naive", "gpipe", "1f1b"):
        m = 1 if name == "naive" else len(sizes)
        s = sizes if m == len(sizes) else microbatch_sizes(int(cfg.train.batch_size), 1)
        sched = build_schedule(name, 2, m)
        predicted = memory.predict_saved(Workload.of(cfg), plan, sched, s)
        assert predicted == _hand_saved(cfg, plan, sched, s)


@pytest.mark.timeout(240)
def test_exercise3_prediction_equals_measurement_and_the_committed_output() -> None:
    fresh = _memory_fresh()
    committed = _committed("ex3")
    assert set(committed["schedules"]) <= set(fresh.schedules)
    for name, s in committed["schedules"].items():
        stages = fresh.schedules[name]["stages"]
        assert s["sizes"] == fresh.schedules[name]["sizes"]
        for st, c in zip(stages, s["stages"]):
            assert (st.params, st.grads, st.optim) == (st.params_pred, st.grads_pred, st.optim_pred)
            assert st.saved == st.saved_pred, (name, st.stage)  # the plugged-in prediction
            assert st.inference_saved == 0
            for key in ("params", "grads", "optim", "saved", "inflight", "inference_saved"):
                assert getattr(st, key) == c[key], (name, st.stage, key)
    # the schedule sets the activations: GPipe keeps all 4 microbatches, 1F1B 2 then 1
    assert [st.inflight for st in fresh.schedules["gpipe"]["stages"]] == [4, 4]
    assert [st.inflight for st in fresh.schedules["1f1b"]["stages"]] == [2, 1]
    text = memory.render(fresh)
    assert "(pred" not in text and "saved 0 bytes on every stage" in text


def test_exercise3_refuses_a_bad_launch_before_spawning() -> None:
    from splitgraph.errors import ConfigError

    with pytest.raises(ConfigError, match="stages"):
        memory.run(["model.hidden=[8]"], 3)


# -- exercise 4 -----------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_exercise4_hvp_equals_finite_differences_and_is_symmetric(act: str) -> None:
    cfg = load_config([*TINY, f"model.activation={act}", "optim.weight_decay=0.1"])
    result = hessian.run(cfg, repeats=1)
    assert result.hvp_vs_finite_difference < 1e-6
    assert result.symmetry < 1e-12
    assert result.hvp_saved > result.gradient_saved > 0


def test_exercise4_weight_decay_adds_lambda_v() -> None:
    """H(J) = H(L) + lambda I: the L2 term shifts every HVP by exactly lambda v."""
    cfg0 = load_config([*TINY, "optim.weight_decay=0"])
    cfg1 = load_config([*TINY, "optim.weight_decay=0.5"])
    model = build_mlp(cfg0, dtype=torch.float64)
    x, y = _batch(cfg0, torch.float64)
    v = hessian.random_direction(model, 3)
    h0 = hessian.hvp(model, x, y, hessian.Objective.of(cfg0.model, cfg0.optim), v)
    h1 = hessian.hvp(model, x, y, hessian.Objective.of(cfg1.model, cfg1.optim), v)
    for (name, _), a, b, vi in zip(model.named_parameters(), h0, h1, v):
        assert torch.allclose(b - a, 0.5 * vi, atol=1e-13), name


@pytest.mark.parametrize("name", ["ex4", "ex4_tanh"])
def test_exercise4_memory_matches_its_committed_output(name: str) -> None:
    cfg = load_config(_command(name))
    model = build_mlp(cfg, dtype=torch.float64)
    x, y = first_batch(cfg.data, Workload.of(cfg), cfg.train.seed, torch.float64)
    committed = _committed(name)
    assert (
        hessian.saved_bytes(model, x, y, hessian.Objective.of(cfg.model, cfg.optim), False)
        == committed["gradient_saved"]
    )
    assert (
        hessian.saved_bytes(model, x, y, hessian.Objective.of(cfg.model, cfg.optim), True)
        == committed["hvp_saved"]
    )
    assert committed["hvp_vs_finite_difference"] < 1e-6


# -- the command ----------------------------------------------------------------------------


def test_cli_prints_writes_json_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ex1.json"
    assert main(["1", *TINY, "--json", str(out)]) == 0
    assert "every gradient has the shape of its variable: yes" in capsys.readouterr().out
    assert json.loads(out.read_text())["all_match"] is True
    assert main(["4", *TINY, "model.hiden=[3]"]) == 2
    assert "hiden" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["6"])
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: splitgraph-exercise ") and "--size {small,tiny}" in text
    assert "useful overrides" in text and "splitgraph-exercise 5 --size tiny" in text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_exercise5_answers_both_regimes_live(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--size tiny`: the variants that decide each regime, two launches. Every verdict below
    comes from this run's rows: the regime from full's accounting, the refusals from the
    memory model, the fits from the runtime."""
    out = tmp_path / "ex5.json"
    assert main(["5", "--size", "tiny", "--out", str(tmp_path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    got = json.loads(out.read_text())
    act, wts = got["regimes"]
    assert (act["experiment"], act["regime"]) == ("too_large", "activations")
    assert (wts["experiment"], wts["regime"]) == ("too_large_weights", "weights")
    a = {r["variant"]: r for r in act["rows"]}
    w = {r["variant"]: r for r in wts["rows"]}
    cap_a, cap_w = int(4.5 * 2**20), 20 * 2**20
    # activations: full is over the cap but its parameter state is not; a smaller batch fits
    assert a["full"]["status"] == "oom" and a["full"]["launched"] is False
    assert a["full"]["predicted_peak_bytes"] > cap_a >= a["full"]["predicted_static_bytes"]
    assert a["small-same"]["status"] == "ok" and a["small-same"]["peak_bytes"] <= cap_a
    assert act["answer"].startswith("**The answer here: shrink the activations on one device.")
    # weights: every one-device option is refused for the parameter state alone; 2 stages fit
    for name in ("full", "small-same", "accumulate"):
        assert w[name]["status"] == "oom" and w[name]["launched"] is False, name
        assert w[name]["predicted_static_bytes"] > cap_w, name
    pipe = w["pipeline-1f1b-p2-m4"]
    assert pipe["status"] == "ok" and pipe["devices"] == 2 and pipe["peak_bytes"] <= cap_w
    assert pipe["memory_mismatches"] == [] and a["small-same"]["memory_mismatches"] == []
    assert wts["answer"].startswith("**The answer here: split the graph.** Parameters, gradients")
    assert "`full`, `small-same`, `accumulate` were refused for that reason" in wts["answer"]
    # the printout: both answers, what it ran, and the committed full-size evidence
    for g in (act, wts):
        assert g["answer"] in text and g["reference"] in text
        assert (tmp_path / g["experiment"] / "report.md").exists()
    assert "Only the activations overflow one device: experiment=too_large" in text
    assert "The parameter state itself overflows one device: experiment=too_large_weights" in text
    assert "In short: Where only the activations overflow" in text
    assert "on one device small (B=256, lr same = 0.1) fit" in got["summary"]
    assert "nothing fits on one device; 1 multi-device variant fit" in got["summary"]


def test_exercise5_sizes_keep_each_experiments_model_batch_and_cap() -> None:
    """The small and tiny versions shrink epochs, samples and the variant grid, never what
    decides the regime."""
    from splitgraph.compare.config import load

    for size, by in too_large.SIZES.items():
        for name, over in by.items():
            full, cut = load([f"experiment={name}"]), load([f"experiment={name}", *over])
            for key in ("model.hidden", "train.batch_size", "compare.memory_cap", "optim.name"):
                a, b = (OmegaConf.select(c, key) for c in (full, cut))
                assert a == b, (size, name, key)
            assert cut.compare.confirm_refusals is False


def test_the_docs_show_the_committed_outputs_verbatim() -> None:
    docs = (RESULTS.parents[1] / "docs" / "exercises.md").read_text()
    for txt in sorted(RESULTS.glob("ex[1-4]*.txt")):
        assert txt.read_text().strip() in docs, f"docs/exercises.md does not show {txt.name}"
    for name in too_large.EXPERIMENTS.values():
        assert f"results/{name}/report.md" in docs
        assert f"splitgraph-compare experiment={name} --out results/{name}" in docs
    assert "splitgraph-exercise 5" in docs
