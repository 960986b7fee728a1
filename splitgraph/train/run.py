"""Train the MLP split by layer into pipeline stages: the torchrun entry point.

    torchrun --standalone --nproc-per-node 4 -m splitgraph.train schedule=1f1b \
        pipeline.microbatches=8
    torchrun --standalone --nproc-per-node 2 -m splitgraph.train partition=params \
        model.hidden=[512,512,256] runtime.dtype=float64
    python -m splitgraph.train                  # one process: plain single-device training
    python -m splitgraph.train --help           # usage, flags, common overrides

Several nodes (run the same line on each; c10d rendezvous):

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --rdzv-id myjob -m splitgraph.train

Data x pipeline parallel (world size = parallel.dp x pipeline.stages; a ("dp", "pp")
DeviceMesh, each replica a pipeline of consecutive ranks fed B/dp rows of every minibatch):

    torchrun --standalone --nproc-per-node 4 -m splitgraph.train parallel.dp=2   # 2 x 2

What happens, top to bottom:
  1. every rank composes the config and runs `validate`, loads its data (if it holds the first
     or last stage) and its share of a checkpoint to resume from, *before* the process group
     exists, so a bad run exits at once with one clear message instead of hanging;
  2. the process group starts with `runtime.timeout` bounding every wait;
  3. every rank builds the mesh, the same plan and schedule (rank 0 prints them), then its own
     stages;
  4. each step runs the schedule on this replica's rows (gradients summed over replicas); L, s
     and the numerical guard's count of non-finite values are summed across ranks; a
     non-finite value stops every rank before the optimizer step;
  5. every `checkpoint.every` steps and at the end, all ranks write a checkpoint (DCP, atomic);
     `checkpoint.resume=auto` starts from the newest one on whatever layout this launch has;
  6. rank 0 writes metrics.jsonl, summary.json (with the measured timeline and the planner's
     prediction), trace.json, timeline.png and a consolidated model.pt in the run dir.

A hang watchdog (runtime.hang_timeout) stops the job with the schedule grid of where each rank
waits (exit code 3); `torchrun --max-restarts=N` then restarts it from its last checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from splitgraph.config import (
    CheckpointConfig,
    Config,
    TrainConfig,
    Workload,
    as_container,
    register_configs,
    register_resolvers,
    typed,
    validate,
)
from splitgraph.data import BatchOrder, Dataset, load_dataset, replica_rows
from splitgraph.errors import CheckpointError, OutOfMemory, SplitgraphError
from splitgraph.observe.memory import cuda_memory, draw_memory_over_time, peak_rss_bytes
from splitgraph.observe.nvml import NvmlSampler
from splitgraph.observe.trace import Tracer, TraceWindow, make_tracer
from splitgraph.partition import make_plan
from splitgraph.planner.check import (
    compare,
    measure_link,
    same_schedule_everywhere,
    shared_plan,
)
from splitgraph.reliability import checkpoint, memcap, preflight, runlock
from splitgraph.reliability.faults import Fault, restart_attempt
from splitgraph.reliability.signals import (
    EXIT_STOPPED,
    Stopped,
    StopSignals,
    exit_at_once_while_starting,
    write_stop_file,
)
from splitgraph.reliability.watchdog import Watchdog, default_store
from splitgraph.runtime.dist import DistEnv, Placement, init_process_group, pin_loopback, place
from splitgraph.runtime.engine import PipelineEngine, schedule_for_run
from splitgraph.runtime.executor import InjectedFault
from splitgraph.runtime.guard import FiniteGuard, raise_if_any
from splitgraph.runtime.mesh import Layout, build_mesh, layout_of
from splitgraph.runtime.stepsum import StepSum
from splitgraph.schedule import SCHEDULES, Schedule
from splitgraph.train.evaluate import evaluate

log = logging.getLogger("splitgraph")


def run(cfg: DictConfig | Config, env: DistEnv | None = None) -> dict[str, Any] | None:
    """Train as configured on this process's rank; rank 0 returns the summary.

    The entrance: the composed config is completed (data=file shapes), validated and turned
    into the typed `Config` once; everything below takes typed sections. Creates the process
    group from torchrun's environment unless one exists already (`run_ranks` in tests makes
    one with a FileStore and passes `env`).
    """
    env = env or DistEnv.from_environ()
    node = preflight.node_ranks(env.rank, env.local_rank, env.local_world_size)
    # data=file: the bound, then the shape
    found = preflight.resolve_data(cfg.data, Workload.of(cfg), env.world_size, node)
    if found and env.rank == 0:
        log.info("%s", found)
    validate(cfg, env.world_size)
    config = typed(cfg)
    # One job per run dir, before anything is written; SIGINT/SIGTERM stop at a step boundary.
    with (
        runlock.hold(config.run_dir, env.rank),
        StopSignals(env.rank, on_abort=runlock.release_all) as signals,
    ):
        return _run(config, env, node, signals)


def _run(cfg: Config, env: DistEnv, node: range, signals: StopSignals) -> dict[str, Any] | None:
    """Before the process group: placement, plan, pre-flight, data and checkpoints."""
    placement = place(cfg.runtime, env.local_rank, env.local_world_size)
    device = placement.device
    if cfg.runtime.threads is not None:
        torch.set_num_threads(cfg.runtime.threads)
    torch.backends.cuda.matmul.allow_tf32 = cfg.runtime.tf32
    torch.backends.cudnn.allow_tf32 = cfg.runtime.tf32
    cap = memcap.cap_bytes(cfg.pipeline)
    memcap.apply_cuda_cap(cap, device)  # GPU: the allocator enforces it
    record = _Record(Path(cfg.run_dir), cfg, env, cap)

    # Data and checkpoints are read before the process group exists: a bad file stops this
    # rank at once, and torchrun then stops the others.
    work = Workload.of(cfg)  # what the planner, pre-flight and the engine read
    layout = layout_of(cfg.pipeline, cfg.parallel, env.world_size)
    # the plan placed as the schedule places its stages (V: stage s and 2p-1-s on rank s;
    # auto chooses its placement with its order, from the planner's costs)
    schedule, plan = schedule_for_run(work, layout.pp, make_plan(work, layout.pp))
    try:  # the data file's header and the model's bytes, before either is allocated
        devices = preflight.node_devices(cfg.runtime, len(node))
        preflight.check_launch(cfg.data, work, layout, plan, node, devices, schedule=schedule)
    except OutOfMemory as e:
        # Every rank reaches this verdict alone and exits; torchrun may stop rank 0 before it
        # writes summary.json, so each rank leaves the record the harness reads (atomically).
        memcap.write_oom(record.run_dir, e)
        phase = "before any parameter is allocated"
        raise record.out_of_memory(e, torch.device("cpu"), phase) from None
    _, pp_rank = layout.coords(env.rank)
    needs_data = pp_rank in (plan.rank_of(0), plan.rank_of(plan.num_stages - 1))
    dataset = load_dataset(cfg.data, work) if needs_data else None
    if dataset is not None and env.rank == 0:
        log.info("%s", dataset.describe())
    init_state = None
    if cfg.checkpoint.init_from:
        init_state = checkpoint.load_model_pt(cfg.checkpoint.init_from, cfg.model)
    resume = None
    ident = checkpoint.identity(cfg)  # what a resumed checkpoint must match
    # rank 0 moves damaged ones aside
    found = checkpoint.find_resume(cfg.checkpoint, cfg.model, ident, quarantine=env.rank == 0)
    if found is not None:
        ck, meta = found
        names = checkpoint.names_held(cfg.model, plan, pp_rank)  # every replica loads the same
        resume = checkpoint.read_rank_state(ck, meta, names, env.rank)

    own_group = env.world_size > 1 and not dist.is_initialized()
    if own_group:
        pin_loopback()  # a one-node launch keeps gloo/NCCL sockets on the loopback interface
        init_process_group(placement.backend, cfg.runtime.timeout, device)
    try:
        # an allocator's refusal outside the steps (building the engine, moving the data to
        # the device) stops the run as "oom" too; those in a step say which (_train)
        with record.stop_on_oom(device, lambda: OUTSIDE_STEPS):
            summary = _train(
                cfg, env, layout, placement, dataset, init_state, resume, signals, schedule
            )
        if dist.is_initialized():
            dist.barrier()  # nobody tears down its connections while a peer still reads
        return summary
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: DictConfig | Config,
    env: DistEnv,
    layout: Layout,
    placement: Placement,
    dataset: Dataset | None,
    init_state: dict[str, torch.Tensor] | None,
    resume: checkpoint.RankState | None = None,
    signals: StopSignals | None = None,
    schedule: Schedule | None = None,
) -> dict[str, Any] | None:
    """Set up, run the steps, summarize: the three phases of a training run.

    _setup    the engine (weights, resume) and its collaborators: data order, fault,
              guard, watchdog, NVML sampler, tracer, step sum, metrics file, progress bar
    _step     one step (x steps), each of its parts a named function below
    _finish   the cost report, every rank's memory gathered, model.pt, summary.json
    """
    signals = signals or StopSignals(env.rank)  # not entered: only reports what it never sees
    run = _setup(typed(cfg), env, layout, placement, dataset, init_state, resume, schedule)
    st = _Progress(step=run.start, last_saved=run.resumed_from)
    signals.last_saved, signals.phase = st.last_saved, "training"
    try:
        st.accounted = memcap.check_all_ranks(
            run.engine, run.record.cap, False, "before the first step"
        )
        for step in range(run.start, run.steps):
            st.step = step
            if not _step(run, st, signals, step):
                break
    except Exception as e:  # the allocator's refusal, wherever in the step it came from
        oom = _oom_in(e)
        if oom is None:
            raise
        raise run.record.out_of_memory(oom, run.device, f"at step {st.step}") from e
    finally:
        signals.phase = "finishing"  # a first signal is now only noted; a second stops
        run.close()
    if st.signalled:
        run.record.stopped(
            run.resume_mode, st.signalled, st.step + 1, run.start, len(st.step_times), st.last_saved
        )
    return _finish(run, st)


@dataclass
class _Run:
    """What `_setup` builds and the steps use: the engine and its collaborators."""

    config: Config  # typed: the steps read its sections, the cost report all of it
    record: _Record
    env: DistEnv
    layout: Layout
    placement: Placement
    engine: PipelineEngine
    dataset: Dataset | None
    order: BatchOrder | None
    steps: int  # the step the run ends at
    start: int  # the step it starts at (a resume's)
    resumed_from: str | None  # the checkpoint resumed from
    host_batches: bool  # data.on_device=false on a GPU: each batch copied from pinned host
    fault: Fault
    guard: FiniteGuard
    watchdog: Watchdog
    sampler: NvmlSampler | None
    tracer: Tracer
    window: TraceWindow
    step_sum: StepSum
    metrics_file: Any
    bar: Any

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def resume_mode(self) -> str:
        return self.config.checkpoint.resume

    def close(self) -> None:
        self.watchdog.stop()
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


@dataclass
class _Progress:
    """What the steps change: times, the stop decisions, the last checkpoint."""

    step: int
    last_saved: str | None
    step_times: list[float] = field(default_factory=list)
    dp_waits: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    stopped_by: str | None = None  # "time_budget"
    signalled: str | None = None  # "SIGTERM" / "SIGINT"
    accounted: list[dict[str, Any]] = field(default_factory=list)


def _setup(
    cfg: Config,
    env: DistEnv,
    layout: Layout,
    placement: Placement,
    dataset: Dataset | None,
    init_state: dict[str, torch.Tensor] | None,
    resume: checkpoint.RankState | None,
    schedule: Schedule | None = None,
) -> _Run:
    """The engine (initial or resumed weights), the data on the device, and every
    collaborator of the steps; rank 0 announces the plan. `schedule`: the run's, built
    before the process group (`schedule_for_run`; None: the engine builds it)."""
    device, backend = placement.device, placement.backend
    torch.manual_seed(cfg.train.seed)
    tracer = make_tracer(device, enabled=cfg.trace.enabled)
    engine = _engine(Workload.of(cfg), layout, placement, tracer, schedule)
    guard = engine.guard
    assert guard is not None  # asked for: nan_check
    if init_state is not None:
        engine.load_state_dict(init_state, source=str(cfg.checkpoint.init_from))
    start = 0
    if resume is not None:  # weights, optimizer state and RNG as saved; the data order follows
        checkpoint.apply_state(engine, resume, cfg.optim.name)
        start = resume.checkpoint.step
        engine.p2p.step = start
    run_dir = Path(cfg.run_dir)
    on_device = cfg.data.on_device or device.type == "cpu"
    dataset, order, steps = _data_order(
        cfg.train, cfg.data.shuffle, dataset, engine, layout, on_device
    )
    if start > steps:
        raise CheckpointError(
            f"checkpoint {resume.checkpoint.path if resume else ''} is at step {start}, beyond "
            f"this run's {steps} steps. Raise train.steps or use checkpoint.resume=never."
        )
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _announce(cfg.checkpoint, engine, env, layout, backend, device, steps, start, resume)
    rt = cfg.runtime
    watchdog = Watchdog(
        engine.schedule,
        env.rank,
        env.world_size,
        float(rt.hang_timeout or rt.timeout / 2),
        engine.executor,
        store=default_store(str(restart_attempt())),
        report_path=run_dir / "hang_report.txt",
        pp_rank=engine.rank,
    ).start()
    sampler = (
        NvmlSampler(device.index or 0, rt.nvml_interval).start() if device.type == "cuda" else None
    )
    wait = timedelta(seconds=rt.timeout)
    return _Run(
        config=cfg,
        record=_Record(run_dir, cfg, env, memcap.cap_bytes(cfg.pipeline)),
        env=env,
        layout=layout,
        placement=placement,
        engine=engine,
        dataset=dataset,
        order=order,
        steps=steps,
        start=start,
        resumed_from=str(resume.checkpoint.path) if resume is not None else None,
        host_batches=not on_device,
        fault=Fault.from_config(cfg.debug),
        guard=guard,
        watchdog=watchdog,
        sampler=sampler,
        tracer=tracer,
        window=TraceWindow(cfg.trace, tracer, steps),
        step_sum=StepSum(backend, device, timeout=wait),  # may create a group: every rank
        metrics_file=_open_metrics(run_dir, start) if env.rank == 0 else None,
        bar=_progress(cfg.train.progress, steps, start) if env.rank == 0 else None,
    )


def _data_order(
    t: TrainConfig,
    shuffle: bool,
    dataset: Dataset | None,
    engine: PipelineEngine,
    layout: Layout,
    on_device: bool,
) -> tuple[Dataset | None, BatchOrder | None, int]:
    """The data in the engine's dtype (on the device, or on the host with on_device=false:
    each batch then pinned and copied async), its batch order, and the run's step count,
    which the rank holding stage 0 knows and tells the others."""
    order: BatchOrder | None = None
    steps = 0
    if dataset is not None:
        dataset = dataset.to(engine.dtype, engine.device if on_device else "cpu")
        order = BatchOrder(dataset.num_train, t.batch_size, shuffle, t.seed)
        steps = t.steps or (t.epochs or 0) * order.steps_per_epoch
    if layout.world_size > 1:
        box = [steps]
        dist.broadcast_object_list(box, src=layout.rank_at(0, engine.plan.rank_of(0)))
        steps = int(box[0])
    return dataset, order, steps


def _engine(
    work: Workload,
    layout: Layout,
    placement: Placement,
    tracer: Tracer,
    schedule: Schedule | None = None,
) -> PipelineEngine:
    """This rank's engine on rank 0's plan (and, for schedule=auto, the order every rank
    agrees it built); on a DeviceMesh when there are several ranks."""
    plan = shared_plan(work, layout.pp)  # rank 0's plan on every rank
    # auto and csv are built from what each rank reads (costs, a file); a generated schedule
    # is a function of (p, m, v), which validate already made equal everywhere
    built_from_files = SCHEDULES[work.schedule.name].generate is None
    if schedule is not None and built_from_files and layout.world_size > 1:
        same_schedule_everywhere(schedule)
    device, backend = placement.device, placement.backend
    if layout.world_size > 1:  # DeviceMesh's device type follows the backend (gloo: "cpu")
        wait = timedelta(seconds=work.runtime.timeout)  # every group's bound on a wait
        mesh = build_mesh(layout, "cuda" if backend == "nccl" else "cpu", timeout=wait)
        return PipelineEngine.from_mesh(
            work,
            mesh,
            device,
            transport=placement.transport,
            plan=plan,
            tracer=tracer,
            nan_check=work.runtime.nan_check,
            schedule=schedule,
        )
    return PipelineEngine(
        work,
        device=device,
        transport=placement.transport,
        plan=plan,
        tracer=tracer,
        nan_check=work.runtime.nan_check,
        schedule=schedule,
    )


# -- one step ------------------------------------------------------------------------------


def _step(run: _Run, st: _Progress, signals: StopSignals, step: int) -> bool:
    """One training step on every rank; False when the run stops after it.

    batch -> forward/backward (the schedule) -> guard + step sum (SYNC) -> [non-finite: stop
    every rank] -> optimizer -> memory re-check -> evaluation -> metrics -> checkpoint
    """
    engine, rank = run.engine, run.env.rank
    signals.step = step
    run.fault.send_signal(step, rank)
    run.window.before_step(step)
    x, y = _batch(run, step)
    run.watchdog.beat(step, "the schedule")
    run.guard.begin()
    t0 = time.perf_counter()
    try:
        stats = engine.forward_backward(x, y, fail_at=run.fault.program_index(step, rank))
    except InjectedFault as e:
        run.fault.surface(e)
    with run.tracer.span("step sum", "SYNC"):  # the step's fixed cost beside the optimizer
        bad = run.guard.finish()
        run.watchdog.beat(step, "the step sum of loss and flags")
        parts = _step_sum(run, st, signals, stats, bad, t0)  # ends when every rank has finished
    if parts[2] > 0:  # before the optimizer step: the weights stay finite
        _stop_non_finite(engine, run.guard, step, x, y, run.env.world_size, st.last_saved)
    engine.update()
    dt = time.perf_counter() - t0
    if engine.gradsync is not None:
        st.dp_waits.append(engine.gradsync.wait_s)
    st.step_times.append(dt)
    st.elapsed += dt
    if step == run.start:  # the saved-activation peak is now measured
        st.accounted = memcap.check_all_ranks(engine, run.record.cap, True, "after the first step")
    st.stopped_by = "time_budget" if parts[3] > 0 else None
    if (parts[4] > 0 or parts[5] > 0) and step + 1 < run.steps:  # (at the end: ends)
        st.signalled = "SIGTERM" if parts[4] > 0 else "SIGINT"
    evals = _maybe_evaluate(run, step, st.stopped_by)
    _log_step(run, st, step, float(parts[0]), float(parts[1]), dt, evals)
    _maybe_save(run, st, signals, step)
    return not (st.stopped_by or st.signalled)


def _batch(run: _Run, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """This replica's rows of the step's minibatch: inputs on the first stage's rank, targets
    on the last's (the injected `nan` fault poisons the inputs)."""
    if run.order is None or run.dataset is None:
        return None, None
    engine = run.engine
    idx = replica_rows(run.order.indices(step), engine.dp_rank, engine.dp)
    x = run.fault.poison(step, run.dataset.X[idx]) if engine.holds_first else None
    y = run.dataset.y[idx] if engine.holds_last else None
    if run.host_batches:  # data.on_device=false: pinned, copied async
        x, y = _to_device(x, run.device), _to_device(y, run.device)
    return x, y


