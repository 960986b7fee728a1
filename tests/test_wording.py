"""Messages read as sentences: a refused choice names the value, a guess, then every option."""

from __future__ import annotations

import pytest

from splitgraph.config import load_config, validate
from splitgraph.errors import ConfigError


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
