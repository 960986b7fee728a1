"""Functions that run inside each rank of `run_ranks` for the GPU-path tests: the CPU build made
to behave, at one point each, as a GPU machine does (a device-bound process group, NCCL's one
queue per group, CUDA events on a busy device), so the fixes can be checked without one."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from splitgraph.config import Workload, load_config
from splitgraph.model import torch_dtype
from splitgraph.runtime.engine import PipelineEngine
from tests.reference import reference_grads
from tests.workers import GRID, _batch, make_cfg


def bound_mesh_worker(rank: int, world: int, store_path: str) -> tuple[int, ...]:
    """train.py's process-group set-up for ranks sharing a GPU (gloo, a CUDA device), then
    the mesh. The CPU build is made to look like a GPU machine where it matters: torch
    reports an accelerator, and a `device_id` given to `init_process_group` binds the group
    to a device, as it does on a GPU (torch's CPU build refuses to bind to a CUDA device)."""
    from splitgraph.runtime.dist import init_process_group
    from splitgraph.runtime.mesh import Layout, build_mesh

    dist.destroy_process_group()  # the harness's group: this rank makes its own below
    real_init = dist.init_process_group

    def init(**kwargs: Any) -> None:
        bound = kwargs.pop("device_id", None)
        store = dist.FileStore(store_path, world)
        real_init(store=store, rank=rank, world_size=world, **kwargs)
        if bound is not None:
            dist.distributed_c10d._get_default_group().bound_device_id = torch.device("cpu", 0)

    dist.init_process_group = init  # type: ignore[assignment]
    torch.cuda.set_device = lambda device: None  # type: ignore[assignment]
    torch.accelerator.is_available = lambda: True  # type: ignore[assignment]
    torch.accelerator.current_accelerator = lambda *a, **k: torch.device("cpu")  # type: ignore
    init_process_group("gloo", 60.0, torch.device("cuda", 0))
    mesh = build_mesh(Layout(1, world), "cpu")
    return tuple(mesh.get_coordinate())


class _Work:
    def __init__(self, timeout: float) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.timeout = timeout

    def wait(self) -> bool:
        if not self.done.wait(self.timeout):
            raise RuntimeError(
                f"not done after {self.timeout:.0f}s: queued behind another operation of its "
                "process group (NCCL would hang here)"
            )
        if self.error is not None:
            raise self.error
        return True


class OneQueuePerGroup:
    """NCCL's rule, on gloo: a process group's operations run one after another in the order
    they were issued (a communicator runs its kernels in order on one stream; torch adds that
    an eagerly initialised group serialises unbatched send/recv with all its other ops).
    Also records, per group, which (peer, direction) pairs it carried on this rank."""

    def __init__(self, timeout: float) -> None:
        self.real = {"send": dist.isend, "recv": dist.irecv}
        self.timeout = timeout
        self.queues: dict[int, queue.Queue[Any]] = {}
        self.carried: dict[int, set[tuple[int, str]]] = {}

    def install(self) -> None:
        dist.isend = lambda t, dst=None, group=None, tag=0: self._submit("send", t, dst, group, tag)  # type: ignore
        dist.irecv = lambda t, src=None, group=None, tag=0: self._submit("recv", t, src, group, tag)  # type: ignore

    def uninstall(self) -> None:
        dist.isend, dist.irecv = self.real["send"], self.real["recv"]  # type: ignore[assignment]

    def _submit(self, op: str, tensor: torch.Tensor, peer: int, group: Any, tag: int) -> _Work:
        key = id(group)
        self.carried.setdefault(key, set()).add((peer, op))
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = queue.Queue()
            threading.Thread(target=self._run, args=(q,), daemon=True).start()
        work = _Work(self.timeout)
        q.put((self.real[op], (tensor, peer, group, tag), work))
        return work

    @staticmethod
    def _run(q: queue.Queue[Any]) -> None:
        while True:
            fn, args, work = q.get()
            try:
                fn(*args).wait()
            except BaseException as e:  # handed to the waiter
                work.error = e
            work.done.set()


def nccl_rule_worker(rank: int, world: int, cases: list[list[str]]) -> dict[str, Any]:
    """Each case: one pipeline step under NCCL's one-queue-per-group rule, gradients against
    single-device PyTorch, and the (peer, direction) pairs each process group carried here."""
    base = load_config(GRID)
    rule = OneQueuePerGroup(timeout=20.0)
    rule.install()
    out: dict[str, Any] = {}
    try:
        for case in cases:
            cfg = make_cfg(base, case)
            dtype = torch_dtype(cfg.runtime.dtype)
            engine = PipelineEngine(Workload.of(cfg), rank, world, channels=True)
            x, y = _batch(cfg, dtype)
            rule.carried.clear()
            engine.forward_backward(x, y)
            want = reference_grads(cfg, x, y, dtype)
            for name, p in engine.named_parameters().items():
                assert p.grad is not None, name
                torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12)
            out[" ".join(case)] = sorted(sorted(v) for v in rule.carried.values())
    finally:
        rule.uninstall()
    return out