def _step_sum(
    run: _Run, st: _Progress, signals: StopSignals, stats: Any, bad: float, t0: float
) -> torch.Tensor:
    """L, s, the guard's count of non-finite values, the time-budget verdict and the signal
    flags, summed over every rank: every rank then takes the same decisions."""
    budget = run.config.train.time_budget
    # rank 0 alone decides the time budget; the step sum tells every rank
    over = budget is not None and run.is_main and st.elapsed + time.perf_counter() - t0 >= budget
    # a signal on any rank: every rank learns it from the same sum, so all agree on the last
    # step however the signal reached them
    sig = signals.requested
    flags = [float(sig == signal.SIGTERM), float(sig == signal.SIGINT)]
    values = [stats.loss, stats.l2, bad, float(over), *flags]
    return run.step_sum(torch.tensor(values, dtype=torch.float64))


def _log_step(
    run: _Run, st: _Progress, step: int, L: float, s: float, dt: float, evals: dict[str, Any]
) -> None:
    """Rank 0: the step's line in metrics.jsonl and the progress bar."""
    batch = run.config.train.batch_size
    if run.metrics_file is not None:
        rec = {
            "step": step,
            "L": L,
            "J": L + s,
            "s": s,
            "step_time": dt,
            "samples_per_s": batch / dt,
            "samples": (step + 1) * batch,
            "elapsed": st.elapsed,
            **evals,
        }
        run.metrics_file.write(json.dumps(rec) + "\n")
        run.metrics_file.flush()
    if run.bar is not None:
        run.bar.update(1)
        if step % run.config.train.log_every == 0 or step == run.steps - 1:
            run.bar.set_postfix(L=f"{L:.4f}", J=f"{L + s:.4f}")


