"""Measured timelines: when each action ran on each rank, and what that says about the schedule.

Every rank records, for a window of steps, the start and end of each action it executes
(`F`, `B`, `I`, `W`, a transfer group `comm`, a blocked receive `wait`), and the step's fixed
costs around the schedule (the weight-decay term `L2`, the NaN guard and the step sum of the
loss and flags `SYNC`, the optimizer `OPT`, with data parallelism the wait on the gradient
all-reduce `DP`), on a clock that all ranks share: the wall clock (CLOCK_MONOTONIC) on CPU,
CUDA events on GPU placed on that clock by a reference event, both relative to an instant
every rank takes right after one barrier (on GPU, with its device drained first). Rank 0
gathers them and writes:

* `trace.json` in the Chrome trace format (open it in https://ui.perfetto.dev or
  chrome://tracing): one process per rank, one slice per action;
* per-stage costs measured from the trace (mean compute time of F, B, I and W per stage,
  the transfer time of each boundary, the time to post a transfer group), which feed the
  simulator so the measurement and its reconstruction can be set side by side (the
  simulator fed with the run's own costs: it checks the simulator, it is not a prediction).

Recording costs two clock reads and a list append per action (well under 2% of a step: see
`results/schedules/README.md` for the measurement).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from splitgraph.schedule.ir import Action, Schedule
from splitgraph.schedule.simulate import Costs, SimResult, idle_share, simulate

if TYPE_CHECKING:
    from splitgraph.config import TraceConfig

log = logging.getLogger("splitgraph")

#: What an event is: the Action run or waited for, the transfer group posted (a tuple of
#: Actions), or the name of a step cost ("OPT"). Written out as text only at output.
Label = Action | tuple[Action, ...] | str
#: (step, label, kind, start seconds, end seconds) relative to the shared reference instant.
Event = tuple[int, Label, str, float, float]

COMPUTE_KINDS = ("F", "B", "I", "W")
#: Per-step work outside the schedule's span: weight decay, the step sum (loss, flags), the
#: optimizer, the wait on the gradient all-reduce (dp). The reconstruction adds them to the span.
STEP_KINDS = ("L2", "SYNC", "OPT", "DP")
BLOCKED = 20e-6  # a receive that waited longer than this was waiting for its data


class _Span:
    """One traced block: begins on entry, ends on a normal exit (a failed step is not timed)."""

    __slots__ = ("kind", "label", "token", "tracer")

    def __init__(self, tracer: Tracer, label: Label, kind: str) -> None:
        self.tracer, self.label, self.kind = tracer, label, kind

    def __enter__(self) -> None:
        self.token = self.tracer.begin()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            self.tracer.end(self.token, self.label, self.kind)
        return False


class _NoSpan:
    """What `span` gives outside the window: enters and leaves, records nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return False


_NO_SPAN = _NoSpan()


class Tracer:
    """Records this rank's actions during `record` steps; wall clock (perf_counter).

    Callers wrap what they time in `with tracer.span(label, kind):`; outside the window
    (`active` false) a span costs one attribute test and records nothing.
    """

    #: False only for NULL_TRACER (trace.enabled=false): the window never opens
    enabled = True

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.step = 0
        self.active = False
        self.t_ref = 0.0

    def span(self, label: Label, kind: str) -> _Span | _NoSpan:
        """`with tracer.span("OPT", "OPT"):` records the block as one event while active.
        `label`: an Action, a transfer group (tuple of Actions) or a name; kept as given."""
        return _Span(self, label, kind) if self.active else _NO_SPAN

    def quiesce(self) -> None:
        """Call before the barrier that opens the window: nothing of this rank still running
        (CUDA: the device's queued work) may delay its reference past its peers'."""

    def set_reference(self) -> None:
        """Call right after a barrier on every rank: times are relative to this instant.

        CLOCK_MONOTONIC is one clock for every process of a host, so ranks on rank 0's host
        take rank 0's instant (exact); ranks elsewhere keep their own (barrier-aligned).
        """
        self.t_ref = _shared_reference(time.perf_counter())

    def begin(self) -> Any:
        return time.perf_counter()

    def end(self, token: Any, label: Label, kind: str) -> None:
        self.events.append(
            (self.step, label, kind, token - self.t_ref, time.perf_counter() - self.t_ref)
        )

    def flush(self) -> None:
        """Make the step's events final (CUDA: read the events back)."""