def link_worker(rank: int, world: int, transports: list[str]) -> list[dict[str, Any]]:
    """The end-of-run link measurement as train.py calls it, once per transport. On a GPU only
    the engine's own transport can move its tensors (NCCL refuses CPU tensors; gloo CUDA ones,
    hence staging), so the measurement must go through `engine.p2p`: every tensor it carries
    is recorded."""
    from splitgraph.planner.check import measure_link

    out = []
    for transport in transports:
        cfg = load_config([*GRID, "runtime.device=cpu", f"runtime.transport={transport}"])
        engine = PipelineEngine(Workload.of(cfg), rank, world)
        seen: list[tuple[str, str, int]] = []
        real_post = engine.p2p.post

        def post(transfers: list[Any], real_post: Any = real_post, seen: Any = seen) -> list[Any]:
            seen.extend((str(t.tensor.device), t.kind, t.peer) for t in transfers)
            return real_post(transfers)

        engine.p2p.post = post  # type: ignore[method-assign]
        counters = (engine.p2p.bytes_sent, engine.p2p.messages_sent)
        link = measure_link(engine)
        out.append(
            {
                "through_p2p": sorted(set(seen)),
                "p2p_class": type(engine.p2p).__name__,
                "counters_kept": counters == (engine.p2p.bytes_sent, engine.p2p.messages_sent),
                "bandwidth": link.bandwidth,
                "source": link.source,
            }
        )
    return out


def tracer_worker(rank: int, world: int, busy_s: float) -> float:
    """The CUDA tracer's reference with rank 1's device still busy when the window opens
    (`busy_s` of queued work): CUDA events and synchronize are stood in for by host clocks.
    Returns when (in this rank's trace time) an instant all ranks share happened."""
    from splitgraph.observe.trace import CudaTracer, TraceWindow

    state = {"busy_until": 0.0}

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = 0.0

        def record(self, stream: Any = None) -> None:  # after the work queued before it
            self.t = max(time.perf_counter(), state["busy_until"])

        def elapsed_time(self, other: Any) -> float:
            return (other.t - self.t) * 1e3

    def synchronize(device: Any = None) -> None:
        time.sleep(max(0.0, state["busy_until"] - time.perf_counter()))

    torch.cuda.Event = Event  # type: ignore[assignment,misc]
    torch.cuda.synchronize = synchronize  # type: ignore[assignment]
    cfg = load_config(["trace.warmup=0", "trace.steps=1"])
    tracer = CudaTracer(torch.device("cuda", 0))
    window = TraceWindow(cfg.trace, tracer, total_steps=2)
    dist.barrier()
    if rank == 1:  # the work this rank's device still has queued when the window opens
        state["busy_until"] = time.perf_counter() + busy_s
    window.before_step(0)  # opens the window: a barrier and the reference
    dist.barrier()  # every rank leaves this within a scheduler tick of the others
    tracer.step = 0
    tok = tracer.begin()
    tracer.end(tok, "0F0", "F")
    tracer.flush()
    return float(tracer.events[0][3])
