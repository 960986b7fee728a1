"""Launch a real training run and read its summary: what the benchmarks measure is exactly
what users run. One rank: plain python; several: `splitgraph-train --nproc N` (the fork
launcher `launch/train.sh` runs), or torchrun where a caller asks for it (the compare
harness, whose reports print torchrun lines; the test that holds the two launchers equal)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RunFailed(RuntimeError):
    def __init__(self, command: list[str], code: int, tail: str) -> None:
        self.command, self.code, self.tail = command, code, tail
        super().__init__(f"exit {code}: {' '.join(command)}\n{tail}")


def train_command(nproc: int, overrides: Sequence[str], launcher: str = "fork") -> list[str]:
    """`launcher`: "fork" (ranks forked from one process that imported torch once: a launch
    starts ~2x faster, so a benchmark's many short launches measure training, not start-up)
    or "torchrun"."""
    if nproc == 1:
        return [sys.executable, "-m", "splitgraph.train", *overrides]
    if launcher == "fork":
        return [sys.executable, "-m", "splitgraph.train", "--nproc", str(nproc), *overrides]
    if launcher != "torchrun":
        raise ValueError(f"launcher must be 'fork' or 'torchrun', not {launcher!r}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "splitgraph.train",
        *overrides,
    ]


def run_training(
    nproc: int,
    overrides: Sequence[str],
    run_dir: Path,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train with `overrides` into `run_dir` and return its summary.json (raises RunFailed)."""
    cmd = train_command(nproc, [*overrides, f"run_dir={run_dir}", "train.progress=false"])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("SPLITGRAPH_RUN_DIR", None)
    res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RunFailed(cmd, res.returncode, (res.stdout + res.stderr)[-4000:])
    return json.loads((run_dir / "summary.json").read_text())


def machine() -> str:
    """One line: what the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
