"""Configuration through Hydra's compose API: schema errors, and validate's cross-field rules."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from splitgraph.config import load_config, validate
from splitgraph.errors import ConfigError


def test_defaults_compose_and_validate() -> None:
    cfg = load_config()
    validate(cfg, 1)
    validate(cfg, 4)
    assert cfg.schedule.name == "1f1b" and cfg.partition.strategy == "uniform"
    assert cfg.model.in_features == cfg.data.features


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("pipeline.microbatch=4", "microbatch"),  # typo
        ("train.batch_size=abc", "batch_size"),  # wrong type
        ("model.activation=relux", "activation"),  # not an enum value
        ("runtime.dtype=float16", "dtype"),
    ],
)
def test_schema_errors_come_from_hydra(override: str, needle: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        load_config([override])
    assert needle in str(info.value) + str(info.value.__cause__)


def test_unknown_group_option_lists_the_choices() -> None:
    with pytest.raises(MissingConfigException) as info:
        load_config(["schedule=foo"])
    assert "1f1b" in str(info.value) and "gpipe" in str(info.value)


def problems(overrides: list[str], world_size: int) -> str:
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides), world_size)
    return str(info.value)


@pytest.mark.parametrize(
    ("overrides", "world", "needles"),
    [
        (["pipeline.microbatches=300"], 2, ["pipeline.microbatches=300", "train.batch_size=256"]),
        (["pipeline.microbatches=0"], 2, ["pipeline.microbatches=0"]),
        (["pipeline.stages=3"], 2, ["pipeline.stages=3", "world size is 2", "--nproc-per-node 3"]),
        ([], 5, ["5 stages", "only 4 layers"]),
        (["schedule=naive", "pipeline.microbatches=8"], 2, ["schedule=naive", "microbatches=8"]),
        (["schedule.name=1f1c"], 2, ["'1f1c'", "did you mean '1f1b'"]),
        (["partition.strategy=param"], 2, ["'param'", "did you mean 'params'"]),
        (["partition=manual"], 2, ["partition.boundaries", "e.g. partition.boundaries=[2]"]),
        (["partition=manual", "partition.boundaries=[3,1]"], 3, ["[3, 1]", "increasing"]),
        (["partition=manual", "partition.boundaries=[1]"], 3, ["1 entries", "need 2"]),
        (["partition.boundaries=[1]"], 2, ["only read by partition=manual"]),
        (["train.epochs=2"], 1, ["exactly one of train.steps=200 and train.epochs=2"]),
        (["train.batch_size=9000"], 1, ["train.batch_size=9000", "7373 training samples"]),
        (["optim.lr=0"], 1, ["optim.lr=0"]),
        (["optim.momentum=1.5"], 1, ["optim.momentum=1.5"]),
        (["optim.weight_decay=-1"], 1, ["optim.weight_decay=-1"]),
        (["runtime.backend=nccl", "runtime.device=cpu"], 2, ["runtime.backend=nccl"]),
        (["runtime.backend=gloo", "runtime.device=cuda"], 2, ["cannot send CUDA tensors"]),
        (["runtime.timeout=0"], 1, ["runtime.timeout=0"]),
        (["data=file"], 1, ["data.path"]),
        (["data=digits", "data.features=10"], 1, ["data=digits has 64 features"]),
        (["model.hidden=[4,0]"], 1, ["widths < 1"]),
        (["pipeline.memory_cap=12Gb_"], 1, ["pipeline.memory_cap='12Gb_'", "e.g. 64MiB"]),
        (["debug.fail_at_step=1", "debug.fail_rank=3"], 2, ["debug.fail_rank=3"]),
    ],
)
def test_validate_names_the_values(overrides: list[str], world: int, needles: list[str]) -> None:
    text = problems(overrides, world)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"


def test_validate_reports_every_problem_at_once() -> None:
    text = problems(["pipeline.microbatches=999", "optim.lr=-1", "schedule.name=x"], 2)
    assert text.count("\n  - ") == 3