def _maybe_save(run: _Run, st: _Progress, signals: StopSignals, step: int) -> None:
    """Every checkpoint.every steps, at the end, and when a signal stops the run."""
    every = run.config.checkpoint.every
    done = step + 1
    ends = done == run.steps or st.stopped_by is not None
    if st.signalled or (every is not None and (done % every == 0 or ends)):
        with run.watchdog.paused("saving a checkpoint"):
            st.last_saved = _save(run, done)
        signals.last_saved = st.last_saved


# -- the summary -------------------------------------------------------------------------


def _finish(run: _Run, st: _Progress) -> dict[str, Any] | None:
    """After the last step: the trace, the cost report, every rank's memory gathered;
    rank 0 writes model.pt, summary.json and memory.png and returns the summary."""
    engine, env, device, s = run.engine, run.env, run.device, run.config
    trained_peaks = cuda_memory(device)  # the training's, before the report allocates
    if run.record.cap is not None and device.type == "cuda" and s.costs.report:
        # The cap bounds the training. The report's link measurement (16 MiB messages) and
        # layer profiling allocate beside the trained model and would fail under it.
        memcap.lift_cuda_cap(device)
        log.info("pipeline.memory_cap lifted after training for the cost report's measurements")
    timeline = run.window.finish(
        run.record.run_dir,
        run.is_main,
        engine.schedule,
        engine.sizes,
        st.step_times,
        ranks=run.layout.pipeline(0),
    )
    # the link prices the predicted times, which need one stage per rank; every rank takes part
    timed = s.costs.report and engine.plan.num_stages == engine.plan.num_ranks
    link = measure_link(engine) if timed else None
    memories, merged = _gather(engine, env, _memory_record(run, st, trained_peaks))
    if not run.is_main:
        return None
    comms = [{"rank": m["rank"], **m.pop("comm")} for m in memories]
    run_dir = run.record.run_dir
    if s.checkpoint.save:
        torch.save(merged, run_dir / "model.pt")
    final = _final_metrics(run_dir)
    if run.dataset is not None:  # rank 0 holds stage 0, so it has the held-out split
        ds = run.dataset
        scale = ds.target_std  # regression losses in the targets' own units
        final["test"] = evaluate(s.model, merged, ds.X_test, ds.y_test, engine.dtype, scale)
        final["train"] = evaluate(s.model, merged, ds.X, ds.y, engine.dtype, scale)
    summary = _summary(run, st, final, memories, comms, timeline)
    summary["prediction"] = (
        compare(engine, memories, timeline, st.step_times, link) if s.costs.report else None
    )
    summary["checkpoint"] = st.last_saved
    summary["torch"] = torch.__version__
    if run.placement.shared_gpu:
        summary["note"] = (
            "several ranks shared one GPU (transport: staged through host memory): timings "
            "are not those of separate GPUs"
        )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    draw_memory_over_time(memories, run_dir / "memory.png")
    test = "".join(
        f", test {k} {v:.4f}" for k, v in final.get("test", {}).items() if k != "samples"
    )
    log.info(
        "done: %s, median step %.4fs (%.0f samples/s)%s; outputs in %s",
        _steps_done_text(
            summary["steps"], run.steps, run.start, st.stopped_by, s.train.time_budget
        ),
        summary["step_time_median_s"],
        summary["samples_per_s_median"] or 0.0,
        test,
        run_dir,
    )
    return summary


