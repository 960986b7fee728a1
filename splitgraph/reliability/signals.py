"""SIGINT and SIGTERM: finish the step, commit one checkpoint, exit with one line.

    first signal, while training   a flag: every rank finishes its step; the flag travels in
                                   the step's sum (runtime/stepsum.py) so all ranks agree on
                                   the last step, however the signal reached them; all commit
                                   one checkpoint, then `Stopped`: one line, exit EXIT_STOPPED
    first signal, before the first step, or a second signal (at least DEDUPE_S after the
    first)                         at once: one line (rank 0), the run-dir lock released, exit
                                   128 + the signal number; the last committed checkpoint is
                                   what a resume takes (nothing newer was half-written: saves
                                   are atomic)
    first signal after the last    ignored: the run is finishing anyway (a second one
    step                           stops it at once)

Exiting at once must not wait for the main thread, which may be blocked in a collective or a
socket wait for minutes: Python runs signal handlers only in the main thread, between
bytecodes. So `signal.set_wakeup_fd` has the C-level handler write each signal's number to a
socket that a watcher thread reads; the thread counts signals and exits the process itself.

Copies of one signal arrive close together: under SLURM, `--signal` without `B:` reaches
torchrun and the workers, and torchrun forwards it again; so signals within DEDUPE_S of the
first count as the first. torchrun itself starts each worker in a session of its own (a
terminal's Ctrl-C reaches only torchrun) and forwards the signal it receives; a second Ctrl-C
makes it send SIGTERM, which the workers take as the second signal.

EXIT_STOPPED is 75 (EX_TEMPFAIL, "try again later"): a stopped run resumes with the same
command, as the line says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from splitgraph.errors import SplitgraphError

log = logging.getLogger("splitgraph")

#: the exit status of a run stopped by a signal at a step boundary, with its checkpoint
EXIT_STOPPED = 75
#: copies of one signal arriving within this many seconds count once
DEDUPE_S = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: a file the launcher (splitgraph.train.torchrun) reads to learn that the workers stopped cleanly
STOP_FILE_ENV = "SPLITGRAPH_STOP_FILE"


class Stopped(SplitgraphError):
    """The run stopped at a step boundary on a signal, after committing its checkpoint."""

    def __init__(self, signame: str, step: int, checkpoint: str | None, resume: str) -> None:
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (none written)"
        super().__init__(f"stopped by {signame} at step {step}; {saved}; {resume}")


class StopSignals:
    """Installs the handlers for a block (main thread only); the training loop reads
    `requested` at each step and sets `phase`, `step` and `last_saved` for the messages."""

    def __init__(
        self, rank: int = 0, on_abort: Callable[[], None] | None = None, stream: Any = None
    ) -> None:
        self.rank, self.on_abort, self.stream = rank, on_abort, stream
        self.signum: int | None = None  # the first signal
        self.first_at = 0.0
        self.phase = "starting"  # "starting" -> "training" -> "finishing"
        self.step = 0
        self.last_saved: str | None = None
        self.active = False
        self._old: dict[int, Any] = {}
        self._old_fd = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    @property
    def requested(self) -> int:
        """The first signal's number, else 0."""
        return self.signum or 0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "not in the main thread: SIGINT/SIGTERM keep their default action (no "
                "checkpoint at a step boundary on a signal)"
            )
            return self
        r, w = socket.socketpair()
        r.setblocking(True)
        w.setblocking(False)
        self._sockets = (r, w)
        self._old = {s: signal.getsignal(s) for s in SIGNALS}
        self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for s in SIGNALS:
            signal.signal(s, self._handler)
        self._thread = threading.Thread(target=self._watch, name="splitgraph-signals", daemon=True)
        self._thread.start()
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.active:
            return
        self.active = False
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)  # None: set from C
        signal.set_wakeup_fd(self._old_fd)
        r, w = self._sockets  # type: ignore[misc]
        with contextlib.suppress(OSError):
            w.send(b"\0")  # wakes the watcher: it returns
        if self._thread is not None:
            self._thread.join(timeout=5)
        r.close()
        w.close()

    # -- in the main thread, at the next bytecode boundary -------------------------------

    def _handler(self, signum: int, frame: Any) -> None:
        """Only records the first signal early (the watcher decides everything else), so the
        step that is running when the signal comes already carries the flag."""
        if self.signum is None and self.phase != "starting":
            self.signum, self.first_at = signum, time.monotonic()

    # -- in the watcher thread, as soon as the signal arrives -----------------------------

    def _watch(self) -> None:
        r = self._sockets[0]  # type: ignore[index]
        while True:
            try:
                data = r.recv(64)
            except OSError:
                return
            for signum in data:
                if signum == 0:
                    return
                if signum in SIGNALS:
                    self.receive(signum)

    def receive(self, signum: int) -> None:
        """One delivery of `signum`: record it, ignore it, or exit at once."""
        now = time.monotonic()
        if self.phase == "starting":
            self._abort(signum, "before the first step: nothing to save")
        if self.signum is None:
            self.signum, self.first_at = signum, now
            return
        if now - self.first_at < DEDUPE_S:
            return  # a copy of the first (several senders)
        self._abort(signum, "a second signal: stopped at once, without a checkpoint")

    def _abort(self, signum: int, why: str) -> None:
        if self.rank == 0:
            last = (
                f"the last committed checkpoint is {self.last_saved}"
                if self.last_saved
                else "no checkpoint was committed"
            )
            where = f" at step {self.step}" if self.phase == "training" else ""
            line = f"splitgraph: {signal.Signals(signum).name}{where}, {why}; {last}.\n"
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.write((self.stream or sys.stderr).fileno(), line.encode())
        if self.on_abort is not None:
            with contextlib.suppress(Exception):  # exiting anyway
                self.on_abort()
        os._exit(128 + signum)


def exit_at_once_while_starting(rank: int, on_abort: Callable[[], None] | None = None) -> None:
    """Until `StopSignals` takes over (and after it hands back), SIGINT and SIGTERM exit at
    once with one line instead of a KeyboardInterrupt traceback or a silent death: nothing has
    been trained yet (or everything is saved). Main thread only."""

    def handler(signum: int, frame: Any) -> None:
        if rank == 0:
            line = f"splitgraph: {signame(signum)} before the first step: stopped at once; nothing "
            with contextlib.suppress(OSError):
                os.write(2, (line + "to save.\n").encode())
        if on_abort is not None:
            with contextlib.suppress(Exception):
                on_abort()
        os._exit(128 + signum)

    for s in SIGNALS:
        signal.signal(s, handler)


def write_stop_file(line: str) -> None:
    """Tell the launcher (splitgraph.train.torchrun) that this rank stopped cleanly, and how."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(line + "\n")
    except OSError as e:
        log.warning("could not write the stop line to %s: %s", path, e)


def signame(signum: int) -> str:
    return signal.Signals(signum).name
