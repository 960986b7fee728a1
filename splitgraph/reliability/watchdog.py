"""The hang watchdog: a rank on which nothing finishes for `runtime.hang_timeout` seconds stops
the job with a report of what every rank is waiting on.

A thread per rank polls two clocks: the executor's (`Executor.position`: the index of the action
in progress and when it started, i.e. when the previous one finished) and the training loop's
(`beat(step, phase)` on entering work outside the schedule: the step sum, the next
step). Checkpoint saves run `paused()`: they are collectives bounded by `runtime.timeout`, and a
large one may legitimately take longer than a hang.

When a rank's clock passes the timeout, it raises a flag in the process group's store (the
rendezvous store torchrun or `run_ranks` created). Every rank's thread sees the flag within a
poll and publishes where it is; rank 0 collects them, prints the step-by-rank schedule grid
with each rank's current action marked (`*`), writes it to `hang_report.txt` in the run dir, and
every rank exits with code 3 (`EXIT_CODE`). torchrun then reports the failure, or, with
`--max-restarts`, restarts the job from its last checkpoint. Without a store (one process) the
rank reports on its own.

`runtime.hang_timeout` must be below `runtime.timeout`, so the watchdog speaks before the
process group's own timeout turns the hang into a bare "timed out" error on one rank.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

from splitgraph.schedule.ir import RECV_B, RECV_F, Action, B, F, I, Schedule, peer_stage

#: the exit status of a rank stopped by the watchdog
EXIT_CODE = 3


def default_store(namespace: str = "0") -> Any:
    """The default process group's store (torchrun's or run_ranks'), or None without one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        base = dist.distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - depends on how the group was made
        return None
    return dist.PrefixStore(f"splitgraph/watchdog/{namespace}/", base)


