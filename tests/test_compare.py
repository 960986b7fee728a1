"""The comparison harness: its config rules, the variants' command lines, the runner's verdicts,
the report, and the whole harness end to end on the tiny experiment (every variant as a real
process, OOM, a refused variant, a failing one, and a sweep)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from splitgraph.compare import analysis, conclusion, main, report, runner, variants
from splitgraph.compare.config import load, output_dir, validate_compare
from splitgraph.config import load_config
from splitgraph.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# -- configuration ---------------------------------------------------------------------------


def test_nothing_writes_into_results_unless_told_to() -> None:
    """By default a comparison goes to outputs/compare/<name>[/<overrides>]; only an explicit
    --out (compare.out) names results/."""
    assert output_dir("too_large") == "outputs/compare/too_large"
    assert output_dir("too_large", "data=digits") == "outputs/compare/too_large/data=digits"
    assert output_dir("too_large", "a=1", "results/too_large") == "results/too_large"
    for yaml in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        cfg = load([f"experiment={yaml.stem}"])
        assert not output_dir(cfg.compare.name).startswith("results"), yaml.name
    # --out becomes compare.out (and the sweep dir of a multirun); the report's command says
    # --out again, so regenerating a reference is the command printed in it
    assert main.parse_args(["experiment=x", "--out", "results/x"]) == [
        "experiment=x",
        "compare.out=results/x",
    ]
    assert main.parse_args(["-m", "--out=a b", "k=1,2"]) == [
        "-m",
        "k=1,2",
        "compare.out='a b'",
        "hydra.sweep.dir='a b'",
    ]
    assert main.command_line(["experiment=x", "compare.out='a b'"]) == (
        "splitgraph-compare experiment=x --out 'a b'"
    )
    with pytest.raises(SystemExit):
        main.parse_args(["experiment=x", "--out"])


def test_help_prints_usage_flags_overrides_and_an_example() -> None:
    for flag in ("--help", "-h"):
        res = subprocess.run(
            [sys.executable, "-m", "splitgraph.compare", flag],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        out = res.stdout
        assert out.startswith("usage: splitgraph-compare ") and "--out DIR" in out
        assert "compare.memory_cap=" in out and "experiment=too_large --out results/" in out
        names = sorted(f.stem for f in (REPO / "conf" / "experiment").glob("*.yaml"))
        assert {"tiny", "too_large", "too_large_weights"} <= set(names)
        assert f"experiment=NAME): {', '.join(names)}\n" in out  # read from conf/experiment
        assert "compare:" not in out  # not Hydra's config dump


def test_compare_config_composes_with_the_training_groups() -> None:
    cfg = load(["experiment=tiny", "data=digits", "compare.memory_cap=64MiB"])
    validate_compare(cfg)
    assert cfg.compare.name == "tiny" and cfg.compare.memory_cap == "64MiB"
    assert cfg.data.name.value == "digits" and cfg.model.hidden == [32, 32, 32]
    # the cap follows pipeline.memory_cap unless compare.memory_cap is given
    assert load(["pipeline.memory_cap=1MiB"]).compare.memory_cap == "1MiB"


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["compare.k=3"], ["compare.k=3 does not divide train.batch_size=128", "[2, 4, 8"]),
        (["compare.k=1"], ["compare.k=1 must be >= 2"]),
        (["compare.variants=[full,fast]"], ["fast: not a variant"]),
        (["compare.variants=[full,full]"], ["at most once"]),
        (["compare.small_lr=[half]"], ["compare.small_lr=['half']"]),
        (["compare.schedules=[naive]"], ["['naive'] cannot pipeline"]),
        (["compare.stages=[1]"], ["need p >= 2 stages"]),
        (["compare.microbatches=[500]"], ["1..train.batch_size=128"]),
        (["compare.memory_cap=lots"], ["compare.memory_cap='lots'", "not a byte size"]),
        (["compare.epochs=0", "compare.timeout=-1"], ["compare.epochs=0", "compare.timeout=-1"]),
    ],
)
def test_harness_rules_name_the_value_and_the_fix(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        validate_compare(load(["experiment=tiny", *overrides]))
    for needle in needles:
        assert needle in str(info.value)


# -- variants and their command lines ---------------------------------------------------------


def _build(overrides: list[str]) -> tuple[Any, list[variants.Variant], dict[str, Any]]:
    cfg = load(["experiment=tiny", *overrides])
    base = variants.base_settings(cfg, load_config([]))
    return cfg, variants.build(cfg, num_train=1152), base


def test_variants_are_the_harness_config_plus_their_own_keys() -> None:
    _, vs, base = _build(["compare.small_lr=[same,linear]", "optim.lr=0.08"])
    by = {v.name: v for v in vs}
    assert list(by) == [
        "full",
        "small-same",
        "small-linear",
        "accumulate",
        "recompute",
        "pipeline-gpipe-p2-m4",
        "pipeline-1f1b-p2-m4",
        "reference",
    ]
    # only what differs from splitgraph.train's defaults, and no key that follows another
    assert base["model.hidden"] == [32, 32, 32] and base["data.features"] == 16
    assert base["optim.lr"] == 0.08 and "model.in_features" not in base
    assert "optim.momentum" not in base and "run_dir" not in base
    assert by["small-linear"].batch == 32 and by["small-linear"].settings["optim.lr"] == 0.02
    assert by["small-same"].settings["optim.lr"] == 0.08
    acc = by["accumulate"].settings
    assert (acc["schedule.name"], acc["pipeline.microbatches"], acc["pipeline.stages"]) == (
        "1f1b",
        4,
        1,
    )
    assert by["recompute"].settings["schedule.recompute"] is True
    assert by["pipeline-1f1b-p2-m4"].nproc == 2
    assert by["reference"].settings["pipeline.memory_cap"] is None and not by["reference"].capped
    assert all(v.capped for v in vs if v.kind != "reference")
    # evaluated at equal samples seen: every 4 steps of 128, every 16 of 32
    assert by["full"].settings["train.eval_every"] == 4
    assert by["small-same"].settings["train.eval_every"] == 16


def test_data_parallel_variants_and_a_device_limit() -> None:
    over = [
        "compare.variants=[data,pipeline]",
        "compare.stages=[2,4]",
        "compare.schedules=[1f1b]",
        "compare.microbatches=[2]",
        "compare.dp=[1,2]",
        "compare.max_devices=4",
    ]
    _, vs, _ = _build(over)
    by = {v.name: v for v in vs}
    # p=4 x dp=2 (8 ranks) is over the limit
    assert list(by) == [
        "data-dp2",
        "pipeline-1f1b-p2-m2",
        "pipeline-1f1b-p4-m2",
        "pipeline-1f1b-p2-m2-dp2",
        "reference",
    ]
    data, hybrid = by["data-dp2"], by["pipeline-1f1b-p2-m2-dp2"]
    assert data.nproc == 2 and data.kind == "data"
    assert (data.settings["parallel.dp"], data.settings["pipeline.stages"]) == (2, 1)
    assert hybrid.nproc == 4 and hybrid.settings["parallel.dp"] == 2
    assert hybrid.label == "pipeline 1f1b p=2 m=2 x dp=2"
    assert "parallel.dp" not in by["pipeline-1f1b-p2-m2"].settings  # train's default
    for bad, needle in (
        (["compare.dp=[3]"], "compare.dp=[3]"),  # 3 does not divide B=128
        (["compare.variants=[data]", "compare.data_parallel=1"], "compare.data_parallel=1"),
        (["compare.max_devices=1"], "compare.max_devices=1"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate_compare(load(["experiment=tiny", *bad]))


def test_a_variant_predicted_over_the_cap_is_refused_before_launch(tmp_path: Path) -> None:
    over = [
        "experiment=tiny",
        "compare.variants=[full]",
        "compare.reference=false",
        "compare.confirm_refusals=false",
        "compare.progress=false",
    ]
    out = main.compare(load(over), tmp_path, "c")
    (row,) = out["rows"]
    assert (row["status"], row["launched"], row["fits"]) == ("oom", False, False)
    assert row["accounted_source"] == "predicted, not launched"
    assert not (tmp_path / "runs" / "full" / "output.log").exists()  # nothing was started
    assert "out of memory before launch (predicted by the harness): rank 0 needs" in row["error"]
    assert "The saved activations push it over" in row["error"]  # the runtime's own hint
    assert row["peak_bytes"] == row["predicted_peak_bytes"] > 50 * 1024
    assert "; refused before launch" in report._status(row)
    # rebuilt from the record, it is the same verdict
    again = main.compare(load([*over, "compare.report_only=true"]), tmp_path, "c")["rows"][0]
    assert (again["status"], again["launched"], again["peak_bytes"]) == (
        "oom",
        False,
        row["peak_bytes"],
    )


def test_no_reference_without_a_cap_and_a_time_budget_variant() -> None:
    _, vs, _ = _build(["compare.memory_cap=null"])
    assert "reference" not in [v.name for v in vs]
    t = variants.for_time_budget(vs[0], 2.5, 50)
    assert t.name == "full@2.5s" and t.phase == "time"
    assert t.settings["train.time_budget"] == 2.5 and t.settings["train.epochs"] == 50


def test_command_lines_read_back_as_the_same_values() -> None:
    settings = {
        "a.none": None,
        "a.flag": True,
        "a.int": 3,
        "a.float": 1e-08,
        "a.list": [32, 32],
        "a.word": "1f1b",
        "a.size": "64MiB",
        "a.numeric_text": "1000",
        "a.path": "/tmp/x y/run's dir",
        "a.keyword_text": "null",
    }
    parsed = OverridesParser.create().parse_overrides(variants.overrides(settings))
    back = {o.key_or_group: o.value() for o in parsed}
    for key, value in settings.items():
        assert back[key] == value, (key, back[key])
    _, vs, base = _build([])
    cmd = variants.command(vs[-2], base, "/tmp/run")  # a pipeline variant
    text = variants.printable(cmd)
    assert text.startswith("torchrun --standalone --nproc-per-node=2 -m splitgraph.train ")
    assert "run_dir=/tmp/run" in text
    assert variants.printable(variants.command(vs[0], base, "r")).startswith("python -m ")


def test_a_refused_variant_is_reported_unlaunched_and_all_refused_stops_the_harness(
    tmp_path: Path,
) -> None:
    _, vs, base = _build([])
    bad = replace(vs[0], settings=vs[0].settings | {"schedule.virtual_stages": 3})
    (res,) = main.run_all([bad], base, tmp_path, 10, 1152, progress=False)
    assert res.outcome.status == "failed" and not (tmp_path / bad.name / "output.log").exists()
    assert json.loads((tmp_path / bad.name / "outcome.json").read_text())["status"] == "failed"
    assert "refused before launch" in (res.outcome.error or "")
    assert "virtual_stages=3" in (res.outcome.error or "")
    assert res.outcome.command.startswith("python -m splitgraph.train ")
    with pytest.raises(ConfigError, match=r"train\.log_every=0"):
        main.compare(load(["experiment=tiny", "train.log_every=0"]), tmp_path / "out", "x")


def test_report_only_reads_recorded_runs_and_full_within_the_cap_is_its_own_reference(
    tmp_path: Path,
) -> None:
    over = ["experiment=tiny", "compare.variants=[full]", f"compare.runs_dir={tmp_path}"]
    acc = {"rank": 0, "params": 1, "grads": 1, "optimizer": 1, "saved_peak": 1, "total": 4}
    run = tmp_path / "full"
    run.mkdir()
    summary = {
        "status": "ok",
        "steps": 18,
        "steps_per_epoch": 9,
        "step_time_median_s": 0.01,
        "train_time_s": 0.2,
        "final": {"test": {"loss": 2.0, "accuracy": 0.2}},
        "memory_per_rank": [{"rank": 0, "accounted": acc}],
        "comm_per_rank": [],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "L": 2.3, "samples": 128, "elapsed": 0.1, "test_loss": 2.0}) + "\n"
    )
    runner.save_outcome(run, runner.Outcome("ok", returncode=0, wall_s=3.0, command="python x"))
    out = main.compare(load([*over, "compare.report_only=true"]), tmp_path / "r", "c")
    assert [r["variant"] for r in out["rows"]] == ["full"]  # no uncapped twin was run
    assert out["rows"][0]["wall_s"] == 3.0 and out["rows"][0]["fits"] is True
    assert not (tmp_path / "reference").exists()


# -- the runner's verdicts ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_runner_reports_a_crash_with_its_error_and_kills_on_timeout(tmp_path: Path) -> None:
    crash = [sys.executable, "-c", "print('working'); raise ValueError('bad thing 42')"]
    out = runner.run(crash, tmp_path / "crash", timeout=20)
    assert out.status == "failed" and out.returncode == 1
    assert out.error == "ValueError: bad thing 42"
    ours = "import sys; print('splitgraph (rank 1): the reason'); sys.exit(2)"
    out = runner.run([sys.executable, "-c", ours], tmp_path / "ours", timeout=20)
    assert out.error == "splitgraph (rank 1): the reason"
    t0 = time.monotonic()
    out = runner.run(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow", timeout=1
    )
    assert out.status == "failed" and "timed out after 1 s" in (out.error or "")
    assert time.monotonic() - t0 < 15


def test_runner_reads_ok_oom_and_gpu_oom_records(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "summary.json").write_text(json.dumps({"status": "ok"}))
    (ok / "metrics.jsonl").write_text('{"step": 0, "L": 1.0}\n{"step": 1, "L"')  # cut short
    res = runner.read(ok, 0)
    assert res.status == "ok" and res.metrics == [{"step": 0, "L": 1.0}]
    assert runner.read(ok, 1).status == "failed"  # a summary but a non-zero exit

    gpu = tmp_path / "gpu"  # the rank that ran out wrote its record; rank 0 was killed
    gpu.mkdir()
    rec = {"status": "oom", "needed_bytes": 123, "message": "out of memory at step 0"}
    (gpu / "oom_rank1.json").write_text(json.dumps(rec))
    res = runner.read(gpu, 1)
    assert (res.status, res.needed_bytes, res.error) == ("oom", 123, "out of memory at step 0")


# -- analysis, conclusion and report on made-up numbers -----------------------------------------


def _row(name: str, kind: str, devices: int = 1, **kw: Any) -> dict[str, Any]:
    base = {
        "variant": name,
        "label": name,
        "kind": kind,
        "phase": "epochs",
        "devices": devices,
        "batch": 128,
        "schedule": "naive",
        "microbatches": 1,
        "lr": 0.1,
        "status": "ok",
        "error": None,
        "capped": kind != "reference",
        "cap_bytes": 100,
        "peak_bytes": 80,
        "fits": True,
        "peak_bytes_per_rank": [80],
        "peak_rss_bytes": 10**8,
        "steps": 20,
        "epochs": 2.0,
        "train_time_s": 4.0,
        "wall_s": 9.0,
        "step_time_median_s": 0.2,
        "samples_per_s": 640.0,
        "device_seconds_per_epoch": 2.0 * devices,
        "comm_bytes_per_step": 0,
        "comm_messages_per_step": 0,
        "final_train_loss": 0.5,
        "final_train_accuracy": 0.8,
        "final_test_loss": 0.6,
        "final_test_accuracy": 0.75,
        "test_samples": 400.0,
        "command": f"python -m splitgraph.train {name}",
        "_num_train": 1280,
        "accounted_per_rank": [
            {"rank": 0, "params": 10, "grads": 10, "optimizer": 10, "saved_peak": 50, "total": 80}
        ],
        "_points": [
            {"samples": 640, "elapsed": 2.0, "test_loss": 1.0, "test_accuracy": 0.5},
            {"samples": 1280, "elapsed": 4.0, "test_loss": 0.6, "test_accuracy": 0.75},
        ],
        "_steps": [(i, 2.0 - i * 0.05) for i in range(20)],
    }
    base.update(kw)
    return base


def test_derived_figures_and_a_conclusion_computed_from_them(tmp_path: Path) -> None:
    fast_pts = [
        {"samples": 640, "elapsed": 0.5, "test_loss": 0.55, "test_accuracy": 0.7},
        {"samples": 1280, "elapsed": 1.0, "test_loss": 0.5, "test_accuracy": 0.8},
    ]
    rows = [
        _row(
            "full",
            "full",
            status="oom",
            peak_bytes=150,
            fits=False,
            accounted_per_rank=[
                {
                    "rank": 0,
                    "params": 10,
                    "grads": 10,
                    "optimizer": 10,
                    "saved_peak": 120,
                    "total": 150,
                }
            ],
            step_time_median_s=None,
            final_test_accuracy=None,
            final_test_loss=None,
            _points=[],
        ),
        _row(
            "small",
            "small",
            _points=fast_pts,
            final_test_accuracy=0.8,
            final_test_loss=0.5,
            _steps=[(i, 1.0) for i in range(80)],
            batch=32,
        ),
        _row(
            "accumulate",
            "accumulate",
            _steps=[(i, 2.0 - i * 0.05 + (1e-7 if i < 12 else 1e-3)) for i in range(20)],
        ),
        _row(
            "pipe",
            "pipeline",
            devices=2,
            microbatches=4,
            step_time_median_s=0.25,
            comm_bytes_per_step=4096,
            peak_bytes=60,
        ),
        _row(
            "recompute",
            "recompute",
            status="failed",
            error="configuration refused: no\nmore",
            fits=None,
            peak_bytes=None,
            accounted_per_rank=[],
        ),
        _row("reference", "reference", peak_bytes=150, fits=False),
    ]
    target = analysis.derive(rows, {r["variant"]: tmp_path for r in rows}, None)
    # the worst final held-out loss among the contenders that ran: every one reaches it
    assert target == 0.6
    by = {r["variant"]: r for r in rows}
    assert by["small"]["time_to_target_s"] == 0.5 and by["small"]["epochs_to_target"] == 0.5
    assert by["pipe"]["device_seconds_to_target"] == 8.0
    assert by["accumulate"]["loss_early_diff"] == pytest.approx(1e-7)
    assert by["accumulate"]["loss_same_until"] == 12
    assert by["small"]["test_loss_gap"] == pytest.approx(0.45)
    assert by["full"]["time_to_target_s"] is None

    text = conclusion.conclude(rows, 100, target, 4)
    joined = "\n".join(text)
    assert (
        "needs 150 B by the accounting; the cap is 100 B per device, so it does not fit" in joined
    )
    assert "state take 30 B, within the cap; the 120 B of saved activations put it over" in joined
    assert "here accumulate, small fit on one device." in joined
    big = [{"rank": 0, "params": 40, "grads": 40, "optimizer": 40, "saved_peak": 30, "total": 150}]
    heavy = {**rows[0], "accounted_per_rank": big}
    alone = "\n".join(conclusion.conclude([heavy, rows[3]], 100, target, 4))
    assert "alone take 120 B: no batch size fits it on one device" in alone
    assert "**The answer here: split the graph.**" in alone and "take 120 B on one" in alone
    assert "`full` was refused for that reason" in alone
    slow = [
        {**r, "time_to_target_s": 9.0} if r["variant"] in ("small", "accumulate") else r
        for r in rows
    ]
    assert conclusion.answer(slow, 100, target).startswith(
        "**The answer here: either fits; splitting the graph reached the target first.**"
    )
    none = conclusion.conclude([heavy], 100, target, 4)[0]
    assert none.startswith("**The answer here: nothing fits, not even split as tried.**")
    # the activations regime: one-device options fit, and the answer says so with the bytes
    assert text[0].startswith("**The answer here: shrink the activations on one device.**")
    assert "(30 B of the 100 B cap) but not the whole minibatch's 120 B" in text[0]
    assert "First to the held-out loss 0.6000: small (0.50 s)" in text[0]
    assert "the best on several devices, pipe, took 8.00x as long" in text[0]
    assert "Split over 2 devices, 1 variant fit (largest device 60 B)." in text[0]
    assert "**Fastest to the target** (held-out loss 0.6000): small, 0.50 s" in joined
    assert "small 0.50 x 1.00 s, accumulate 1.00 x 4.00 s" in joined
    assert "needs 2.00x fewer epochs and runs them 4.00x faster" in joined
    assert "**Cheapest to the target** in device-seconds" in joined
    assert "recompute: configuration refused: no" in joined  # the first line of its error
    assert "steps 0.80x as fast as reference" in joined and "1.60x" in joined
    assert "From step 12 the gap exceeds 1e-4" in joined
    assert "Timing noise" not in joined  # no two variants do the same arithmetic here
    # 0.80 vs 0.75 on 400 held-out samples: standard error 0.02, so a lead of 0.05 is real
    assert "lead over the next (0.0500) is beyond the held-out set's sampling noise" in joined
    assert "(standard error 0.0200 over 400 samples" in joined
    twin = _row("small2", "small", batch=32, step_time_median_s=0.3)
    noise = conclusion.conclude([*rows, twin], 100, target, 4)[-1]
    assert "small and small2 do identical arithmetic" in noise and "(1.50x)" in noise

    meta = {
        "name": "made-up",
        "command": "splitgraph-compare experiment=x",
        "cap_bytes": 100,
        "target_loss": target,
        "target_source": "test",
        "epochs": 2,
        "time_budget": None,
        "batch": 128,
        "k": 4,
        "model": "MLP",
        "data": "synthetic",
        "optim": "sgd",
        "dtype": "float32",
        "machine": "test",
        "noise": "",
        "notes": ["a note"],
        "overrides": [],
    }
    path = report.write(tmp_path / "out", rows, meta, text)
    md = path.read_text()
    assert "**OOM**, needed 150 B" in md and "**failed**" in md
    assert "splitgraph-compare experiment=x" in md and "## Conclusion" in md
    for name in report.FIGURES:
        png = tmp_path / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name}.png)" in md
    with open(tmp_path / "out" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [r["variant"] for r in rows]
    assert table[4]["error"] == "configuration refused: no | more"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][1]["points"][1]["test_loss"] == 0.5
    # a target nobody reaches is said so, not silently dropped
    analysis.derive(rows, {r["variant"]: tmp_path for r in rows}, 0.1)
    missed = conclusion.conclude(rows, 100, 0.1, 4)
    assert any("**Nobody reached the target** held-out loss 0.1000" in x for x in missed)


# -- end to end ------------------------------------------------------------------------------


def _compare(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # no timeline.png in the variants' runs: the harness reads their summaries, not pictures
    cmd = [sys.executable, "-m", "splitgraph.compare", *args, "compare.progress=false"]
    cmd.append("trace.picture=false")
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_experiment_end_to_end(tmp_path: Path) -> None:
    res = _compare("experiment=tiny", f"hydra.run.dir={tmp_path}", timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    by = {r["variant"]: r for r in data["rows"]}
    assert list(by) == [
        "full",
        "small-same",
        "accumulate",
        "recompute",
        "pipeline-gpipe-p2-m4",
        "pipeline-1f1b-p2-m4",
        "reference",
        # the wall-clock budget is off in experiment=tiny
    ]
    cap = 50 * 1024
    # full is stopped by the cap, needing what the uncapped reference measured
    assert by["full"]["status"] == "oom" and by["full"]["peak_bytes"] > cap
    assert by["full"]["peak_bytes"] == by["reference"]["peak_bytes"]
    # GPipe holds all 4 microbatches on stage 0 and runs out; 1F1B holds 2 and fits
    assert by["pipeline-gpipe-p2-m4"]["status"] == "oom"
    assert by["pipeline-gpipe-p2-m4"]["peak_bytes"] > cap
    for name in ("small-same", "accumulate", "pipeline-1f1b-p2-m4"):
        assert by[name]["status"] == "ok" and by[name]["fits"] is True, name
        assert by[name]["peak_bytes"] <= cap and by[name]["final_test_accuracy"] is not None
    assert by["reference"]["fits"] is False  # ran without the cap, and says so
    # accumulate on one rank holds one microbatch of B/k: a quarter of full's activations (to
    # a few bytes: the per-microbatch scalars of the loss are saved too)
    saved = {n: by[n]["accounted_per_rank"][0]["saved_peak"] for n in ("accumulate", "reference")}
    assert saved["accumulate"] == pytest.approx(saved["reference"] / 4, abs=16)
    # the same mathematics as full (float32 rounding over 18 steps) ...
    for name in ("accumulate", "pipeline-1f1b-p2-m4"):
        assert by[name]["loss_early_diff"] < 1e-5 and by[name]["weights_rel_diff"] < 1e-4
    # ... while the small minibatch follows another path
    assert by["small-same"]["weights_rel_diff"] > 1e-2
    pipe = by["pipeline-1f1b-p2-m4"]
    assert pipe["devices"] == 2 and pipe["comm_bytes_per_step"] == 2 * 128 * 32 * 4
    assert pipe["device_seconds_per_epoch"] > 0 and pipe["time_to_target_s"] is not None
    # the harness's prediction before launch is what the runtime accounted, on every rank:
    # measured after the first step, or the runtime's own check of full and GPipe before it
    for name, r in by.items():
        assert r["memory_mismatches"] == [], name
        assert r["predicted_peak_bytes"] == r["peak_bytes"], name
    assert by["full"]["accounted_source"] == "runtime, before the first step"
    assert by["accumulate"]["accounted_source"] == "runtime, measured"
    # one stage recomputing its forward in the backward rebuilds the whole graph: full's peak
    assert by["recompute"]["status"] == "oom"
    assert by["recompute"]["peak_bytes"] == by["full"]["peak_bytes"]
    md = (tmp_path / "report.md").read_text()
    assert "splitgraph-compare experiment=tiny" in md and "**OOM**, needed" in md
    assert "torchrun --standalone --nproc-per-node=2" in md
    for name in report.FIGURES:
        assert (tmp_path / f"{name}.png").exists()
    with open(tmp_path / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == len(by)

    # The report rebuilt from the recorded runs, running nothing, says the same.
    again = _compare(
        "experiment=tiny", "compare.report_only=true", f"hydra.run.dir={tmp_path}", timeout=120
    )
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = json.loads((tmp_path / "results.json").read_text())["rows"]
    keys = ("variant", "status", "peak_bytes", "final_test_loss", "weights_rel_diff", "command")
    assert [[r[k] for k in keys] for r in rebuilt] == [[r[k] for k in keys] for r in data["rows"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sweep_collects_every_point_and_a_failing_variant_does_not_stop_it(
    tmp_path: Path,
) -> None:
    res = _compare(
        "-m",
        "experiment=tiny",
        "compare.variants=[full]",
        "compare.memory_cap=null",
        "debug.fail_at_step=null,1",
        f"hydra.sweep.dir={tmp_path}",
        timeout=280,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["job"], r["variant"], r["status"]) for r in table] == [
        ("0", "full", "ok"),
        ("1", "full", "failed"),
    ]
    assert "debug.fail_at_step=1" in table[1]["overrides"]
    assert "injected failure (debug.fail_at_step) on rank 0" in table[1]["error"]
    assert "| 1 | `" in (tmp_path / "sweep.md").read_text()
    assert "injected failure" in (tmp_path / "1" / "report.md").read_text()


def test_output_paths_are_written_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from splitgraph.compare.main import _from_cwd

    monkeypatch.chdir(tmp_path)
    assert _from_cwd(tmp_path / "results" / "too_large") == Path("results/too_large")
    elsewhere = Path("/nonexistent/outside")
    assert _from_cwd(elsewhere) == elsewhere