class CudaTracer(Tracer):
    """CUDA events around each action, so the times are the GPU's, not the launch's.

    Events are read back once per recorded step (one synchronize per step while recording).
    The reference is an event recorded on an idle device and waited for, paired with the host
    instant right after it, and placed on the clock the ranks share (`_shared_reference`):
    an event's time is that instant's offset from rank 0's plus its time since the reference
    event. The device is drained before the window's barrier (`quiesce`), so a rank whose GPU
    still had queued work does not take its reference later than its peers.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._pending: list[tuple[int, Label, str, Any, Any]] = []
        self._ref_event: Any = None
        self._offset = 0.0  # this rank's reference instant on the shared clock

    def quiesce(self) -> None:
        torch.cuda.synchronize(self.device)

    def set_reference(self) -> None:
        torch.cuda.synchronize(self.device)
        ref = torch.cuda.Event(enable_timing=True)
        ref.record()
        torch.cuda.synchronize(self.device)  # the event has happened: now is its host instant
        mine = time.perf_counter()
        self._ref_event = ref
        self.t_ref = _shared_reference(mine)
        self._offset = mine - self.t_ref

    def begin(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def end(self, token: Any, label: Label, kind: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._pending.append((self.step, label, kind, token, ev))

    def flush(self) -> None:
        if not self._pending:
            return
        torch.cuda.synchronize(self.device)
        ref, off = self._ref_event, self._offset
        for step, label, kind, start, end in self._pending:
            self.events.append(
                (
                    step,
                    label,
                    kind,
                    off + ref.elapsed_time(start) / 1e3,
                    off + ref.elapsed_time(end) / 1e3,
                )
            )
        self._pending.clear()


def _shared_reference(mine: float) -> float:
    """Rank 0's reference instant for the ranks on its host (CLOCK_MONOTONIC is one clock per
    host), `mine` elsewhere (aligned by the barrier before it). Collective when distributed."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), mine))
    return float(everyone[0][1]) if everyone[0][0] == socket.gethostname() else mine


class _NullTracer(Tracer):
    """trace.enabled=false: never active, so every span is the empty one; no None checks."""

    enabled = False

    @property  # type: ignore[override]
    def active(self) -> bool:
        return False

    @active.setter
    def active(self, value: bool) -> None:
        pass


#: the tracer of a run that records nothing (trace.enabled=false, tests, benchmarks)
NULL_TRACER: Tracer = _NullTracer()


def make_tracer(device: torch.device, enabled: bool = True) -> Tracer:
    if not enabled:
        return NULL_TRACER
    return CudaTracer(device) if device.type == "cuda" else Tracer()


# -- Chrome trace ------------------------------------------------------------------------------


