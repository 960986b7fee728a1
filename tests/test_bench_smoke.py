"""The benchmarks that no other test drives, run small enough to keep them from rotting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY = ["model.hidden=[16,16]", "data.samples=256", "train.batch_size=32"]


@pytest.mark.timeout(120)
def test_reliability_bench_prints_the_guard_and_checkpoint_costs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from splitgraph.bench.reliability import main

    main(["--repeats", "1", "--steps", "2", "--microbatches", "2", "--", *TINY])
    out = capsys.readouterr().out
    assert "nan_check=step" in out and "checkpoint (" in out and "save" in out
    assert "verify before loading" in out


@pytest.mark.timeout(120)
def test_scale_projection_writes_its_table(tmp_path: Path) -> None:
    from splitgraph.bench.scale import main

    out = tmp_path / "projection"
    assert main(["project", "--gpus", "8,16", "--schedules", "1f1b", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    text = out.with_suffix(".md").read_text()
    assert "8" in text and "16" in text and data


@pytest.mark.timeout(180)
def test_startup_bench_times_a_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitgraph.bench.startup import main

    out = tmp_path / "startup.json"
    assert main(["--repeats", "1", "--nproc", "1", "--json", str(out), *TINY]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert 0 < run["first_step_s"] <= run["exit_s"] and run["cpu_s"] > 0
    assert 0 < run["cpu_first_step_s"] <= run["cpu_s"]  # torch's import alone is > 0
    assert "| python -m splitgraph.train |" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_split_bench_times_f_i_w_against_f_b(capsys: pytest.CaptureFixture[str]) -> None:
    import math

    from splitgraph.bench.split import main, measure

    times = measure(TINY, (0, 2), 8, repeats=3, warmup=1, meter=True)
    split = {"F_split", "I", "W", "F_autograd", "I_autograd", "W_autograd"}
    assert set(times) == {"F", "B", *split}
    assert all(math.isfinite(v) and v > 0 for v in times.values()), times
    assert main(["--rows", "8", "--repeats", "2", "--warmup", "1", "--meter", *TINY]) == 0
    out = capsys.readouterr().out
    assert "rows     8:" in out and "(I+W)/B" in out and "layers [0, 1)" in out
    assert "by hand:" in out and "autograd:" in out and "saved bytes counted" in out