def _memory_record(run: _Run, st: _Progress, trained_peaks: dict[str, Any]) -> dict[str, Any]:
    """This rank's memory and traffic figures, for summary.json's memory_per_rank."""
    engine, rank = run.engine, run.env.rank
    memory = {
        "rank": rank,
        "replica": engine.dp_rank,
        "stages": sorted(engine.stages),
        "saved_activation_peak_bytes": engine.meter.peak if engine.meter else None,
        "peak_rss_bytes": peak_rss_bytes(),
        **trained_peaks,
        "accounted": st.accounted[rank],
        "comm": _comm(engine, len(st.step_times)),
    }
    if run.sampler is not None:
        memory["nvml"] = run.sampler.stop()
    if st.dp_waits:  # seconds per step blocked on the gradient all-reduce (not hidden by overlap)
        memory["allreduce_wait_median_s"] = statistics.median(st.dp_waits[1:] or st.dp_waits)
    return memory


def _summary(
    run: _Run,
    st: _Progress,
    final: dict[str, Any],
    memories: list[Any],
    comms: list[dict[str, Any]],
    timeline: dict[str, Any] | None,
) -> dict[str, Any]:
    """summary.json's record of the run (rank 0), in its documented key order."""
    engine, layout, placement = run.engine, run.layout, run.placement
    steady = st.step_times[1:] if len(st.step_times) > 1 else st.step_times
    median = statistics.median(steady) if steady else float("nan")
    batch = run.config.train.batch_size
    return {
        "status": "ok",
        "config": run.record.config,
        "world_size": run.env.world_size,
        "parallel": {
            "dp": layout.dp,
            "pp": layout.pp,
            "replicas": [list(layout.pipeline(d)) for d in range(layout.dp)],
            "rows_per_replica": engine.local_batch,
            "overlap": run.config.parallel.overlap,
        },
        "backend": placement.backend if run.env.world_size > 1 else None,
        "device": str(placement.device),
        "transport": placement.transport,
        "shared_gpu": placement.shared_gpu,
        "plan": engine.plan.to_dict(),
        "schedule": {"name": engine.schedule.name, "microbatch_sizes": engine.sizes},
        "steps": run.start + len(st.step_times),
        "resumed_from_step": run.start or None,
        "steps_run": len(st.step_times),  # trained by this launch: steps start..steps-1
        "steps_per_epoch": run.order.steps_per_epoch if run.order is not None else None,
        "data": run.dataset.record() if run.dataset is not None else None,
        "stopped_by": st.stopped_by or "steps",
        "train_time_s": st.elapsed,
        "step_time_median_s": median,
        "samples_per_s_median": batch / median if median == median and median > 0 else None,
        "final": final,
        "memory_per_rank": memories,
        "comm_per_rank": comms,
        "timeline": timeline,
    }


