"""The schedule simulated on fewer cores than ranks: the ranks take turns (processor sharing).

`schedule.simulate` gives every rank a processor of its own. With more ranks than cores (4
gloo ranks on a 2-core machine) the operating system time-shares the cores: while `k` ranks
have work, each advances at `min(1, cores / k)` of its own speed. A rank that waits for a
message takes no share, so the others run faster then:

    cores = 2, ranks 0-3 all computing     each at 1/2 speed
    ranks 0, 1 computing, 2, 3 waiting     each at full speed

While more ranks have work than there are cores, every one of them also runs `crowding`
times slower (>= 1; 1 in the pure model above): the cores switch between them every few
milliseconds and each switch refills the caches with the other rank's weights and
activations, and a rank woken by its message waits for a core. `crowding` is measured
once per machine (cost/calibrate.py), never read from the run predicted.

That is the whole model: the same actions, costs and transfer semantics as the simulator's
timing mode (`strict=False`: a message arrives `comm` after its send was posted; a group of
transfers costs `post` of the rank's time before it goes out), events advanced in time
order. The core count is the machine's (known before any run), so this stays a priori. With
`cores >= ranks` nobody is ever slowed and the result is `simulate`'s step time
(tests/test_timeshare.py holds it to that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from splitgraph.schedule import Costs, Schedule
from splitgraph.schedule.ir import message
from splitgraph.schedule.simulate import Deadlock, _needs

#: Work left below this (seconds) counts as done: floating-point dust from `rem - speed * dt`.
_EPS = 1e-12


@dataclass(frozen=True)
class SharedResult:
    step_time: float  # the last rank's end
    busy: tuple[float, ...]  # per rank: compute at full speed, as simulate's busy


def speed(running: int, cores: int, crowding: float = 1.0) -> float:
    """How fast each of `running` ranks advances on `cores` (module doc)."""
    if running <= cores:
        return 1.0
    return cores / running / crowding


def simulate_shared(
    sched: Schedule, costs: Costs, cores: int, crowding: float = 1.0
) -> SharedResult:
    """The step of `sched` with every rank's work sharing `cores` processors (module doc)."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    if crowding < 1.0:
        raise ValueError(f"crowding must be >= 1, got {crowding}")
    return _Sharing(sched, costs).run(cores, crowding)


class _Sharing:
    """The simulation's state: per rank, the next action, the item in progress and its work
    left (at full speed), whether its group of transfers is posted; the sends so far."""

    def __init__(self, sched: Schedule, costs: Costs) -> None:
        self.sched, self.costs, self.acts = sched, costs, sched.actions
        R = sched.num_ranks
        self.pos = [0] * R
        self.work: list[float | None] = [None] * R  # work left of the item in progress
        self.kind: list[str] = [""] * R  # "post" or "compute": what the item in progress is
        self.posted = [False] * R  # the post of the current group of transfers is paid
        self.busy = [0.0] * R
        self.sent: dict[tuple[str, int, int], float] = {}
        self.t = 0.0

    def run(self, cores: int, crowding: float) -> SharedResult:
        acts, work = self.acts, self.work
        R = len(acts)
        while True:
            self.settle()
            running = [r for r in range(R) if work[r] is not None]
            wakes = self.wakes()
            if not running and not wakes:
                break
            v = speed(len(running), cores, crowding)
            dt = min([work[r] / v for r in running] + [w - self.t for w in wakes])  # type: ignore[operator]
            self.t += dt
            for r in running:
                left = work[r] - v * dt  # type: ignore[operator]
                if left <= _EPS:
                    self.finish(r)
                else:
                    work[r] = left
        stuck = {r: self.pos[r] for r in range(R) if self.pos[r] < len(acts[r])}
        if stuck:
            raise Deadlock(stuck, {r: f"{acts[r][i]} waits for data" for r, i in stuck.items()})
        return SharedResult(self.t, tuple(self.busy))

    def finish(self, r: int) -> None:
        """Rank r's item in progress is done: a compute moves the rank on, a post lets
        its transfers go out."""
        if self.kind[r] == "compute":
            self.pos[r] += 1
        else:
            self.posted[r] = True
        self.work[r] = None

    def arrival(self, r: int) -> float | None:
        """When the data rank r's next compute reads is there (None: not sent yet)."""
        a = self.acts[r][self.pos[r]]
        need = _needs(a.stage, a.op, a.mb, self.sched)
        if need is None:
            return self.t
        if need not in self.sent:
            return None
        return self.sent[need] + self.costs.transfer(need)

    def settle(self) -> None:
        """Everything that takes no time: transfers posted, computes started, zero-work
        items ended where they start."""
        acts, pos, work, costs = self.acts, self.pos, self.work, self.costs
        moved = True
        while moved:
            moved = False
            for r in range(len(acts)):
                if work[r] is not None or pos[r] >= len(acts[r]):
                    continue
                a = acts[r][pos[r]]
                if a.op.is_comm:
                    first = pos[r] == 0 or acts[r][pos[r] - 1].op.is_compute
                    if costs.post and first and not self.posted[r]:
                        work[r], self.kind[r] = costs.post, "post"
                    else:
                        if a.op.is_send:
                            self.sent.setdefault(message(a), self.t)
                        pos[r] += 1
                        self.posted[r] = False
                    moved = True
                    continue
                at = self.arrival(r)
                if at is None or at > self.t + _EPS:
                    continue
                work[r], self.kind[r] = costs.compute(a.op, a.stage, a.mb), "compute"
                self.busy[r] += work[r]  # type: ignore[operator]
                moved = True
            for r in range(len(acts)):
                if work[r] is not None and work[r] <= _EPS:  # type: ignore[operator]
                    self.finish(r)
                    moved = True

    def wakes(self) -> list[float]:
        """When a rank that waits for data will have it."""
        out = []
        for r in range(len(self.acts)):
            if (
                self.work[r] is None
                and self.pos[r] < len(self.acts[r])
                and self.acts[r][self.pos[r]].op.is_compute
            ):
                at = self.arrival(r)
                if at is not None and at > self.t + _EPS:
                    out.append(at)
        return out


def shared_tail(works: Sequence[float], cores: int, crowding: float = 1.0) -> float:
    """How long per-rank work that all starts at once takes on `cores` shared processors:
    `max(works)` when there are enough cores, longer when they take turns."""
    t, done = 0.0, 0.0
    ws = sorted(max(w, 0.0) for w in works)
    for i, w in enumerate(ws):
        t += (w - done) / speed(len(ws) - i, cores, crowding)
        done = w
    return t
