"""Time to the first step: how long a launch takes before it trains, and to finish a 1-step run.

    python -m splitgraph.bench.startup                     # 5 repeats, 1 process and torchrun 2
    python -m splitgraph.bench.startup --repeats 9 --nproc 2 4
    python -m splitgraph.bench.startup --tree /path/to/other/checkout   # A/B, alternating
    python -m splitgraph.bench.startup --nproc 2 --train-sh   # also through launch/train.sh
    python -m splitgraph.bench.startup --nproc 2 --no-fork    # without the fork launcher's row

Each launch is `python -m splitgraph.train train.steps=1 ...` (one process), `torchrun
--standalone --nproc-per-node N -m splitgraph.train train.steps=1 ...` and, for each N > 1,
`python -m splitgraph.train --nproc N ...` ("fork xN": the check, then N ranks forked from the
launcher, train/fork.py; a tree without it has no such row), from a fresh interpreter, into a
fresh run dir; with `--train-sh`, also `launch/train.sh N ...` for each N > 1 (`make demo`'s
path: the fork launcher, or in older trees the check and torchrun). "first step" is when the first
line of metrics.jsonl appears (rank 0 writes it when every rank has finished step 0; polled
every 5 ms), "exit" when the launch returns; "CPU" is the user + system seconds of every
process of the launch (torchrun and its ranks), which load inflates far less than wall time,
and "CPU to the first step" the part of it the launch's processes (with the children they
reaped: train.sh's check) had spent when that first line appeared.
With `--tree`, each repeat runs every tree in turn (the current checkout first), so trees
share the machine's load; `-m splitgraph.train` runs from the tree's own directory, so it
imports that tree's code (the tree needs no install of its own: this interpreter's packages
serve; launch/train.sh gets this interpreter as PYTHON). Prints medians (and min/max)
per tree and launch, and `uptime`'s load before and after: numbers under load are not an idle
machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: One step, and nothing a first launch on a clean machine would not also do.
BASE = ["train.steps=1", "train.progress=false", "checkpoint.resume=never"]


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) spent so far by process `root` and its descendants, the
    children they have reaped included (Linux /proc; NaN where there is none)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return float("nan")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[pid] = int(fields[1])  # then utime, stime, cutime, cstime: fields 14-17
        ticks[pid] = sum(int(x) for x in fields[11:15])
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(ticks.get(p, 0) for p in tree) / tick


def launch(
    tree: Path,
    nproc: int,
    run_dir: Path,
    overrides: list[str],
    train_sh: bool = False,
    fork: bool = False,
) -> tuple[float, float, float, float]:
    """(seconds to the first metrics line, seconds to exit, CPU seconds of every process of
    the launch, of them those spent before the first metrics line) of one launch from `tree`
    (`train_sh`: through its launch/train.sh; `fork`: splitgraph-train --nproc N)."""
    args = [*BASE, f"run_dir={run_dir}", *overrides]
    if train_sh:
        cmd = ["bash", str(tree / "launch" / "train.sh"), str(nproc), *args]
    elif fork:
        cmd = [sys.executable, "-m", "splitgraph.train", "--nproc", str(nproc), *args]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "splitgraph.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(nproc), "-m", "splitgraph.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    env["PYTHON"] = sys.executable  # launch/train.sh's interpreter
    env.pop("SPLITGRAPH_RUN_DIR", None)
    metrics = run_dir / "metrics.jsonl"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first, cpu_first = None, float("nan")
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.read_text().count("\n") >= 1:
            first = time.perf_counter() - t0
            cpu_first = _tree_cpu(proc.pid)
        time.sleep(0.005)
    total = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    if first is None:  # written in the last poll interval
        first, cpu_first = total, cpu
    return first, total, cpu, cpu_first


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m splitgraph.bench.startup",
        description=__doc__.split("\n")[0],
        epilog="example: python -m splitgraph.bench.startup --repeats 7 --nproc 2",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="launches: 1 = no torchrun")
    p.add_argument(
        "--tree", type=Path, action="append", default=[], help="another checkout to compare"
    )
    p.add_argument(
        "--train-sh",
        action="store_true",
        help="also launch each N > 1 through launch/train.sh (check, then torchrun)",
    )
    p.add_argument(
        "--no-fork",
        action="store_true",
        help="leave out the fork launcher's rows (splitgraph-train --nproc N, N > 1)",
    )
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="added to every launch")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_intermixed_args(argv)
    trees = [ROOT, *[t.resolve() for t in ns.tree]]
    launches = [(n, "") for n in ns.nproc]
    launches += [(n, "fork") for n in ns.nproc if not ns.no_fork and n > 1]
    launches += [(n, "sh") for n in ns.nproc if ns.train_sh and n > 1]
    rows: dict[tuple[str, str, int], list[tuple[float, float, float, float]]] = {}
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="splitgraph-startup-") as tmp:
        for r in range(ns.repeats):
            for nproc, way in launches:
                how = _launch_text(nproc, way)
                for i, tree in enumerate(trees):
                    if way == "fork" and not (tree / "splitgraph" / "train" / "fork.py").exists():
                        continue  # a tree from before the fork launcher
                    run_dir = Path(tmp) / f"r{r}-n{nproc}-{way or 'py'}-t{i}"
                    got = launch(tree, nproc, run_dir, ns.overrides, way == "sh", way == "fork")
                    rows.setdefault((_tree_label(tree), how, nproc), []).append(got)
                    print(
                        f"repeat {r + 1}/{ns.repeats}  {tree}  {how}: first step "
                        f"{got[0]:.2f} s (CPU {got[3]:.2f} s), exit {got[1]:.2f} s, CPU "
                        f"{got[2]:.2f} s  "
                        f"(load {_load()})",
                        file=sys.stderr,
                    )
    load_after = _load()
    print(f"time to the first step, {ns.repeats} launches each (seconds: median [min-max])")
    print(f"load average before {load_before}, after {load_after}; {os.cpu_count()} CPUs\n")
    print("| tree | launch | first step | CPU to the first step | exit | CPU (all processes) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (tree, how, _), xs in rows.items():
        cells = " | ".join(_stat([x[i] for x in xs]) for i in (0, 3, 1, 2))
        print(f"| {tree} | {how} | {cells} |")
    if ns.json:
        _write_json(ns.json, rows, load_before, load_after, ns.overrides)
    return 0


def _write_json(
    path: Path,
    rows: dict[tuple[str, str, int], list[tuple[float, float, float, float]]],
    load_before: str,
    load_after: str,
    overrides: list[str],
) -> None:
    """Every measurement, as the table's rows were made from them."""
    path.write_text(
        json.dumps(
            {
                "load_before": load_before,
                "load_after": load_after,
                "overrides": [*BASE, *overrides],
                "runs": [
                    {
                        "tree": t,
                        "launch": how,
                        "nproc": n,
                        "first_step_s": a,
                        "exit_s": b,
                        "cpu_s": c,
                        "cpu_first_step_s": d,
                    }
                    for (t, how, n), xs in rows.items()
                    for a, b, c, d in xs
                ],
            },
            indent=2,
        )
        + "\n"
    )


def _tree_label(tree: Path) -> str:
    """How a tree is named in the table and the json: not its path on this machine, but
    "this checkout" or the commit checked out there."""
    if tree == ROOT:
        return "this checkout"
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return tree.name
    return f"commit {commit}"


def _launch_text(nproc: int, way: str) -> str:
    if way == "sh":
        return f"launch/train.sh {nproc}"
    if way == "fork":
        return f"fork x{nproc}"
    return "python -m splitgraph.train" if nproc == 1 else f"torchrun x{nproc}"


def _stat(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


if __name__ == "__main__":
    sys.exit(main())