@dataclass
class _Record:
    """Where a run that stops early leaves its record: summary.json (rank 0), the
    out-of-memory files, the stop file. Gives them the config as plain data."""

    run_dir: Path
    typed_config: Config
    env: DistEnv
    cap: int | None  # pipeline.memory_cap in bytes

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config, as summary.json records it: converted when a record is
        written (rank 0, after the steps or at a stop), not before the first step, where
        it cost ~0.1 s of CPU on every rank (tests/test_startup.py)."""
        return as_container(self.typed_config)

    def stopped(
        self,
        resume_mode: str,
        signame: str,
        step: int,
        start: int,
        steps_run: int,
        saved: str | None,
    ) -> None:
        """A signal stopped every rank after `step` steps and the checkpoint is committed:
        rank 0 records it (summary.json, one log line), every rank tells the launcher, and
        raises Stopped (exit code EXIT_STOPPED). The consolidated model.pt and the end-of-run
        reports are skipped: the run has not ended, and a preemption leaves little time."""
        how = "" if resume_mode.strip() == "auto" else ", checkpoint.resume=auto"
        fix = f"resume with the same command{how} and run_dir={self.run_dir}"
        stop = Stopped(signame, step, saved, fix)
        if self.env.rank == 0:
            summary = {
                "status": "stopped",
                "stopped_by": signame,
                "message": str(stop),
                "steps": step,
                "resumed_from_step": start or None,
                "steps_run": steps_run,
                "checkpoint": saved,
                "world_size": self.env.world_size,
                "config": self.config,
                "torch": torch.__version__,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.warning("%s", stop)
        write_stop_file(str(stop))
        raise stop

    @contextlib.contextmanager
    def stop_on_oom(self, device: torch.device, where: Callable[[], str]) -> Iterator[None]:
        """An out-of-memory error raised inside becomes the run's OutOfMemory stop (exit 3)."""
        try:
            yield
        except OutOfMemory:
            raise  # recorded where it was raised
        except Exception as e:
            oom = _oom_in(e)
            if oom is None:
                raise
            raise self.out_of_memory(oom, device, where()) from e

    def out_of_memory(self, e: BaseException, device: torch.device, phase: str) -> OutOfMemory:
        """Record an out-of-memory stop where the harness reads it; return the error to raise.

        CPU: every rank raised the same error together, so rank 0 writes summary.json with
        status "oom". GPU: only the rank whose allocator refused knows; it writes
        oom_rank<r>.json.
        """
        from_allocator = not isinstance(e, OutOfMemory)  # only this rank knows
        if not isinstance(e, OutOfMemory):
            allocated = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0
            e = memcap.from_cuda_oom(e, allocated, self.cap, self.env.rank, phase=phase)
        if from_allocator or device.type == "cuda":
            memcap.write_oom(self.run_dir, e)
        if self.env.rank == 0:
            summary = {**e.to_dict(), "config": self.config}
            summary["world_size"] = self.env.world_size
            # an OOM may come before the run dir exists
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return e


