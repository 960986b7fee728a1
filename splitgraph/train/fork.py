"""`splitgraph-train --nproc N`: one node's ranks forked from one interpreter, not torchrun.

    splitgraph-train --nproc 2 schedule=zb1 pipeline.microbatches=8   # = launch/train.sh 2 ...

torchrun starts an agent process that imports torch, then N fresh interpreters that each import
torch and compose the config again: on two cores the imports alone are most of a short run's
start-up. This launcher is the one process that has already paid for them:

    parent   imports torch and the trainer, composes the config (once), checks the launch in a
             throwaway child (splitgraph-check's checks, messages and exit codes; the child
             touches torch and, on a GPU, CUDA, so the parent never does), takes the run
             dir's lock, writes .hydra/ and train.log, then forks the ranks and waits
    rank r   RANK=r, LOCAL_RANK=r, WORLD_SIZE=LOCAL_WORLD_SIZE=N, a FileStore rendezvous
             (runtime/dist.py: no port, nothing listening); the same entry as a torchrun
             rank (`train.run.exit_code` around `run`), on the parent's config; leaves with os._exit

Like torchrun, each rank runs in a session of its own, so a terminal's Ctrl-C reaches the
launcher only, which forwards every SIGINT/SIGTERM to the ranks (reliability/signals.py: the
first finishes the step and commits a checkpoint, exit EXIT_STOPPED; a second one, at least
DEDUPE_S later, stops at once, and ranks still running KILL_AFTER_S later are killed). A rank
that fails (an exit code other than 0 and EXIT_STOPPED, or a signal) gives the others
FAILURE_GRACE_S to exit on their own (a peer's death ends their waits; rank 0 may be writing
its record), then they are killed, and the launcher says in one line which rank failed first,
exiting with its code. A rank dies with the launcher (Linux: PR_SET_PDEATHSIG; elsewhere a
thread watches the parent).

Forking is safe because the parent runs nothing but imports and Hydra before it forks: no
thread (it refuses to fork from a process with a Python thread), no torch op (no OpenMP pool),
no CUDA. The config is composed by Hydra once, in the parent; the ranks inherit it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from hydra.experimental.callback import Callback

from splitgraph.reliability.signals import DEDUPE_S, EXIT_STOPPED, SIGNALS, signame

#: after a rank fails, how long the others may take to exit by themselves before SIGKILL
FAILURE_GRACE_S = 10.0
#: after a second signal, how long the ranks may take to stop before SIGKILL
KILL_AFTER_S = 5.0
#: how often the launcher looks at its ranks
_POLL_S = 0.02

#: set while `splitgraph-train --nproc N` composes its config: LaunchCheck checks the launch
_pending: int | None = None


def nproc_flag(argv: list[str], prog: str = "splitgraph-train") -> tuple[int | None, list[str]]:
    """`--nproc N` (or `--nproc=N`) taken out of `argv` before Hydra reads it: (N or None,
    the rest). A bad value, or a flag this launch cannot honour, is one line and exit 2."""
    nproc: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc":
            if i + 1 >= len(argv):
                _usage(f"{prog}: --nproc needs a number of ranks, e.g. --nproc 2")
            nproc, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            nproc = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if nproc is None:
        return None, rest
    try:
        n = int(nproc)
    except ValueError:
        _usage(f"{prog}: --nproc {nproc}: not a number of ranks")
    if n < 1:
        _usage(f"{prog}: --nproc {n}: a launch needs at least 1 rank (one per pipeline stage)")
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("RANK"):
        _usage(
            f"{prog}: --nproc {n} in a process that is already a rank (RANK="
            f"{os.environ.get('RANK', '?')}): launch with torchrun or with --nproc, not both"
        )
    if any(a in ("-m", "--multirun") or a.startswith("--multirun=") for a in rest):
        _usage(
            f"{prog}: --nproc launches one run; a Hydra multirun (-m) is not supported with "
            "it (splitgraph-compare runs sweeps; or one launch per setting)"
        )
    return n, rest


def _usage(line: str) -> NoReturn:
    print(line, file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def launching(nproc: int | None) -> Iterator[None]:
    """Within: the config Hydra composes is checked for a launch of `nproc` ranks
    (LaunchCheck) before anything is written; compose errors exit 2 as splitgraph-check's."""
    global _pending
    if nproc is None:
        yield
        return
    _pending = nproc
    try:
        with _compose_errors_exit_2():
            yield
    finally:
        _pending = None