class Watchdog:
    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        world_size: int,
        timeout_s: float,
        executor: Any,
        store: Any = None,
        report_path: str | Path | None = None,
        stream: TextIO | None = None,
        pp_rank: int | None = None,
    ) -> None:
        """`rank`, `world_size`: global (the store's keys, the report's lines); `pp_rank`: this
        rank's place in its pipeline (its column of the schedule; default: `rank`)."""
        self.schedule, self.rank, self.world_size = schedule, rank, world_size
        self.pp_rank = rank if pp_rank is None else pp_rank
        self.timeout, self.executor, self.store = float(timeout_s), executor, store
        self.report_path = Path(report_path) if report_path else None
        self.stream = stream
        self.poll = min(1.0, self.timeout / 4)
        self.grace = max(2.0, 3 * self.poll)  # how long rank 0 waits for the others' answers
        # program index (the executor runs transfers in groups, receives first) -> index in
        # the action list; counted from the program where the executor does not say
        self._offsets: list[int] = list(getattr(executor, "action_index", []))
        if not self._offsets:
            n = 0
            for item in executor.program:
                self._offsets.append(n)
                n += len(item) if isinstance(item, tuple) else 1
        self._beat: tuple[int, str, float] = (-1, "starting", time.monotonic())
        self._paused = 0
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="splitgraph-watchdog", daemon=True)

    # -- the training loop's side ------------------------------------------------------

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def beat(self, step: int, phase: str) -> None:
        """The loop made progress and now enters `phase` (outside the schedule)."""
        self._beat = (step, phase, time.monotonic())

    @contextmanager
    def paused(self, phase: str) -> Iterator[None]:
        step = self._beat[0]
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self.beat(step, f"after {phase}")

    # -- what this rank is doing ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        step, phase, since = self._beat
        now = time.monotonic()
        pos = getattr(self.executor, "position", None)
        if pos is not None and pos[1] >= since:
            index, started = pos
            program = self.executor.program
            if index < len(program):
                where, at = self._label(program[index]), self._offsets[index]
            else:
                where, at = "the step's pending sends", len(self.schedule.actions[self.pp_rank])
            return {
                "rank": self.rank,
                "pp_rank": self.pp_rank,
                "step": step,
                "index": at,
                "where": where,
                "waited": now - started,
            }
        return {
            "rank": self.rank,
            "pp_rank": self.pp_rank,
            "step": step,
            "index": None,
            "where": phase,
            "waited": now - since,
        }

    def _label(self, item: Action | tuple[Action, ...]) -> str:
        if not isinstance(item, tuple):  # a compute action waits on its posted receive, if any
            s, rank_of = item.stage, self.schedule.rank_of
            wait = None
            if item.op == F and s > 0 and rank_of(s - 1) != self.pp_rank:
                wait = (Action(s, RECV_F, item.mb), rank_of(s - 1))
            last = self.schedule.num_stages - 1
            if item.op in (B, I) and s < last and rank_of(s + 1) != self.pp_rank:
                wait = (Action(s, RECV_B, item.mb), rank_of(s + 1))
            return f"action {item}" + (f" (input: {wait[0]} from rank {wait[1]})" if wait else "")
        parts = []
        for a in item:
            peer = self.schedule.rank_of(peer_stage(a))
            parts.append(f"{a} ({'to' if a.op.is_send else 'from'} rank {peer})")
        return "transfer " + ", ".join(parts)

    # -- the watching thread -------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            mine, other = self._stalled(), self._other_fired()
            if self._stop.is_set():  # stopped while polling: the run is ending
                return
            if mine or other:
                self._fire(mine)
                return

    def _stalled(self) -> bool:
        """This rank has waited past the timeout. Should reading the executor's position
        fail (a bug), the loop's own clock (the last `beat`) still times the step."""
        if self._paused:
            return False
        try:
            return self.status()["waited"] > self.timeout
        except Exception as e:
            self._warn_once(
                "status",
                f"cannot read where this rank is in its schedule ({e!r}); hangs are still "
                f"detected, from the training loop's last beat, but reported without the action",
            )
            return time.monotonic() - self._beat[2] > self.timeout

    def _other_fired(self) -> bool:
        """Another rank raised the flag. A store that fails (its host gone) is dropped: this
        rank still detects its own hang, but no longer hears of the others' (and they, as a
        rule, lost their store too): said once, on stderr."""
        if self.store is None:
            return False
        try:
            return bool(self.store.check(["fired"]))
        except Exception as e:
            if self._stop.is_set():  # torn down at the end of the run: nothing to say
                return False
            self.store = None
            self._warn_once(
                "store",
                f"the process group's store cannot be read ({e!r}); this rank still stops the "
                f"job if it waits {self.timeout:g} s, but will no longer hear of another "
                "rank's hang, nor collect the other ranks' positions for the report",
            )
            return False

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            stream = self.stream or sys.stderr
            print(f"hang watchdog, rank {self.rank}: {text}", file=stream, flush=True)

    def _fire(self, mine: bool) -> None:
        try:
            me = self.status()
        except Exception:  # said by _stalled: report the loop's own clock
            step, phase, since = self._beat
            me = {
                "rank": self.rank,
                "pp_rank": self.pp_rank,
                "step": step,
                "index": None,
                "where": phase,
                "waited": time.monotonic() - since,
            }
        me["detected"] = mine
        statuses: dict[int, dict[str, Any]] = {self.rank: me}
        reported = False
        try:
            if self.store is not None:
                if mine:
                    self.store.set("fired", str(self.rank))
                self.store.set(f"status/{self.rank}", json.dumps(me))
                if self.rank == 0:
                    statuses = self._collect()
                else:
                    reported = self._wait_for("reported")
        except Exception:  # the store went away mid-report: say what we know
            pass
        if self.rank == 0 or not reported:
            text = self.report(statuses)
        else:
            text = (
                f"hang watchdog, rank {self.rank}: {_line(me)}\n"
                f"(rank 0 printed the grid of every rank; it is in hang_report.txt)"
            )
        stream = self.stream or sys.stderr
        print(text, file=stream, flush=True)
        if self.rank == 0:
            if self.report_path is not None:
                try:
                    self.report_path.parent.mkdir(parents=True, exist_ok=True)
                    self.report_path.write_text(text + "\n")
                except OSError:
                    pass
            if self.store is not None:
                with suppress(Exception):
                    self.store.set("reported", "1")
        os._exit(EXIT_CODE)

    def _collect(self) -> dict[int, dict[str, Any]]:
        statuses: dict[int, dict[str, Any]] = {}
        end = time.monotonic() + self.grace
        while True:
            for r in range(self.world_size):
                if r not in statuses and self.store.check([f"status/{r}"]):
                    statuses[r] = json.loads(self.store.get(f"status/{r}"))
            if len(statuses) == self.world_size or time.monotonic() > end:
                return statuses
            time.sleep(0.05)

    def _wait_for(self, key: str) -> bool:
        end = time.monotonic() + 2 * self.grace
        while time.monotonic() < end:
            if self.store.check([key]):
                return True
            time.sleep(0.05)
        return False

    def report(self, statuses: dict[int, dict[str, Any]]) -> str:
        """What each rank waits on, and the schedule grid with each rank's position marked."""
        who = [r for r, st in sorted(statuses.items()) if st.get("detected")] or [self.rank]
        step = max((st["step"] for st in statuses.values()), default=-1)
        lines = [
            f"hang watchdog: no action finished on rank {', '.join(map(str, who))} for "
            f"{self.timeout:g} s (runtime.hang_timeout) at step {step}. What each rank is "
            "waiting on:"
        ]
        marks: dict[tuple[int, int], str] = {}
        for r in range(self.world_size):
            st = statuses.get(r)
            if st is None:
                lines.append(
                    f"  rank {r}: no answer within {self.grace:g} s (it exited, or is stuck "
                    "without releasing the interpreter)"
                )
                continue
            lines.append(f"  rank {r}: {_line(st)}")
            col = int(st.get("pp_rank", r))  # replicas of one pipeline share its columns
            at = st["index"] if st["index"] is not None else len(self.schedule.actions[col])
            note = f"{st['waited']:.1f} s in {st['where']}"
            if col != r:
                note = f"rank {r}: {note}"
            marks[(col, at)] = f"{marks[(col, at)]}; {note}" if (col, at) in marks else note
        s = self.schedule
        lines.append(
            f"schedule {s.name}: {s.num_stages} stages on {s.num_ranks} ranks, "
            f"{s.num_microbatches} microbatches; * marks where each rank is:"
        )
        lines.append(s.grid(marks))
        return "\n".join(lines)


def _line(st: dict[str, Any]) -> str:
    at = "" if st["index"] is None else f" (its action {st['index']})"
    return f"step {st['step']}, waiting {st['waited']:.1f} s on {st['where']}{at}"