# -- memory cap, held-out evaluation, communication --------------------------------------


#: where an out-of-memory stop that no step caught happened
OUTSIDE_STEPS = "outside the training steps (building the engine, moving the data, the report)"
#: what the allocator raises (torch.cuda.OutOfMemoryError is the same class since torch 2.5)
_ALLOCATOR_OOM = (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError)


def _oom_in(e: BaseException) -> BaseException | None:
    """The out-of-memory error behind `e`, if any: `e` itself or a cause it wraps."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (OutOfMemory, *_ALLOCATOR_OOM)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _maybe_evaluate(run: _Run, step: int, stopped_by: str | None) -> dict[str, Any]:
    """Held-out metrics every `train.eval_every` steps and at the last step (rank 0 gets the
    consolidated weights; every rank must call this at the same steps). Not timed as training."""
    every = run.config.train.eval_every
    if every is None or not ((step + 1) % every == 0 or step == run.steps - 1 or stopped_by):
        return {}
    t0 = time.perf_counter()
    _, state = _gather(run.engine, run.env, {})
    ds = run.dataset
    if run.env.rank != 0 or ds is None:
        return {}
    model = run.config.model
    test = evaluate(model, state, ds.X_test, ds.y_test, run.engine.dtype, ds.target_std)
    out = {f"test_{k}": v for k, v in test.items() if k != "samples"}
    return {**out, "eval_time": time.perf_counter() - t0}


def _comm(engine: PipelineEngine, steps: int) -> dict[str, float]:
    """Point-to-point traffic this rank sent (activations and gradients), total and per step."""
    b, n = engine.p2p.bytes_sent, engine.p2p.messages_sent
    per = max(steps, 1)
    return {
        "bytes_sent": b,
        "messages_sent": n,
        "bytes_sent_per_step": b / per,
        "messages_sent_per_step": n / per,
    }


def _announce(
    ck: CheckpointConfig,
    engine: PipelineEngine,
    env: DistEnv,
    layout: Layout,
    backend: str,
    device: torch.device,
    steps: int,
    start: int,
    resume: checkpoint.RankState | None,
) -> None:
    """Rank 0 prints the plan, the schedule, and where a resume starts."""
    log.info("%s", engine.plan.table(engine.sizes[0]))
    if layout.dp > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        log.info("%s", layout.describe(per_node))
    log.info(
        "schedule %s: %d microbatches of %s samples on %d rank(s)%s, %s on %s; %d steps",
        engine.schedule.name,
        len(engine.sizes),
        _sizes_text(engine.sizes),
        layout.pp,
        f" x {layout.dp} replicas" if layout.dp > 1 else "",
        backend if env.world_size > 1 else "no process group",
        device,
        steps,
    )
    if ck.resume.strip() == "never" and ck.every is not None:
        earlier = checkpoint.list_checkpoints(ck.dir)
        if earlier:
            log.warning(
                "checkpoint.resume=never: ignoring the checkpoints in %s (newest: step %d); "
                "this run's saves replace those of the same step",
                ck.dir,
                earlier[-1].step,
            )
    if resume is not None:
        saved_plan = resume.checkpoint.meta.get("plan", {})
        saved = saved_plan.get("stages", [])
        was = saved_plan.get("placement", "round-robin")  # older markers: round robin
        log.info(
            "resumed from %s at step %d (saved on %d stages, %s placement; now %d, %s: "
            "tensors are read by layer name, so any layout loads)%s",
            resume.checkpoint.path,
            start,
            len(saved),
            was,
            engine.plan.num_stages,
            engine.plan.placement_name,
            ": already trained to train.steps; checkpoint.resume=never trains afresh"
            if start == steps
            else "",
        )


def _stop_non_finite(
    engine: PipelineEngine,
    guard: FiniteGuard,
    step: int,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    world_size: int,
    last_saved: str | None,
) -> None:
    """Every rank raises the same NonFiniteError; a cheap guard first replays the step with
    every check on (same weights, same minibatch) to name where the value appeared."""
    events, replay = _all_events(guard.events, world_size), None
    if not guard.full:
        guard.full = True
        guard.begin()
        engine.forward_backward(x, y)
        guard.finish()
        found = _all_events(guard.events, world_size)
        replay = f"located by replaying step {step} with runtime.nan_check=microbatch"
        if not found:
            replay = f"a replay of step {step} with every check on did not reproduce it"
        events = found or events
    raise_if_any(step, events, checkpoint.integrity_note(last_saved), replay)


def _save(run: _Run, done: int) -> str:
    """All ranks write the checkpoint after step `done` (atomic; rank 0 writes the marker)."""
    env, ck = run.env, run.config.checkpoint
    meta = None
    if run.is_main:
        spe = run.order.steps_per_epoch if run.order is not None else 0
        ident = checkpoint.identity(run.config)
        meta = checkpoint.marker(ident, run.engine, done, spe, env.world_size)
    path = checkpoint.save(
        run.engine,
        ck.dir,
        done,
        meta,
        ck.keep,
        env.rank,
        env.world_size,
        writer=run.fault.save_writer(done, env.rank),
    )
    return str(path)


def _gather(
    engine: PipelineEngine, env: DistEnv, memory: dict[str, Any]
) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """Rank 0: every rank's memory figures, and the consolidated state dict in layer order
    (from replica 0: the replicas hold the same weights)."""
    state = engine.state_dict() if engine.dp_rank == 0 else None
    if env.world_size > 1:
        memories: list[Any] = [None] * env.world_size
        states: list[Any] = [None] * env.world_size
        dist.gather_object(memory, memories if env.rank == 0 else None, dst=0)
        dist.gather_object(state, states if env.rank == 0 else None, dst=0)
    else:
        memories, states = [memory], [state]
    if env.rank != 0:
        return [], {}
    pairs = sorted(
        ((k, v) for st in states if st is not None for k, v in st.items()),
        key=lambda kv: _layer_key(kv[0]),
    )
    return memories, dict(pairs)


def _all_events(mine: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """The numerical guard's events of every rank, on every rank."""
    if world_size == 1:
        return list(mine)
    every: list[Any] = [None] * world_size
    dist.all_gather_object(every, mine)
    return [e for evs in every for e in evs]