def chrome_trace(per_rank: Sequence[Iterable[Event]], meta: dict[str, Any] | None = None) -> dict:
    """The Chrome trace-event JSON: ranks as processes, actions as complete ("X") slices."""
    events: list[dict[str, Any]] = []
    for rank, evs in enumerate(per_rank):
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": rank,
                "tid": 0,
                "args": {"name": f"rank {rank}"},
            }
        )
        for step, label, kind, start, end in evs:
            events.append(
                {
                    "name": label_text(label),
                    "cat": kind,
                    "ph": "X",
                    "pid": rank,
                    "tid": 1 if kind in ("comm", "wait") else 0,
                    "ts": round(start * 1e6, 3),
                    "dur": round((end - start) * 1e6, 3),
                    "args": {"step": step},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta or {}}


# -- what the trace says ----------------------------------------------------------------------


@dataclass
class Measured:
    """Per-stage costs and per-rank bubbles measured from a trace (seconds)."""

    forward: list[float]
    backward: list[float]
    backward_input: list[float]
    weight: list[float]
    comm: list[float]
    post: float
    optimizer: list[float]  # per rank
    sync: list[float]  # per rank: guard + all-reduce of the loss (includes waiting for peers)
    weight_decay: list[float]  # per rank: s and its gradient lambda W
    dp_wait: list[float]  # per rank: blocked on the gradient all-reduce (0 without dp)
    bubble: list[float]  # per rank: idle share of the schedule's span
    span: float  # median over steps: first action start to last action end, all ranks
    compute_per_rank: list[float]  # median over steps: seconds of F/B/I/W per rank

    @property
    def bubble_fraction(self) -> float:
        """The bubble (simulate.idle_share) of the median traced step."""
        return idle_share(self.compute_per_rank, self.span)

    def costs(self, sizes: Sequence[int]) -> Costs:
        mean = sum(sizes) / len(sizes)
        return Costs(
            self.forward,
            self.backward,
            self.backward_input,
            self.weight,
            self.comm,
            [s / mean for s in sizes],
            post=self.post,
        )


def _mean(xs: Sequence[float]) -> float:
    """Per-action costs are averaged, not medianed: a step is a sum of many actions, and a
    sum's typical value is n x the mean; the median of a right-skewed cost (a descheduled
    process, a slow gloo post) underestimates it (measured: interleaved m=8 on 2 CPU ranks
    was reconstructed 19% short with medians, 4% with means)."""
    return statistics.fmean(xs) if xs else 0.0


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def measure(per_rank: Sequence[Sequence[Event]], sched: Schedule, sizes: Sequence[int]) -> Measured:
    """Costs per stage (per unit microbatch size) and bubbles per rank from recorded steps."""
    mean = sum(sizes) / len(sizes)
    S = sched.num_stages
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    waits: dict[tuple[int, int, str], float] = {}  # (step, rank, receive) -> blocked seconds
    posts: list[float] = []
    sent_at: dict[tuple[int, str], float] = {}  # (step, message) -> when its send was posted
    arrivals: dict[int, list[float]] = defaultdict(list)  # boundary -> observed transfer times
    # per step kind, per rank: step -> seconds (DP may record several waits in one step)
    fixed: dict[str, list[dict[int, float]]] = {
        k: [defaultdict(float) for _ in per_rank] for k in STEP_KINDS
    }
    for rank, evs in enumerate(per_rank):
        for step, label, kind, start, end in evs:
            if kind == "wait":
                waits[(step, rank, label)] = waits.get((step, rank, label), 0.0) + (end - start)
            elif kind == "comm":
                posts.append(end - start)
                for a in label:
                    if a.op.is_send:
                        sent_at[(step, _msg_key(a))] = start
            elif kind in fixed:
                fixed[kind][rank][step] += end - start
    bounds: dict[int, list[float]] = defaultdict(list)  # transfers that did not block
    for rank, evs in enumerate(per_rank):
        for step, label, kind, start, end in evs:
            if kind == "wait":
                # A receive that blocked ended when the data arrived: transfer = end - send.
                # One that did not only bounds it: transfer <= start - send.
                a = label
                t_sent = sent_at.get((step, _msg_key(a)))
                if t_sent is None:
                    continue
                scale = sizes[a.mb] / mean
                if end - start > BLOCKED:
                    arrivals[_msg_key(a)[1]].append(max(0.0, end - t_sent) / scale)
                else:
                    bounds[_msg_key(a)[1]].append(max(0.0, start - t_sent) / scale)
            if kind in COMPUTE_KINDS:
                a = label
                blocked = waits.get((step, rank, _receive_of(a, kind)), 0.0) if kind != "W" else 0.0
                durations[(kind, a.stage)].append((end - start - blocked) / (sizes[a.mb] / mean))

    def per_stage(kind: str) -> list[float]:
        return [_mean(durations[(kind, s)]) for s in range(S)]

    def per_rank_median(kind: str) -> list[float]:
        return [_median(list(steps.values())) for steps in fixed[kind]]

    fwd, bwd, inp, wgt = per_stage("F"), per_stage("B"), per_stage("I"), per_stage("W")
    if any(inp):  # zero-bubble: B is I + W
        bwd = [i + w for i, w in zip(inp, wgt)]
    else:
        inp, wgt = [b / 2 for b in bwd], [b / 2 for b in bwd]
    comm = [
        _mean(arrivals[b]) if arrivals[b] else min(bounds[b], default=0.0) for b in range(S - 1)
    ]
    span, compute = _spans(per_rank)
    return Measured(
        forward=fwd,
        backward=bwd,
        backward_input=inp,
        weight=wgt,
        comm=comm,
        post=_mean(posts),
        optimizer=per_rank_median("OPT"),
        sync=per_rank_median("SYNC"),
        weight_decay=per_rank_median("L2"),
        dp_wait=per_rank_median("DP"),
        bubble=[idle_share([c], span) for c in compute],
        span=span,
        compute_per_rank=compute,
    )


def _spans(per_rank: Sequence[Sequence[Event]]) -> tuple[float, list[float]]:
    """Median over steps of the schedule's span (all ranks) and of each rank's compute in it
    (blocked receives inside an action are not compute): what the bubbles are made of."""
    steps = sorted({e[0] for evs in per_rank for e in evs})
    spans, busy = [], [[] for _ in per_rank]
    for step in steps:
        sched_evs = [
            (r, e)
            for r, evs in enumerate(per_rank)
            for e in evs
            if e[0] == step and e[2] not in STEP_KINDS
        ]
        if not sched_evs:
            continue
        lo = min(e[3] for _, e in sched_evs)
        hi = max(e[4] for _, e in sched_evs)
        spans.append(hi - lo)
        for r in range(len(per_rank)):
            comp = sum(e[4] - e[3] for rr, e in sched_evs if rr == r and e[2] in COMPUTE_KINDS)
            blocked = sum(e[4] - e[3] for rr, e in sched_evs if rr == r and e[2] == "wait")
            busy[r].append(comp - blocked)
    return _median(spans), [_median(b) for b in busy]


def label_text(label: Label) -> str:
    """How an event is written (trace.json, pictures): "2F0", "0SEND_F0 0RECV_B1", "OPT"."""
    return " ".join(map(str, label)) if isinstance(label, tuple) else str(label)


def _receive_of(a: Action, kind: str) -> Action:
    """The receive a compute action of `kind` waits on: F its input, B/I its gradient."""
    from splitgraph.schedule.ir import RECV_B, RECV_F

    return Action(a.stage, RECV_F if kind == "F" else RECV_B, a.mb)


def _msg_key(a: Action) -> tuple[str, int, int]:
    from splitgraph.schedule.ir import message

    return message(a)


def reconstruct(measured: Measured, sched: Schedule, sizes: Sequence[int]) -> SimResult:
    """The simulator fed with the run's own measured costs: a reconstruction of the run (it
    checks the simulator's structure), not a prediction (made before the run, from what the
    planner knows: `splitgraph-plan`, docs/prediction.md)."""
    return simulate(sched, measured.costs(sizes))


BUBBLE_DEFINITION = (
    "idle share of all ranks' time over the schedule's span (first action to last): "
    "1 - sum(compute) / (ranks x span); the step's fixed costs after the span are not in it"
)


@dataclass(frozen=True)
class Bubbles:
    """A run's bubble, measured and reconstructed (both simulate.idle_share), and the schedule's
    at equal stage costs without transfers; `text` is how the log and the picture print one."""

    measured: float
    reconstructed: float
    unit_costs: float

    @staticmethod
    def text(bubble: float) -> str:
        return f"bubble {bubble:.1%}"


class TraceWindow:
    """Turns recording on for a window of steps, and turns the records into outputs.

    `before_step(step)` on every rank each step (the window starts with one barrier, so all
    ranks share the reference instant); `finish(...)` once at the end: rank 0 gathers the
    events, writes trace.json and timeline.png (unless trace.picture=false), and returns the
    summary's `timeline` entry.
    """

    def __init__(self, trace: TraceConfig, tracer: Tracer | None, total_steps: int) -> None:
        self.tracer = tracer
        self.picture = bool(trace.picture)
        self.first = min(trace.warmup, max(total_steps - 1, 0))
        self.last = self.first + trace.steps  # exclusive

    def before_step(self, step: int) -> None:
        import torch.distributed as dist

        tr = self.tracer
        if tr is None or not tr.enabled:
            return
        if step == self.first:
            tr.quiesce()
            if dist.is_initialized():
                dist.barrier()
            tr.set_reference()
            tr.active = True
        elif step == self.last:
            tr.active = False

    def finish(
        self,
        run_dir: Any,
        is_main: bool,
        sched: Schedule,
        sizes: Sequence[int],
        step_times: Sequence[float],
        ranks: Sequence[int] | None = None,
    ) -> dict[str, Any] | None:
        """`ranks`: the global ranks of the pipeline to report, in pipeline order (with data
        parallelism, replica 0's; default: every rank)."""
        import json

        import torch.distributed as dist

        if self.tracer is None or not self.tracer.enabled:
            return None
        self.tracer.active = False
        events = self.tracer.events
        if dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.gather_object(events, gathered if is_main else None, dst=0)
        else:
            gathered = [events]
        if is_main and ranks is not None:
            gathered = [gathered[r] for r in ranks]
        if not is_main or not any(gathered):
            return None
        from pathlib import Path

        out = Path(run_dir)
        (out / "trace.json").write_text(
            json.dumps(chrome_trace(gathered, {"schedule": sched.name}))
        )
        measured = measure(gathered, sched, sizes)
        sim = reconstruct(measured, sched, sizes)
        # The step = the schedule's span + its fixed costs: the slowest rank's weight decay,
        # the step sum's own latency (the rank that arrives last waits for nothing
        # else: the minimum over ranks), the slowest rank's optimizer step, and with dp the
        # longest wait on the gradients.
        fixed = {
            "weight_decay_s": max(measured.weight_decay, default=0.0),
            "step_sum_s": min(measured.sync, default=0.0),
            "optimizer_s": max(measured.optimizer, default=0.0),
            "gradient_allreduce_wait_s": max(measured.dp_wait, default=0.0),
        }
        window = list(step_times[self.first : self.last])
        step_measured = _median(window)
        step_reconstructed = sim.step_time + sum(fixed.values())
        # the same schedule at equal stage costs (F=1, B=2) and no transfers: the README's
        # closed forms, for reference beside what this run's costs give
        unit = simulate(sched, Costs.uniform(sched.num_stages, 1.0, 2.0)).bubble_fraction
        bubbles = Bubbles(measured.bubble_fraction, sim.bubble_fraction, unit)
        picture = "timeline.png" if self.picture else None
        if picture:
            _draw(out / picture, gathered, sched, sim, measured, fixed, bubbles)
        log.info(
            "timeline: median traced step %.2f ms (schedule span %.2f ms, %s); reconstructed "
            "from its measured costs %.2f ms (span %.2f ms, %s); %s",
            step_measured * 1e3,
            measured.span * 1e3,
            bubbles.text(bubbles.measured),
            step_reconstructed * 1e3,
            sim.step_time * 1e3,
            bubbles.text(bubbles.reconstructed),
            picture or "no picture (trace.picture=false)",
        )
        return _timeline_record(
            picture,
            [self.first, self.first + len(window) - 1],
            step_measured,
            step_reconstructed,
            measured,
            sim,
            fixed,
            bubbles,
        )


def _timeline_record(
    picture: str | None,
    steps_traced: list[int],
    step_measured: float,
    step_reconstructed: float,
    measured: Measured,
    sim: SimResult,
    fixed: dict[str, float],
    bubbles: Bubbles,
) -> dict[str, Any]:
    """summary.json's `timeline`: what was measured, the costs, and the step they reconstruct
    (the simulator fed with them; a prediction is made before the run, not from it)."""
    return {
        "steps_traced": steps_traced,
        "trace": "trace.json",
        "picture": picture,  # None: trace.picture=false
        "measured": {
            "step_time_median_s": step_measured,
            "schedule_span_median_s": measured.span,
            "bubble": bubbles.measured,
            "bubble_per_rank": measured.bubble,
            "compute_per_rank_s": measured.compute_per_rank,
            "optimizer_per_rank_s": measured.optimizer,
            "step_sum_per_rank_s": measured.sync,
            "weight_decay_per_rank_s": measured.weight_decay,
            "gradient_allreduce_wait_per_rank_s": measured.dp_wait,
        },
        "costs_per_stage_s": {
            "forward": measured.forward,
            "backward": measured.backward,
            "backward_input": measured.backward_input,
            "weight": measured.weight,
            "comm_per_boundary": measured.comm,
            "post_per_transfer_group": measured.post,
        },
        "reconstructed": {
            "step_time_s": step_reconstructed,
            "schedule_span_s": sim.step_time,
            "fixed_per_step_s": fixed,
            "bubble": bubbles.reconstructed,
            "bubble_per_rank": sim.bubble,
        },
        "bubble_at_unit_costs": bubbles.unit_costs,
        "bubble_definition": BUBBLE_DEFINITION,
        "measured_over_reconstructed_step_time": (
            step_measured / step_reconstructed if step_reconstructed > 0 else None
        ),
        # the simulator's own part: the schedule's span, first action to last
        "measured_over_reconstructed_span": (
            measured.span / sim.step_time if sim.step_time > 0 else None
        ),
    }


def _draw(
    path: Any,
    gathered: Sequence[Sequence[Event]],
    sched: Schedule,
    sim: SimResult,
    measured: Measured,
    fixed: dict[str, float],
    bubbles: Bubbles,
) -> None:
    """timeline.png: the reconstruction above the traced step of median span, each from the start
    of its schedule on one time axis, each step's fixed costs after its span; waits drawn
    apart from work (the compute boxes start when their data arrived, and the step sum's wait
    for the last rank is a wait); the bubble as the log and summary.json give it."""
    from splitgraph.observe.timeline import Panel, draw

    step = _median_step(gathered)
    meas, lo, hi = _measured_boxes(gathered, step)
    pred, t = _reconstructed_boxes(sched, sim, fixed)
    per_rank = sched.num_stages // sched.num_ranks
    draw(
        [
            Panel(
                f"reconstructed from this run's measured costs: step {t * 1e3:.2f} ms, schedule "
                f"span {sim.step_time * 1e3:.2f} ms, {Bubbles.text(bubbles.reconstructed)}",
                pred,
                sched.num_ranks,
                per_rank,
                t0=0.0,
                span_end=sim.step_time,
            ),
            Panel(
                f"measured: step {step}, the traced step of median span; median span "
                f"{measured.span * 1e3:.2f} ms, {Bubbles.text(bubbles.measured)}",
                meas,
                sched.num_ranks,
                per_rank,
                t0=lo,
                span_end=hi,
            ),
        ],
        path,
        suptitle=f"{sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
        f"{sched.num_microbatches} microbatches. Bubble: idle share of the ranks' time in the "
        f"schedule's span ({Bubbles.text(bubbles.unit_costs)} at equal stage costs without "
        "transfers)",
    )


def _median_step(gathered: Sequence[Sequence[Event]]) -> int:
    """The traced step whose schedule span is the median one."""
    steps = sorted({e[0] for evs in gathered for e in evs})
    spans = []
    for step in steps:
        evs = [e for row in gathered for e in row if e[0] == step and e[2] not in STEP_KINDS]
        if evs:
            spans.append((max(e[4] for e in evs) - min(e[3] for e in evs), step))
    spans.sort()
    return spans[len(spans) // 2][1] if spans else 0


def _measured_boxes(
    gathered: Sequence[Sequence[Event]], step: int
) -> tuple[list[Any], float, float]:
    """The boxes of one traced step, waits apart from work (a compute box starts when its
    data arrived; the step sum's wait for the last rank is a wait), and its span."""
    from splitgraph.observe.timeline import Box

    in_sched = [e for row in gathered for e in row if e[0] == step and e[2] not in STEP_KINDS]
    lo = min((e[3] for e in in_sched), default=0.0)
    hi = max((e[4] for e in in_sched), default=0.0)
    # the step sum ends for nobody before the last rank enters it: until then, a rank waits
    sync_in = [e[3] for row in gathered for e in row if e[0] == step and e[2] == "SYNC"]
    last_in = max(sync_in, default=None)
    meas = []
    for r, row in enumerate(gathered):
        evs = [e for e in row if e[0] == step]
        waits = {e[1]: e for e in evs if e[2] == "wait"}
        for _, label, kind, start, end in evs:
            if kind in ("F", "B", "I"):  # draw the compute, not the wait inside the action
                w = waits.get(_receive_of(label, kind))
                if w is not None and start <= w[3] <= end:
                    start = min(w[4], end)
            elif kind == "SYNC" and last_in is not None and last_in > start:
                meas.append(Box(r, "step sum: wait", "wait", start, min(last_in, end)))
                start = min(last_in, end)
            meas.append(Box(r, label_text(label), kind, start, end))
    return meas, lo, hi


def _reconstructed_boxes(
    sched: Schedule, sim: SimResult, fixed: dict[str, float]
) -> tuple[list[Any], float]:
    """The simulated schedule, then the fixed costs it adds in the run's order; the end."""
    from splitgraph.observe.timeline import Box

    pred = [
        Box(e.rank, str(e.action), e.action.op.value, e.start, e.end)
        for row in sim.events
        for e in row
    ]
    t = sim.step_time
    for kind, key in (
        ("DP", "gradient_allreduce_wait_s"),
        ("L2", "weight_decay_s"),
        ("SYNC", "step_sum_s"),
        ("OPT", "optimizer_s"),
    ):
        if fixed.get(key, 0.0) > 0:
            pred += [Box(r, kind, kind, t, t + fixed[key]) for r in range(sched.num_ranks)]
            t += fixed[key]
    return pred, t
