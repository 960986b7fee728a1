"""Run one variant as its own process (torchrun for pipelines), with a deadline, and read back
what it wrote: status, summary.json, metrics.jsonl, and the error text if it failed.

A variant ends in one of three states:
    ok      exit 0 and summary.json with status "ok"
    oom     stopped by the memory cap: summary.json (CPU accounting) or oom_rank<r>.json (GPU)
            with the bytes it needed; or, not launched, refused by the harness's prediction
            (`launched` false; compare.confirm_refusals=false)
    failed  anything else (refused config, crash, timeout), with the error text
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Outcome:
    status: str  # ok | oom | failed
    error: str | None = None
    needed_bytes: int | None = None
    returncode: int | None = None
    wall_s: float = 0.0  # the whole process, start-up included
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    command: str = ""
    launched: bool = True
    #: the memory per global rank the harness predicted before launch (compare/predict.py)
    predicted: list[dict[str, Any]] | None = None


def child_env() -> dict[str, str]:
    """One thread per process (ranks share the cores) and no pinned run dir from outside."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    env.pop("SPLITGRAPH_RUN_DIR", None)
    return env


def clear(run_dir: Path) -> None:
    """An empty run dir: stale files must not pass for this run's."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def run(
    cmd: list[str], run_dir: Path, timeout: float, on_progress: Any = None, poll: float = 0.25
) -> Outcome:
    """Start `cmd`, wait at most `timeout` seconds (then kill its whole process group), and
    read the run dir. `on_progress(steps_done)` is called while it runs."""
    clear(run_dir)
    log_path = run_dir / "output.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True
        )
        timed_out = False
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    _kill_group(proc)
                    break
                if on_progress is not None:
                    on_progress(_count_lines(run_dir / "metrics.jsonl"))
                time.sleep(poll)
        except BaseException:  # Ctrl-C or SIGTERM on the harness: take the variant down too
            _kill_group(proc)
            raise
    wall = time.monotonic() - t0
    out = read(run_dir, proc.returncode)
    out.wall_s = wall
    if timed_out:
        out.status, out.error = "failed", f"timed out after {timeout:g} s (compare.timeout)"
    if on_progress is not None:
        on_progress(len(out.metrics))
    return out


_SAVED = (
    "status",
    "error",
    "needed_bytes",
    "returncode",
    "wall_s",
    "command",
    "launched",
    "predicted",
)


def save_outcome(run_dir: Path, out: Outcome) -> None:
    """The verdict beside the run's own files, so the report can be rebuilt without rerunning."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {k: getattr(out, k) for k in _SAVED}
    (run_dir / "outcome.json").write_text(json.dumps(record, indent=1) + "\n")


def load_outcome(run_dir: Path) -> Outcome:
    """A recorded run, read back: the saved verdict plus its summary and metrics."""
    record = _load_json(run_dir / "outcome.json")
    if record is None:
        return Outcome("failed", error=f"no recorded run in {run_dir}: run it first")
    out = read(run_dir, record.get("returncode"))
    for k in _SAVED:
        setattr(out, k, record.get(k, True if k == "launched" else None))
    if not out.launched:  # refused before launch: its record is the prediction
        out.summary = {"status": "oom", "accounted_per_rank": out.predicted or []}
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def read(run_dir: Path, returncode: int | None) -> Outcome:
    """Classify a finished run from what it left in `run_dir`."""
    summary = _load_json(run_dir / "summary.json")
    metrics = _load_metrics(run_dir / "metrics.jsonl")
    ooms = [_load_json(p) for p in sorted(run_dir.glob("oom_rank*.json"))]
    status = (summary or {}).get("status")
    if status == "oom" or (ooms and status != "ok"):
        records = [r for r in [summary, *ooms] if r and r.get("status") == "oom"]
        worst = max(records, key=lambda r: r.get("needed_bytes") or 0)
        return Outcome(
            "oom",
            error=worst.get("message"),
            needed_bytes=worst.get("needed_bytes"),
            returncode=returncode,
            summary=summary or worst,
            metrics=metrics,
        )
    if returncode == 0 and status == "ok":
        return Outcome("ok", returncode=returncode, summary=summary or {}, metrics=metrics)
    return Outcome(
        "failed",
        error=error_text(run_dir / "output.log", returncode),
        returncode=returncode,
        summary=summary or {},
        metrics=metrics,
    )


def error_text(log_path: Path, returncode: int | None, tail: int = 12) -> str:
    """The lines that say what went wrong: splitgraph's own message if there is one, else the
    exception line, else the end of the output."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    ours = [ln for ln in lines if ln.startswith("splitgraph (rank")]
    if ours:
        first = ours[0]
        rest = lines[lines.index(first) + 1 :]
        detail = [ln for ln in rest[:20] if ln.startswith("  ")]  # ConfigError's list
        return "\n".join([first, *detail])
    exc = [ln for ln in lines if _is_exception_line(ln)]
    if exc:
        return exc[-1]
    text = "\n".join(lines[-tail:])
    return f"exit status {returncode}" + (f":\n{text}" if text else "")


_EXCEPTION = re.compile(r"^(?:[a-z_]\w*\.)*[A-Z]\w*: \S")


def _is_exception_line(line: str) -> bool:
    """A traceback's last line: `ValueError: ...`, `splitgraph.x.InjectedFault: ...`."""
    return bool(_EXCEPTION.match(line))


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _load_metrics(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill
    return out