def _to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Host batch -> device: pinned, then copied without blocking the host."""
    if t is None:
        return None
    return t.pin_memory().to(device, non_blocking=True)


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), parts[2]) if len(parts) == 3 and parts[1].isdigit() else (1 << 30, name)


def _steps_done_text(
    done: int, planned: int, start: int, stopped_by: str | None, budget: float | None
) -> str:
    """The log's count of steps: what ran, and why it stopped short of what was planned."""
    text = f"{done} step{'s' if done != 1 else ''}"
    text += f" ({done - start} in this launch)" if start else ""
    if stopped_by == "time_budget":
        text += f", stopped by train.time_budget={budget:g}s before the planned {planned}"
    return text


def _sizes_text(sizes: list[int]) -> str:
    return str(sizes[0]) if len(set(sizes)) == 1 else "/".join(map(str, sorted(set(sizes))))


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        return {}
    last = json.loads(lines[-1])
    return {"step": last["step"], "L": last["L"], "J": last["J"]}


def _open_metrics(run_dir: Path, start: int) -> Any:
    """metrics.jsonl; on a resume, the lines of the steps before `start` are kept."""
    path = run_dir / "metrics.jsonl"
    kept = []
    if start > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < start:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    f = open(path, "w")  # noqa: SIM115 - closed by _train
    f.writelines(kept)
    return f


