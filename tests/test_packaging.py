"""The wheel: every config group ships, setuptools has nothing to warn about, and Hydra finds
pkg://splitgraph.conf in an installed copy that is not this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("setuptools", minversion="77")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("wheel")
    # a clean copy of the sources: an in-tree build would reuse a stale build/ directory
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "conf", src / "conf", ignore=skip)
    shutil.copytree(ROOT / "splitgraph", src / "splitgraph", symlinks=True, ignore=skip)
    # -v: pip shows the backend's warnings; no isolation: this venv's setuptools, no network
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps"]
        + ["--no-cache-dir", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("splitgraph-*.whl")
    return whl, proc.stdout + proc.stderr


def test_wheel_builds_without_package_warnings(wheel: tuple[Path, str]) -> None:
    _, log = wheel
    assert "would be ignored" not in log, [
        line for line in log.splitlines() if "splitgraph.conf" in line
    ][:10]


def test_wheel_holds_every_config_file(wheel: tuple[Path, str]) -> None:
    whl, _ = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    want = {
        f"splitgraph/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert len(want) > 10
    assert want - names == set()


def test_installed_wheel_composes_its_config(wheel: tuple[Path, str], tmp_path: Path) -> None:
    whl, _ = wheel
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        + [str(whl)],
        check=True,
        timeout=120,
    )
    code = (
        "import splitgraph, sys\n"
        "from splitgraph.config import load_config\n"
        "assert splitgraph.__file__.startswith(sys.argv[1]), splitgraph.__file__\n"
        "cfg = load_config(['data=digits', 'schedule=zb1', 'optim=adam', 'partition=params'])\n"
        "print(cfg.data.name.value, cfg.schedule.name, cfg.optim.name.value)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        cwd=tmp_path,  # not the checkout: only the installed copy is importable as splitgraph
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["digits", "zb1", "adam"]