@contextlib.contextmanager
def _compose_errors_exit_2() -> Iterator[None]:
    """A config Hydra cannot compose (an unknown key, a bad value) is splitgraph-check's
    one message and exit 2, as launch/train.sh's check said it before this launcher, not
    Hydra's exit 1."""
    try:
        from hydra._internal.hydra import Hydra
    except ImportError:  # another Hydra layout: its own message and exit code
        yield
        return
    original = Hydra.compose_config

    def compose_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except Exception as e:
            cause = f"\n  ({e.__cause__})" if e.__cause__ else ""
            print(f"splitgraph-check: {e}{cause}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    Hydra.compose_config = compose_config  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.compose_config = original  # type: ignore[method-assign]


class LaunchCheck(Callback):
    """Hydra callback (conf/config.yaml), first of all: under `splitgraph-train --nproc N`,
    the composed config is checked for N ranks (train/check.py) in a throwaway child before
    the run dir's lock, .hydra/ or train.log are written; a refusal exits with the check's
    code. Elsewhere (torchrun ranks, one process) it does nothing."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        nproc = _pending
        if nproc is None:
            return

        def check() -> int:
            import io

            from omegaconf import open_dict

            from splitgraph.train.check import check_launch

            with open_dict(config):
                del config["hydra"]
            with contextlib.redirect_stdout(io.StringIO()):  # the report: splitgraph-check's
                return check_launch(config, nproc, nproc)

        code = run_in_child(check)
        if code != 0:
            raise SystemExit(code)
        print(f"run dir: {config.run_dir}", file=sys.stderr, flush=True)


def run_in_child(fn: Callable[[], int]) -> int:
    """`fn()` in a forked child that dies with this process: its return value (its exit
    code). Whatever it touches (torch's thread pools, CUDA, the config) stays in the child."""
    _refuse_threads("run a check")
    _flush()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _child(fn, blocked, rank=None)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return _code(status)
        except ChildProcessError:
            return 1


def fork_ranks(
    nproc: int,
    rank_main: Callable[[int], int],
    prog: str = "splitgraph-train",
    grace: float = FAILURE_GRACE_S,
    kill_after: float = KILL_AFTER_S,
) -> int:
    """`rank_main(r)` for r in 0..nproc-1, each in a forked process, and the launch's exit
    code: 0, EXIT_STOPPED (every rank stopped at a step on a signal), 128 + the signal (a
    signal stopped them at once), or the code of the rank that failed first (one line)."""
    _refuse_threads("fork ranks")
    _flush()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    ranks = _Ranks(prog, grace, kill_after)
    old: dict[int, Any] = {}
    try:
        try:
            for r in range(nproc):
                pid = os.fork()
                if pid == 0:
                    _child(functools.partial(rank_main, r), blocked, rank=r)
                ranks.live[pid] = r
            old = {s: signal.signal(s, ranks.forward) for s in SIGNALS}
        finally:  # signals that came meanwhile are delivered now, and forwarded
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return ranks.wait(nproc)
    finally:
        ranks.kill()
        for s, h in old.items():
            signal.signal(s, h)


class _Ranks:
    """The parent's view of its ranks: who runs, who exited how, which signals came."""

    def __init__(self, prog: str, grace: float, kill_after: float) -> None:
        self.prog, self.grace, self.kill_after = prog, grace, kill_after
        self.live: dict[int, int] = {}  # pid -> rank
        self.codes: dict[int, int] = {}  # rank -> exit code (128 + n: died of signal n)
        self.died_of: dict[int, int] = {}  # rank -> the signal it died of
        self.signals: list[int] = []
        self.first_at = 0.0
        self.kill_at: float | None = None
        self.failed: int | None = None  # the rank that failed first
        self.killed: set[int] = set()  # the ranks the launcher killed

    def forward(self, signum: int, frame: Any) -> None:
        """SIGINT/SIGTERM to the launcher: to every rank; a second one (past DEDUPE_S) also
        starts the deadline after which the ranks are killed."""
        now = time.monotonic()
        if not self.signals:
            self.first_at = now
        elif now - self.first_at >= DEDUPE_S and self.kill_at is None:
            self.kill_at = now + self.kill_after
        self.signals.append(signum)
        for pid in list(self.live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def wait(self, nproc: int) -> int:
        while self.live:
            for pid in list(self.live):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 1 << 8
                if done:
                    self._exited(self.live.pop(pid), status)
            if self.live:
                if self.kill_at is not None and time.monotonic() >= self.kill_at:
                    self.kill()
                time.sleep(_POLL_S)
        return self._verdict(nproc)

    def _exited(self, rank: int, status: int) -> None:
        self.codes[rank] = _code(status)
        if os.WIFSIGNALED(status):
            self.died_of[rank] = os.WTERMSIG(status)
        if self.failed is None and rank not in self.killed and not self._expected(rank):
            self.failed = rank
            self.kill_at = time.monotonic() + self.grace

    def _expected(self, rank: int) -> bool:
        """Exited as a run ends: done, stopped at a step, or stopped at once by a signal
        the launcher forwarded."""
        code = self.codes[rank]
        if rank not in self.died_of and code in (0, EXIT_STOPPED):
            return True
        return bool(self.signals) and code in {128 + s for s in self.signals}

    def kill(self) -> None:
        """SIGKILL every rank still running, and reap it."""
        for pid, rank in list(self.live.items()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.killed.add(rank)
        for pid in list(self.live):
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                self._exited(self.live.pop(pid), status)

    def _verdict(self, nproc: int) -> int:
        codes = [self.codes[r] for r in range(nproc)]
        if self.failed is not None:
            r = self.failed
            others = [f"rank {o} {self._how(o)}" for o in range(nproc) if o != r and codes[o] != 0]
            after = f"; then {', '.join(others)}" if others else ""
            print(
                f"{self.prog}: rank {r} failed first: it {self._how(r)}{after}",
                file=sys.stderr,
                flush=True,
            )
            return codes[r] if 0 < codes[r] < 256 else 1
        if self.killed:  # after a second signal
            ranks = ", ".join(str(r) for r in sorted(self.killed))
            print(
                f"{self.prog}: rank(s) {ranks} had not stopped {self.kill_after:g} s after the "
                "second signal: killed",
                file=sys.stderr,
                flush=True,
            )
        if all(c == 0 for c in codes):
            return 0
        if all(c in (0, EXIT_STOPPED) for c in codes):
            return EXIT_STOPPED
        return 128 + self.signals[0] if self.signals else 1  # stopped at once (rank 0 said so)

    def _how(self, rank: int) -> str:
        if rank in self.died_of:
            sig = self.died_of[rank]
            killed = " (killed by the launcher)" if rank in self.killed else ""
            return f"died of {signame(sig)}{killed}"
        return f"exited with code {self.codes[rank]}"


def _child(fn: Callable[[], int], blocked: Any, rank: int | None) -> NoReturn:
    """In a forked child: its own session, death with the parent, none of the parent's exit
    handlers, the signal handlers of a rank that has not started (rank 0 says so in one line),
    then `fn`; it never returns into the parent's stack."""
    code = 1
    try:
        parent = os.getppid()
        os.setsid()
        _die_with(parent)
        atexit._clear()  # the parent's (its run-dir lock among them) are not this process's
        if rank is None:
            for s in SIGNALS:
                signal.signal(s, signal.SIG_DFL)
        else:
            from splitgraph.reliability.signals import exit_at_once_while_starting

            exit_at_once_while_starting(rank)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        code = fn()
        atexit._run_exitfuncs()  # what this process registered
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _flush()
        os._exit(code)


def _die_with(parent: int) -> None:
    """This child is killed when `parent` dies (nothing is left training alone)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    else:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(128 + signal.SIGKILL)

        threading.Thread(target=watch, name="splitgraph-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the line above
        os._exit(128 + signal.SIGKILL)


def _refuse_threads(what: str) -> None:
    """A forked child gets only the forking thread: locks other threads held stay held."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        raise RuntimeError(f"cannot {what} by fork from a process with threads running: {others}")


def _code(status: int) -> int:
    """An exit status as a shell reports it: the exit code, or 128 + the signal."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