def _progress(show: bool, steps: int, start: int = 0) -> Any:
    """Rank 0's progress bar (train.progress), or None."""
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(
        total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
    )


def _rank_overrides() -> list[str]:
    """Ranks other than 0 write nothing: no .hydra/ copy, no log file of their own."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra/hydra_logging=none"]


def exit_code(body: Callable[[], object]) -> int:
    """One rank's run as a launcher starts it (torchrun's ranks, the fork launcher's): 0, or
    the exit code after the rank's one line (EXIT_STOPPED: rank 0 logged the stop)."""
    try:
        body()
    except Stopped:  # rank 0 logged the line
        return EXIT_STOPPED
    except OutOfMemory as e:
        rank = os.environ.get("RANK", "0")
        print(f"splitgraph (rank {rank}): {e}", file=sys.stderr, flush=True)
        return memcap.EXIT_OOM
    except SplitgraphError as e:
        rank = os.environ.get("RANK", "0")
        print(f"splitgraph (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def _launch(nproc: int, rank_body: Callable[[], int]) -> int:
    """`splitgraph-train --nproc N`, inside Hydra's run (the config composed and checked once,
    the run dir's lock held, .hydra/ and train.log written as rank 0's): fork the N ranks
    from this process (train/fork.py), each running `rank_body` (the same run on this config);
    the launch's exit code."""
    import tempfile

    from splitgraph.runtime.dist import RENDEZVOUS_ENV
    from splitgraph.train import fork

    def rank_main(rank: int) -> int:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            GROUP_RANK="0",
            ROLE_RANK=str(rank),
            ROLE_WORLD_SIZE=str(nproc),
        )
        os.environ[RENDEZVOUS_ENV] = rendezvous
        if rank != 0:  # as torchrun's other ranks: the console only, no train.log
            root = logging.getLogger()
            for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(h)
        return rank_body()

    with tempfile.TemporaryDirectory(prefix="splitgraph-rendezvous-") as tmp:
        rendezvous = os.path.join(tmp, "store")
        return fork.fork_ranks(nproc, rank_main)


def main(nproc: int | None = None) -> None:
    """Console script and `python -m splitgraph.train`; `nproc`: fork that many ranks."""
    import hydra

    from splitgraph.train.compose import compose_once
    from splitgraph.train.fork import launching

    rank = int(os.environ.get("RANK", "0") or 0)
    exit_at_once_while_starting(rank, on_abort=runlock.release_all)  # until run() takes over
    register_configs()
    register_resolvers()
    sys.argv.extend(_rank_overrides())

    @hydra.main(version_base="1.3", config_path="pkg://splitgraph.conf", config_name="config")
    def _main(cfg: DictConfig) -> None:
        if nproc is None:
            code = exit_code(lambda: run(cfg))
        else:
            cfg.run_dir = str(cfg.run_dir)  # resolved once: every rank writes into one dir
            code = _launch(nproc, lambda: exit_code(lambda: run(cfg)))
        if code:
            sys.exit(code)

    # Hydra composes the config once, not twice (hydra.mode unset); with nproc, the launch
    # is checked before anything is written (train/fork.py)
    with compose_once(), launching(nproc):
        _main()


def cli(nproc: int | None = None) -> None:
    """Console script `splitgraph-train` and `python -m splitgraph.train` (train/cli.py parses
    `--nproc`): `main`, then out.

    A finished run leaves with os._exit after the atexit handlers (logging's flush among them)
    and a flush of stdout/stderr: every file it wrote is closed by then, and skipping the
    interpreter's teardown, which frees torch's (and DCP's) modules one by one, saves about a
    second per rank (splitgraph/bench/startup.py). Errors leave through sys.exit as before,
    except the fork launcher's, whose ranks are gone by then: it leaves the same quick way.
    """
    code = 0
    try:
        main(nproc)
    except SystemExit as e:
        if nproc is None:
            raise
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:  # not CPython: the ordinary exit
        sys.exit(code)
    run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
