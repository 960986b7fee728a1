"""Process-group set-up: which device and backend a rank uses, with a timeout on every wait."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from splitgraph.config import Backend, Device, Transport

#: a file the fork launcher's ranks meet through (`splitgraph-train --nproc`, train/fork.py):
#: a FileStore, so no port is chosen, raced for or left listening
RENDEZVOUS_ENV = "SPLITGRAPH_RENDEZVOUS_FILE"


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells each process (defaults: one process, rank 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @staticmethod
    def from_environ() -> DistEnv:
        return DistEnv(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )


@dataclass(frozen=True)
class Placement:
    """Where a rank computes and how its transfers travel."""

    device: torch.device
    backend: str  # the process group's backend
    transport: str  # "direct" or "staged"
    shared_gpu: bool  # several ranks on one GPU: timings are not those of separate GPUs


def place(runtime_cfg: Any, local_rank: int, local_world_size: int) -> Placement:
    """Device, backend and transport for this rank.

    auto: CPU and gloo without CUDA; with CUDA, `cuda:LOCAL_RANK` and NCCL when every local
    rank has a GPU of its own; when they must share (more local ranks than GPUs, or a forced
    `runtime.transport=staged`), `cuda:LOCAL_RANK % GPUs` with gloo, device tensors staged
    through pinned host buffers (NCCL refuses two ranks on one GPU; gloo cannot send CUDA
    tensors).
    """
    want = Device(runtime_cfg.device)
    transport = Transport(runtime_cfg.transport)
    backend = Backend(runtime_cfg.backend)
    if want == Device.cpu or (want == Device.auto and not torch.cuda.is_available()):
        if transport == Transport.staged:
            # Staging on the CPU copies host to host: only useful to test the mechanism.
            return Placement(torch.device("cpu"), "gloo", "staged", False)
        chosen = "gloo" if backend == Backend.auto else backend.value
        return Placement(torch.device("cpu"), chosen, "direct", False)
    if not torch.cuda.is_available():
        raise RuntimeError(
            "runtime.device=cuda but torch sees no CUDA device; use runtime.device=cpu"
        )
    count = torch.cuda.device_count()
    shared = local_world_size > count
    if transport == Transport.direct and shared:
        raise RuntimeError(
            f"{local_world_size} ranks on this node but {count} GPU(s): NCCL refuses two ranks "
            f"on one GPU. Launch at most {count} processes per node, or use "
            "runtime.transport=staged (or auto) to share the GPU through host memory."
        )
    if transport == Transport.staged or shared:
        return Placement(torch.device("cuda", local_rank % count), "gloo", "staged", shared)
    chosen = "nccl" if backend == Backend.auto else backend.value
    return Placement(torch.device("cuda", local_rank), chosen, "direct", False)


def init_process_group(backend: str, timeout_s: float, device: torch.device) -> None:
    """torchrun's env:// rendezvous (the fork launcher's: a file, RENDEZVOUS_ENV) with a
    timeout that bounds every collective and p2p wait.

    Only an NCCL group is bound to its device (`device_id`: eager communicator, subgroups by
    `ncclCommSplit`). A gloo group on a GPU machine (ranks sharing a GPU, staged transport)
    must stay unbound: torch's `init_device_mesh` splits every mesh dimension from a bound
    default group with `split_group`, which deep-copies the parent backend's options, and
    gloo's cannot be copied (`TypeError: cannot pickle '_Options'`, torch 2.13).
    """
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device
    env = DistEnv.from_environ()
    store = restart_safe_store(timeout_s)
    if store is not None:
        kwargs.update(store=store, rank=env.rank, world_size=env.world_size)
    elif os.environ.get(RENDEZVOUS_ENV):
        path = os.environ[RENDEZVOUS_ENV]
        kwargs.update(init_method=f"file://{path}", rank=env.rank, world_size=env.world_size)
    dist.init_process_group(**kwargs)


def restart_safe_store(timeout_s: float, environ: Any = None) -> Any:
    """A store namespaced by torchrun's restart count, or None to use env:// as it is.

    torchrun (torch 2.13) keeps its agent's TCPStore across `--max-restarts` restarts without
    a per-attempt prefix (pytorch/pytorch#135712), so a restarted rank can read a peer's
    gloo/NCCL address from the failed attempt and fail to connect ("Connection refused": 3 of
    6 restarts here; 0 of 4 with this namespace). On one node every rank restarts together
    and shares the restart count, so the count makes a safe namespace. Across nodes the
    counts may differ (pytorch/pytorch#108158): there, launch/multinode.sh exports
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead (a fresh store per attempt).
    """
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if env.get("LOCAL_WORLD_SIZE") != env.get("WORLD_SIZE"):
        return None
    base = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        int(env["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(
        f"splitgraph/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", base
    )


def pin_loopback(environ: Any = None) -> dict[str, str]:
    """Keep a one-node launch's sockets on the loopback interface; return what was set.

    gloo listens on the address the host name resolves to, NCCL's bootstrap on the first
    non-loopback interface: on a cluster node, both reachable from the network. When every
    rank is on this host (torchrun's LOCAL_WORLD_SIZE == WORLD_SIZE) nothing needs to be, so
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME are set to the loopback interface unless the
    user set them. (torchrun's own TCPStore listens on every interface whatever its
    --rdzv-endpoint says: torch offers no bind address; see docs/reliability.md, "Hostile inputs".)
    """
    env = os.environ if environ is None else environ
    world = env.get("WORLD_SIZE")
    if not world or env.get("LOCAL_WORLD_SIZE") != world:
        return {}
    lo = loopback_interface()
    if lo is None:
        return {}
    changed = {}
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if not env.get(var):
            env[var] = changed[var] = lo
    return changed


def loopback_interface() -> str | None:
    import socket

    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:  # pragma: no cover - no interface list on this platform
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)
