"""Test-wide settings: profiles and link measurements go to a temporary cache, never ~/.cache."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    old = os.environ.get("SPLITGRAPH_CACHE")
    os.environ["SPLITGRAPH_CACHE"] = str(tmp_path_factory.mktemp("splitgraph-cache"))
    yield
    if old is None:
        os.environ.pop("SPLITGRAPH_CACHE", None)
    else:
        os.environ["SPLITGRAPH_CACHE"] = old
