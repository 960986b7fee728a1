"""Every console command answers --help and -h with a usage line, its own flags, the common
overrides and an example, exit 0 (they used to die in Hydra's override lexer, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from splitgraph.planner.cli import main as plan_main
from splitgraph.schedule.cli import main as schedule_main
from splitgraph.train.cli import check_main

COMMANDS: dict[str, tuple[Callable[[list[str]], int], list[str]]] = {
    "splitgraph-check": (check_main, ["--nproc"]),
    "splitgraph-plan": (plan_main, ["--nproc", "--out", "--search", "--top"]),
    "splitgraph-schedule": (schedule_main, ["--costs", "--from-run", "--dp"]),
}


def _page(capsys: pytest.CaptureFixture[str], fn: Callable[[], object]) -> str:
    with pytest.raises(SystemExit) as e:
        fn()
    out, err = capsys.readouterr()
    assert e.value.code in (0, None), err
    return out


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help(name: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    fn, flags = COMMANDS[name]
    page = _page(capsys, lambda: fn([flag]))
    assert page.startswith(f"usage: {name} ")
    for f in flags:
        assert f in page
    assert "common overrides" in page and "pipeline.microbatches=" in page
    assert f"example:\n  {name} " in page


def test_help_wins_over_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    """--help anywhere: the page, and nothing composed, checked or written."""
    page = _page(capsys, lambda: plan_main(["model.hidden=[8]", "--help", "--nproc", "2"]))
    assert page.startswith("usage: splitgraph-plan")


def test_flags_and_overrides_intermix() -> None:
    assert check_main(["schedule=gpipe", "--nproc", "2", "pipeline.microbatches=8"]) == 0
    assert check_main(["schedule=gpipe", "--nproc", "2", "pipeline.microbatches=300"]) == 2


def test_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        check_main(["--nproc", "two"])
    assert e.value.code == 2
    assert "--nproc: invalid int value: 'two'" in capsys.readouterr().err


def test_train_help(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """Hydra's app help with splitgraph's template: usage with torchrun, flags, the config
    groups Hydra lists, the common overrides, an example (-h here, --help below)."""
    from splitgraph.train import run as train

    monkeypatch.setattr(sys, "argv", ["splitgraph-train", "-h"])
    page = _page(capsys, train.main)
    assert page.startswith("usage: splitgraph-train --nproc N [key=value ...]")
    assert "splitgraph-train [key=value ...]" in page and "  --nproc N " in page
    assert "torchrun --standalone --nproc-per-node N -m splitgraph.train" in page
    assert "--cfg job" in page and "--hydra-help" in page
    # from Hydra: the schedule group as conf/schedule holds it (V, auto and csv included)
    names = sorted(f.stem for f in (Path(__file__).parents[1] / "conf" / "schedule").glob("*.yaml"))
    assert {"1f1b", "gpipe", "interleaved", "zb1"} <= set(names)
    assert f"schedule: {', '.join(names)}\n" in page
    assert "common overrides" in page
    from splitgraph.schedule import SCHEDULES  # the overrides name every registered schedule

    assert f"schedule={'|'.join(SCHEDULES)}\n" in page and "zbv" in SCHEDULES
    assert "example:\n  splitgraph-train --nproc 2 schedule=zb1" in page


def test_python_m_train_help() -> None:
    """The `python -m splitgraph.train` form (docs/configuration.md), in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "splitgraph.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: splitgraph-train --nproc N")
    assert "torchrun" in proc.stdout and "config groups" in proc.stdout
