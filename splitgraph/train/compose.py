"""Hydra composes the config once per process, not twice.

`@hydra.main` composes the whole config twice before the task runs: first (`Hydra.get_mode`)
only to read `hydra.mode`, then again for the run. Composition is the costliest part of Hydra
at start-up (the defaults tree and its YAML files merged into the structured schema: 0.23-0.33
s of CPU per compose on the 2-core reference machine, paid by every rank). `hydra.mode` is
None unless an override or a config file sets it, and splitgraph's own config files never do
(tests/test_startup.py), so while nothing else can set it - no override naming `hydra.mode`
or `hydra.searchpath`, no `--config-dir`, `--config-path` or `--config-name` - the answer is
None without composing, which is what Hydra's own `get_mode` then returns. Otherwise Hydra's
get_mode runs as it is.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

#: overrides that can make hydra.mode non-None: setting it, or adding config files that might
_MODE_KEYS = ("hydra.mode", "hydra.searchpath")
#: flags that bring in another primary config or config directory (Hydra's short forms too)
_CONFIG_FLAGS = ("--config-dir", "--config-path", "--config-name", "-cd", "-cp", "-cn")


def mode_is_unset(overrides: Sequence[str], argv: Sequence[str]) -> bool:
    """True when neither the overrides nor the command line can set `hydra.mode`."""
    if any(key in o for o in overrides for key in _MODE_KEYS):
        return False
    return not any(a.split("=", 1)[0] in _CONFIG_FLAGS for a in argv)


@contextlib.contextmanager
def compose_once() -> Iterator[None]:
    """Within: Hydra's `get_mode` answers None without composing when nothing can set
    `hydra.mode` (see the module's docstring); every other case composes as Hydra does."""
    try:
        from hydra._internal.hydra import Hydra
    except ImportError:  # another Hydra layout: compose twice, as before
        yield
        return
    original = Hydra.get_mode

    def get_mode(self: Any, config_name: str | None, overrides: list[str]) -> Any:
        if mode_is_unset(overrides, sys.argv[1:]):
            return None
        return original(self, config_name, overrides)

    Hydra.get_mode = get_mode  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = original  # type: ignore[method-assign]
