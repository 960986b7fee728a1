"""Run a function on N fresh processes joined by a process group, with a hard deadline.

For tests, benchmarks and notebooks, where torchrun is too heavy: a FileStore rendezvous
(no ports), fresh rank processes, a process-group timeout, and a join with a deadline.
If a rank raises or dies, the others are stopped and `RankFailure` names the rank with its
traceback; if the deadline passes, the still-running ranks are named. Nothing outlives it.

Ranks start from multiprocessing's fork server, which imports torch once (`_PRELOAD`) and
forks each rank from that clean interpreter: a spawned rank paid `import torch` itself, 2-4 s
of CPU per rank on two cores (a 4-rank launch: ~17 CPU-s under load, against ~0.6 s forked),
and the test suite starts about a hundred ranks. Like spawn, each rank is a fresh process that
has run nothing of the caller's; it gets the caller's environment, working directory and
sys.path at `run_ranks` time (the environment is applied before `fn`'s module is imported).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from splitgraph.errors import RankFailure

#: Imported once by the fork server (the first `run_ranks` of a process starts it), not
#: per rank. Third-party only: splitgraph's own modules are imported in each rank, after
#: the caller's environment is applied.
_PRELOAD = ["torch", "torch.distributed", "omegaconf"]


def _set_environ(env: dict[str, str]) -> None:
    """In the rank, before anything of the caller's is imported: the caller's environment
    (the fork server holds the one it started with)."""
    os.environ.clear()
    os.environ.update(env)


class _Environ:
    """Unpickled first among a rank's arguments, so the environment is set before `fn`'s
    module is imported (unpickling `fn` imports it)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __reduce__(self) -> tuple[Any, tuple[dict[str, str]]]:
        return (_set_environ, (self.env,))


def preload(*modules: str) -> None:
    """Have the fork server import `modules` too (third-party ones), for a caller whose ranks
    all import the same heavy module: the test suite's ranks import DCP (checkpoints, ~1.3 s
    of CPU each) or torch._dynamo (behind torch.optim's wrappers in the plain-PyTorch
    references, ~2.2 s), once per server instead of once per rank. Call it before the first
    `run_ranks`: a server already running keeps what it imported."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts
    return ctx


def _entry(
    _env: None,
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    workdir: str,
    pg_timeout: float,
    backend: str,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    out = Path(workdir)
    try:
        store = dist.FileStore(str(out / "store"), world_size)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world_size, *args)
        with open(out / f"result{rank}.pkl.tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(out / f"result{rank}.pkl.tmp", out / f"result{rank}.pkl")
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float | None = None,
    backend: str = "gloo",
    threads: int = 1,
    stop_on_failure: bool = True,
) -> list[Any]:
    """`[fn(rank, world_size, *args) for rank in range(world_size)]`, each in its own process.

    `fn` must be importable (a module-level function). With `stop_on_failure=False` the
    other ranks are left to notice a failure by themselves (until the deadline), so a test
    can check that they do; their errors are collected into the raised RankFailure.
    """
    pg_timeout = timeout if pg_timeout is None else pg_timeout
    ctx = _context()
    env = _Environ(dict(os.environ))
    workdir = tempfile.mkdtemp(prefix="splitgraph-ranks-")
    procs = [
        ctx.Process(
            target=_entry,
            args=(env, fn, r, world_size, workdir, pg_timeout, backend, threads, args),
            daemon=True,
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        first_failure: int | None = None
        while True:
            codes = [p.exitcode for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
                if stop_on_failure:
                    break
            if all(c is not None for c in codes):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        running = [r for r, p in enumerate(procs) if p.exitcode is None]
        _stop(procs)
        errors = _errors(workdir, procs)
        if first_failure is not None or errors:
            rank = first_failure if first_failure is not None else min(errors)
            detail = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
            raise RankFailure(f"rank {rank} failed (of {world_size}):\n{detail}")
        if running:
            raise RankFailure(
                f"deadline of {timeout:.0f}s passed with ranks {running} still running "
                "(a deadlock or a stalled rank); they were stopped"
            )
        results = []
        for r in range(world_size):
            with open(Path(workdir) / f"result{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        _stop(procs)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 5
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=5)


def _errors(workdir: str, procs: list[Any]) -> dict[int, str]:
    out = {}
    for r, p in enumerate(procs):
        f = Path(workdir) / f"error{r}.txt"
        if f.exists():
            out[r] = f.read_text()
        elif p.exitcode not in (None, 0) and p.exitcode != -signal.SIGTERM:
            out[r] = f"exited with code {p.exitcode} without a Python traceback"
    return out
