"""Every process group a rank waits on is bounded by runtime.timeout, set through torch's
public `new_group(timeout=...)`; where it cannot be known or verified, one warning says so."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest

from splitgraph.runtime import comm


@pytest.mark.timeout(420)
def test_every_group_a_rank_waits_on_gets_runtime_timeout(fault_launches: dict[str, Any]) -> None:
    """4 ranks as 2 replicas x 2 stages with runtime.timeout=77. Before: the mesh's groups
    (the gradient all-reduce's) and the channel groups built on them had torch's default of
    30 min; the channel groups read it through a private API that could silently fail."""
    per_rank = fault_launches["timeouts"]
    assert len(per_rank) == 4
    for found in per_rank:
        # + the two channels a 2-stage schedule uses: activations up, gradients down
        channels = {"channel (0, 1, 'act')", "channel (1, 0, 'grad')"}
        assert set(found) == {"dp", "pp", "step sum"} | channels, found
        assert set(found.values()) == {77.0}, found


def test_an_unknown_timeout_is_said_once_with_what_it_means(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(comm, "group_timeout", lambda group: None)
    monkeypatch.setattr(comm, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="splitgraph"):
        assert comm.resolve_timeout(None) is None
        assert comm.resolve_timeout(None) is None
        assert comm.resolve_timeout(timedelta(seconds=5)) == timedelta(seconds=5)  # explicit
    assert caplog.text.count("the process group's timeout cannot be read") == 1
    assert "torch's default timeout (30 min on gloo, 10 on NCCL)" in caplog.text


def test_a_group_with_another_timeout_than_asked_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(comm, "group_timeout", lambda group: timedelta(minutes=30))
    monkeypatch.setattr(comm, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="splitgraph"):
        comm.check_timeout(object(), timedelta(seconds=60), "channel")
        comm.check_timeout(object(), timedelta(seconds=60), "channel")
        comm.check_timeout(object(), timedelta(minutes=30), "pipeline")  # as asked: silent
    assert caplog.text.count("channel process groups have a timeout of 1800 s, not the 60 s") == 1
    assert "pipeline" not in caplog.text
