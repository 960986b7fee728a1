"""A run directory belongs to one job: a lock file that rank 0 holds for the run's life.

    <run dir>/splitgraph.lock   {"pid", "host", "boot_id", "start_ticks", "job", "attempt",
                                 "started_at", "command", "token"}

Two jobs writing one run directory destroy each other's checkpoints, model.pt and
summary.json, and interleave metrics.jsonl; a job that resumes from a checkpoint another is
writing fails or hangs. So before reading any checkpoint, rank 0 creates the lock file with
`O_CREAT | O_EXCL`, which is atomic on local file systems and on NFS v3 and later (unlike
`flock`/`fcntl` locks, which some shared file systems do not share between nodes, or drop
without a word), and writes the holder's identity into it. A second job finds the file and
decides whether its holder still runs:

* same host: alive if its pid exists with the same start time (a recycled pid has another)
  since the same boot;
* the same job (`TORCHELASTIC_RUN_ID`, torchrun's rendezvous id: a `--max-restarts` restart
  keeps it, and launch/slurm.sbatch sets it to the SLURM job id, which a requeue keeps) on
  another host: over, since torchrun restarts only once every worker has exited;
* anyone else on another host cannot be checked from here: the lock is assumed held.

A live holder means a one-line `RunDirError` naming it (and how to remove a lock whose job
is gone); a dead one's lock is taken over with a warning. The lock is released when the run
ends, by an error or a signal stop too; a SIGKILLed holder leaves it, which the rules above
recognise. Other ranks only refuse when they can prove a different live job holds it (same
host, both under torchrun), so the common case fails on every rank at once and a multi-node
job never refuses on a guess.

From the command line, `RunDirCheck` (a Hydra callback, conf/config.yaml) takes the lock
before Hydra writes `.hydra/` and `train.log` into the directory (a refused job must not
overwrite the running one's record) and refuses a `run_dir` that is a file; `train.run` takes
the same lock again (re-entrant), so library callers are covered too. Each launch that takes
the lock writes a `==== launch ... ====` line naming itself into the run's log: `train.log`
is the run's history across its restarts and resumes, one section per launch, rather than
one file per launch (a resume continues the same run, as metrics.jsonl does).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from splitgraph.errors import RunDirError

log = logging.getLogger("splitgraph")

LOCK_NAME = "splitgraph.lock"
#: a lock file that stays empty or unreadable this long was left by a crash mid-write
_UNREADABLE_GRACE_S = 5.0


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a run directory."""

    pid: int
    host: str
    boot_id: str | None
    start_ticks: int | None  # the process's start time since boot (/proc/<pid>/stat)
    job: str | None  # torchrun's rendezvous id
    attempt: int  # torchrun's restart count
    started_at: str
    command: str
    token: str  # this acquisition's own id: only its owner releases the file

    @staticmethod
    def current() -> Holder:
        pid = os.getpid()
        return Holder(
            pid=pid,
            host=socket.gethostname(),
            boot_id=_boot_id(),
            start_ticks=_start_ticks(pid),
            job=job_id(),
            attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            started_at=time.strftime("%Y-%m-%d %H:%M:%S"),
            command=" ".join(getattr(sys, "orig_argv", sys.argv))[:500],
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        job = f"torchrun job {self.job}, attempt {self.attempt}" if self.job else "not torchrun"
        return f"pid {self.pid} on host {self.host} since {self.started_at} ({job}): {self.command}"


def job_id() -> str | None:
    """The launch's identity shared by its ranks and kept across torchrun restarts."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory, created; a path that is a file (or under one) is a RunDirError."""
    path = Path(run_dir)
    problem = _file_in_the_way(path)
    if problem:
        raise RunDirError(problem)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run_dir={str(path)!r} cannot be created: {e.strerror}.") from e
    return path


def _file_in_the_way(path: Path) -> str | None:
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is under {p}, which is a file"
            return (
                f"run_dir={str(path)!r} {what}, not a directory: choose another run_dir (or "
                "SPLITGRAPH_RUN_DIR), or move the file away."
            )
    return None


class RunLock:
    """The lock this process holds on a run directory (re-entrant: the Hydra callback takes
    it before Hydra writes into the directory, `train.run` takes it again)."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path, self.holder = path, holder
        self.count = 1
        self.took_over: str | None = None  # whose stale lock this replaced, to be logged

    def release(self) -> None:
        """Drop one hold; the last one removes the lock file if it is still this one's."""
        self.count -= 1
        if self.count > 0:
            return
        _HELD.pop(_key(self.path.parent), None)
        found = _read(self.path)
        # only the process that created the file removes it: a child forked while it was
        # held (splitgraph-train --nproc's ranks) holds the parent's lock, not its own
        mine = self.holder.pid == os.getpid()
        if found is not None and found.token == self.holder.token and mine:
            with suppress(FileNotFoundError):
                self.path.unlink()


#: the locks this process holds, by resolved run directory
_HELD: dict[str, RunLock] = {}


def _key(run_dir: str | Path) -> str:
    return str(Path(run_dir).resolve())


def release_all() -> None:
    """Release every lock this process holds (at exit, or before stopping at once)."""
    for lock in list(_HELD.values()):
        lock.count = 1
        lock.release()


atexit.register(release_all)


def acquire(run_dir: str | Path) -> RunLock:
    """Take `run_dir` for this job (rank 0), or raise RunDirError naming its live holder. A
    stale lock taken over is noted in `took_over`, which `hold` logs."""
    held = _HELD.get(_key(run_dir))
    if held is not None:
        held.count += 1
        return held
    path = check_run_dir(run_dir) / LOCK_NAME
    me = Holder.current()
    took_over = None
    for _ in range(10):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(me)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            lock = _HELD[_key(run_dir)] = RunLock(path, me)
            lock.took_over = took_over
            return lock
        text = _text(path)
        if text is None:  # released meanwhile
            continue
        holder = _parse(text)
        if holder is None:
            if _age(path) < _UNREADABLE_GRACE_S:  # being written by its creator right now
                time.sleep(0.2)
                continue
            reason = "an unreadable lock file left by a crash"
        else:
            alive, reason = _judge(holder, me)
            if alive:
                raise RunDirError(
                    f"run dir {path.parent} is in use by another job: {holder.describe()}. "
                    f"Wait for it, use another run_dir, or, if that job is gone, delete {path}."
                )
        if _break(path, text):
            who = holder.describe() if holder is not None else "?"
            took_over = f"run dir {path.parent}: taking over the lock of {who} ({reason})"
    raise RunDirError(f"run dir {path.parent}: could not take {path} (other jobs keep taking it).")


def check_not_taken(run_dir: str | Path) -> None:
    """Ranks other than 0: refuse early when a different live job on this host holds the run
    directory (provable only when both are torchrun jobs); otherwise rank 0 decides."""
    path = Path(run_dir) / LOCK_NAME
    text = _text(path)
    holder = _parse(text) if text else None
    me = Holder.current()
    if holder is None or not holder.job or not me.job or holder.job == me.job:
        return
    if holder.host == me.host and _judge(holder, me)[0]:
        raise RunDirError(
            f"run dir {path.parent} is in use by another job: {holder.describe()}. "
            f"Wait for it, use another run_dir, or, if that job is gone, delete {path}."
        )


@contextmanager
def hold(run_dir: str | Path, rank: int) -> Iterator[RunLock | None]:
    """Rank 0 holds the run directory for the block; other ranks check it is not another
    job's. Rank 0 also marks the start of this launch in the run's log."""
    if rank != 0:
        check_not_taken(run_dir)
        yield None
        return
    lock = acquire(run_dir)
    if lock.took_over:  # logged here: from the Hydra callback, logging was not set up yet
        log.warning("%s", lock.took_over)
        lock.took_over = None
    h = lock.holder
    log.info(
        "==== launch in %s: pid %d on %s, %s (%s) ====",
        Path(run_dir),
        h.pid,
        h.host,
        f"torchrun job {h.job} attempt {h.attempt}" if h.job else "not under torchrun",
        h.command,
    )
    try:
        yield lock
    finally:
        lock.release()


def _judge(holder: Holder, me: Holder) -> tuple[bool, str]:
    """(whether `holder` may still run, why)."""
    if holder.host == me.host:
        if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
            return False, "its host rebooted since"
        if holder.pid == me.pid and holder.token != me.token:
            return False, "left by this process"
        if not _pid_alive(holder.pid):
            return False, f"pid {holder.pid} has exited"
        ticks = _start_ticks(holder.pid)
        if holder.start_ticks is not None and ticks is not None and ticks != holder.start_ticks:
            return False, f"pid {holder.pid} now belongs to another process"
        return True, "alive"
    if holder.job and holder.job == me.job:
        return False, f"an earlier attempt ({holder.attempt}) of this torchrun job"
    return True, "on another host: cannot be checked"


def _break(path: Path, seen: str) -> bool:
    """Remove the lock whose content was `seen`, and only that one: renamed aside first, and
    put back if a newer lock was moved by mistake (another job broke the stale one first)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_text() != seen:
            with suppress(OSError):
                os.link(aside, path)
            return False
        return True
    finally:
        aside.unlink(missing_ok=True)


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def _read(path: Path) -> Holder | None:
    text = _text(path)
    return _parse(text) if text else None


def _parse(text: str) -> Holder | None:
    """The holder a lock file names (fields added by later versions ignored), or None."""
    try:
        raw = json.loads(text)
        known = {f: raw.get(f) for f in Holder.__dataclass_fields__}
        known["pid"], known["host"] = int(raw["pid"]), str(raw["host"])
        known["attempt"] = int(known["attempt"] or 0)
        for key in ("started_at", "command", "token"):
            known[key] = str(known[key] or "?")
        return Holder(**known)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


class RunDirCheck(Callback):
    """Hydra callback: before Hydra writes anything into the run directory (`.hydra/`,
    `train.log`), refuse a `run_dir` that is a file, and on rank 0 take the run's lock (so a
    second job does not overwrite the first one's `.hydra/` record); one line and exit code 2
    when either fails. `train.run` then holds the same lock (re-entrant)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        run_dir = Path(str(OmegaConf.select(config, "run_dir")))
        rank = int(os.environ.get("RANK", "0") or 0)
        try:
            problem = _file_in_the_way(run_dir)
            if problem:
                raise RunDirError(problem)
            if rank == 0:
                self.lock = acquire(run_dir)
            else:
                check_not_taken(run_dir)
        except RunDirError as e:
            print(f"splitgraph (rank {rank}): {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
