"""Messages read as sentences: a refused choice names the value, a guess, then every option."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from splitgraph.config import load_config, validate
from splitgraph.errors import ConfigError
from splitgraph.train import run as train


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("schedule.name=xyz", "schedule.name='xyz' is not a schedule. Choose one of: "),
        (
            "schedule.name=1f1c",
            "schedule.name='1f1c' is not a schedule (did you mean '1f1b'?). Choose one of: ",
        ),
        ("partition.strategy=qqq", "partition.strategy='qqq' is not a strategy. Choose one of: "),
    ],
)
def test_refused_choice_is_punctuated(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(load_config([override]), 2)
    text = str(info.value)
    assert expected in text
    assert text.rstrip().endswith(".")


@pytest.mark.timeout(120)
def test_done_line_counts_the_steps_that_ran(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With train.time_budget the run stops early: the log says how many steps ran, not how
    many were planned, and why it stopped."""
    over = [
        "model.hidden=[16,16]",
        "data.features=8",
        "data.samples=256",
        "train.batch_size=32",
        "train.steps=1000",
        "train.time_budget=1e-6",  # spent by the first step
        "train.progress=false",
        "trace.enabled=false",
        "costs.report=false",
        "checkpoint.every=null",
        "checkpoint.save=false",
        f"run_dir={tmp_path}",
    ]
    with caplog.at_level(logging.INFO, logger="splitgraph"):
        summary = train.run(load_config(over))
    assert summary is not None and summary["steps"] == 1 and summary["stopped_by"] == "time_budget"
    (done,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done: ")]
    assert done.startswith(
        "done: 1 step, stopped by train.time_budget=1e-06s before the planned 1000"
    )
