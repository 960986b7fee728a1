"""Byte sizes as users write them ("12GiB", "64MiB", "1.5e9") and as tables print them."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """`parse_bytes("12GiB") == 12 * 2**30`; plain numbers are bytes. Raises ValueError."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"a byte size cannot be negative: {text}")
        return int(text)
    m = _RE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a byte size: write a number with an optional unit, e.g. 64MiB, "
            "12GiB, 500MB or 1e9"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """`format_bytes(3 * 2**20) == "3.0 MiB"`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
