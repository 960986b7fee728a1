"""Check a launch against the machine before anything is allocated: data file and model.

Every rank runs `check_launch` before it reads its data or builds a parameter, and
`splitgraph-check` runs the same for a launch it has not started (so `launch/train.sh`
never starts torchrun for a run that cannot fit)::

    data     the file's header (datafile.py): what loading it takes on each rank that holds
             the first or last stage (arrays as read + the run's copy), summed over this
             node's such ranks, against the data bound: data.max_memory, else half of this
             machine's memory (the rest is the model's, the interpreters' and the system's)
    model    per rank, from the plan alone (no tensor exists): parameters + gradients +
             optimizer state + the memory model's saved-activation peak, exactly the
             accounting reliability/memcap.py checks after the model is built, against
             pipeline.memory_cap
    machine  the model's bytes of this node's ranks on each device (CPU: + their data)
             against that device's memory: this machine's (physical, or the cgroup's limit)
             or each GPU's

The model's figures are lower bounds on what a rank holds (no interpreter, buffers or
allocator slack), so a refusal is certain, never a guess. Over the cap or the machine, every
rank raises the same `OutOfMemory`; over the data bound, the same `DataError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitgraph.config import (
    DataConfig,
    DataName,
    RuntimeConfig,
    Task,
    Workload,
    recompute_stages,
)
from splitgraph.errors import DataError, OutOfMemory
from splitgraph.units import format_bytes, parse_bytes

#: the phase named in a refusal made from the plan alone
PHASE = "before any parameter is allocated"
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int:
    """Bytes of memory this process may use on this machine: physical memory, or the
    cgroup's limit (a container's) where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def data_limit(data: DataConfig, machine: int | None = None) -> int:
    """The most bytes loading the data may take on one node (all its loading ranks)."""
    if data.max_memory is not None:
        return parse_bytes(data.max_memory)
    return (machine_memory() if machine is None else machine) // 2


def bound_name(data: DataConfig, machine: int | None = None) -> str:
    """Where the data bound comes from, for messages."""
    if data.max_memory is not None:
        return f"data.max_memory={data.max_memory}"
    m = machine_memory() if machine is None else machine
    return f"half of this machine's {format_bytes(m)}; data.max_memory raises it"


def node_ranks(rank: int, local_rank: int, local_world_size: int) -> range:
    """The global ranks on this rank's node (torchrun numbers ranks node by node)."""
    first = rank - local_rank
    return range(first, first + local_world_size)


def node_devices(runtime: RuntimeConfig, local_world_size: int) -> list[torch.device]:
    """The device each local rank of this node computes on (runtime/dist.place)."""
    from splitgraph.runtime.dist import place

    return [place(runtime, r, local_world_size).device for r in range(local_world_size)]


@dataclass
class Preflight:
    """What a launch was checked for: per rank, the model's bytes; per loading rank, the
    data's; and the capacities they were held against."""

    records: list[dict[str, Any]]  # per global rank, memcap.accounting's fields
    data_bytes: int  # loading the data on one rank that holds the first or last stage
    loaders: list[int]  # global ranks of this node that load the data
    node: list[int]  # global ranks of this node
    capacity: dict[str, int] = field(default_factory=dict)  # device -> bytes
    data_limit: int = 0

    def lines(self) -> list[str]:
        """Human-readable figures (splitgraph-check prints them)."""
        out = []
        for r in self.records:
            if r["rank"] not in self.node:
                continue
            saved = r["saved_peak"]
            act = f" + saved activations {format_bytes(saved)}" if saved is not None else ""
            data = " + data " + format_bytes(self.data_bytes) if r["rank"] in self.loaders else ""
            out.append(
                f"  rank {r['rank']}: {format_bytes(r['total'])} (parameters "
                f"{format_bytes(r['params'])} + gradients {format_bytes(r['grads'])} + "
                f"optimizer state {format_bytes(r['optimizer'])}{act}){data}"
            )
        caps = ", ".join(f"{d} {format_bytes(b)}" for d, b in self.capacity.items())
        return [f"memory per rank, priced before anything is allocated (capacity: {caps}):", *out]


# -- the data ----------------------------------------------------------------------------


def data_load_bytes(d: DataConfig, work: Workload, machine: int | None = None) -> tuple[int, Any]:
    """(bytes one loading rank takes to load the data, the file's header or None)."""
    from splitgraph.data import data_dtype, load_bytes
    from splitgraph.datafile import read_header

    dtype = data_dtype(work.runtime)
    es = torch.empty((), dtype=dtype).element_size()
    name = DataName(d.name)
    if name == DataName.file:
        header = read_header(Path(str(d.path)), data_limit(d, machine))
        return load_bytes(header, dtype, Task(work.model.task)), header
    if name == DataName.synthetic:  # generated in float32, then the run's train/test copy
        per_row = (int(d.features) + int(d.outputs)) * (4 + es)
        return int(d.samples) * per_row, None
    return 1797 * 64 * (8 + es), None  # digits: scikit-learn's float64, then the run's copy


def loading_ranks(layout: Any, plan: Any, ranks: Sequence[int]) -> list[int]:
    """The ranks among `ranks` that hold the first or last stage, so load the data."""
    ends = {plan.rank_of(0), plan.rank_of(plan.num_stages - 1)}
    return [r for r in ranks if layout.coords(r)[1] in ends]


def _check_data(data: DataConfig, work: Workload, loaders: int, machine: int | None = None) -> int:
    """Refuse data that `loaders` ranks of one node cannot load within the data bound;
    returns what one of them takes."""
    from splitgraph.data import data_dtype, too_big_message

    per_loader, header = data_load_bytes(data, work, machine)
    limit = data_limit(data, machine)
    if loaders and per_loader * loaders > limit:
        if header is None:
            raise DataError(
                f"data={data.name} takes about {format_bytes(per_loader)} on each of "
                f"{loaders} rank(s) on this node, over the data bound of "
                f"{format_bytes(limit)} ({bound_name(data, machine)}). Use fewer "
                "data.samples, or raise data.max_memory."
            )
        raise DataError(
            too_big_message(
                header,
                per_loader,
                loaders,
                limit,
                data_dtype(work.runtime),
                bound_name(data, machine),
            )
        )
    return per_loader


def resolve_data(
    data: DataConfig, work: Workload, world_size: int, node: Sequence[int]
) -> str | None:
    """At the entrance (every rank, splitgraph-check): refuse a data file this node cannot
    load, from its header alone, then read data.features/outputs from it where null.

    The bound comes first, so a file too large for the node is refused before even its
    labels are read. Returns the line saying what was read from the file (or None).
    """
    from splitgraph.data import fill_shape_from_file

    if DataName(data.name) == DataName.file and data.path:
        try:  # which ranks hold the first and last stage needs only the layout
            from splitgraph.runtime.mesh import layout_of

            layout = layout_of(work.pipeline, work.parallel, world_size)
            from splitgraph.schedule import placement_of

            sched = work.schedule
            virtual = max(sched.virtual_stages, 1)
            where = placement_of(str(sched.name), layout.pp, virtual, path=sched.path)
            where = where or tuple(range(layout.pp))  # auto chooses later: every rank may load
            ends = {where[0], where[-1]} if len(where) == layout.pp * virtual else set(where)
            loaders = [r for r in node if 0 <= r < layout.world_size]
            loaders = [r for r in loaders if layout.coords(r)[1] in ends]
        except (ValueError, ZeroDivisionError):  # an invalid layout: validate names it
            loaders = list(node)
        _check_data(data, work, len(loaders))
    return fill_shape_from_file(data, work.model.task, work.runtime)


# -- the model ---------------------------------------------------------------------------


def price_ranks(
    work: Workload, layout: Any, plan: Any, schedule: Any = None
) -> list[dict[str, Any]]:
    """Every global rank's accounted bytes, from the plan alone: what
    `memcap.accounting(engine, cap, measured=False)` will say once the model exists."""
    from splitgraph.cost.memory_model import ModelShape, predict_for_plan, predictable
    from splitgraph.data import microbatch_sizes
    from splitgraph.model import torch_dtype
    from splitgraph.reliability.memcap import cap_bytes, optimizer_bytes_for
    from splitgraph.schedule import build_schedule

    dtype = torch_dtype(work.runtime.dtype)
    es = torch.empty((), dtype=dtype).element_size()
    local = work.batch_size // layout.dp
    sizes = microbatch_sizes(local, work.pipeline.microbatches)
    peaks: list[int] | None = None
    if predictable(work.runtime):
        sched = schedule or build_schedule(
            work.schedule.name,
            layout.pp,
            len(sizes),
            work.schedule.virtual_stages,
            path=work.schedule.path,
        )
        shape = ModelShape.of(work.model, es)
        recompute = recompute_stages(work.schedule, plan.num_stages)
        peaks = predict_for_plan(shape, plan.bounds, sizes, sched, recompute)
    cap = cap_bytes(work.pipeline)
    records = []
    for rank in range(layout.world_size):
        p = layout.coords(rank)[1]
        layers = [plan.layers[i] for s in plan.stages_of(p) for i in plan.stage_range(s)]
        params = sum(layer.params for layer in layers) * es
        tensors = sum(2 if layer.bias else 1 for layer in layers)
        opt = optimizer_bytes_for(work.optim, params, tensors)
        saved = peaks[p] if peaks is not None else None
        buckets = params if layout.dp > 1 else 0  # every gradient, flattened, at the all-reduce
        records.append(
            {
                "rank": rank,
                "params": params,
                "grads": params,
                "optimizer": opt,
                "allreduce_buckets": buckets,
                "saved_peak": saved,
                "saved_peak_source": "predicted" if saved is not None else None,
                "total": 2 * params + opt + buckets + (saved or 0),
                "cap": cap,
            }
        )
    return records


def _largest_layer_note(runtime: RuntimeConfig, optim: Any, plan: Any, cap: int) -> str:
    """When one layer alone exceeds the cap, no split can help: say so."""
    from splitgraph.model import torch_dtype
    from splitgraph.reliability.memcap import optimizer_bytes_for

    es = torch.empty((), dtype=torch_dtype(runtime.dtype)).element_size()
    layer = max(plan.layers, key=lambda spec: spec.params)
    nbytes = layer.params * es
    static = 2 * nbytes + optimizer_bytes_for(optim, nbytes, 2 if layer.bias else 1)
    if static <= cap:
        return ""
    return (
        f" Layer {layer.index} alone ({layer.out_features:,} x {layer.in_features:,} = "
        f"{layer.params:,} parameters) needs {format_bytes(static)} with its gradient and "
        "optimizer state: no split fits under this cap; narrow the layer or raise the cap."
    )


# -- the check ---------------------------------------------------------------------------


def check_launch(
    data: DataConfig,
    work: Workload,
    layout: Any,
    plan: Any,
    node: Sequence[int],
    devices: Sequence[torch.device] | None = None,
    machine: int | None = None,
    schedule: Any = None,
) -> Preflight:
    """Refuse, before any allocation, a launch whose data or model cannot fit.

    `node`: the global ranks on this machine; `devices`: each one's device (default: the
    CPU); `machine`: this machine's memory in bytes (default: measured); `schedule`: the
    run's, where it is not built from the config alone (schedule=auto).
    """
    from splitgraph.reliability import memcap

    machine = machine_memory() if machine is None else machine
    devices = list(devices) if devices is not None else [torch.device("cpu")] * len(node)
    loaders = loading_ranks(layout, plan, node)
    per_loader = _check_data(data, work, len(loaders), machine)

    records = price_ranks(work, layout, plan, schedule)
    cap = memcap.cap_bytes(work.pipeline)
    if cap is not None:
        note = _largest_layer_note(work.runtime, work.optim, plan, cap)
        memcap.check(records, cap, PHASE, note=note)

    # Each device of this node against its own memory; the data is held on the host.
    capacity: dict[str, int] = {"host": machine}
    load: dict[str, list[tuple[int, int]]] = {}
    for rank, dev in zip(node, devices):
        key = "host" if dev.type == "cpu" else str(dev)
        if key not in capacity:
            capacity[key] = _device_memory(dev)
        load.setdefault(key, []).append((rank, records[rank]["total"]))
        if rank in loaders:
            load.setdefault("host", []).append((rank, per_loader))
    for key, items in load.items():
        need = sum(b for _, b in items)
        if need > capacity[key]:
            raise _over_machine(key, need, capacity[key], items, records, loaders, per_loader)
    return Preflight(records, per_loader, loaders, list(node), capacity, data_limit(data, machine))


def _device_memory(dev: torch.device) -> int:
    return int(torch.cuda.get_device_properties(dev).total_memory)


def _over_machine(
    key: str,
    need: int,
    capacity: int,
    items: list[tuple[int, int]],
    records: list[dict[str, Any]],
    loaders: list[int],
    per_loader: int,
) -> OutOfMemory:
    """The refusal of a node (or GPU) whose ranks' priced bytes exceed its memory."""
    ranks = sorted({r for r, _ in items})
    worst = max((records[r] for r in ranks), key=lambda rec: rec["total"])
    parts = (
        f"parameters {format_bytes(worst['params'])} + gradients "
        f"{format_bytes(worst['grads'])} + optimizer state {format_bytes(worst['optimizer'])}"
    )
    if worst["saved_peak"] is not None:
        parts += f" + saved activations {format_bytes(worst['saved_peak'])}"
    where = "this machine" if key == "host" else key
    copies = len([r for r in ranks if r in loaders]) if key == "host" else 0
    data = ""
    if copies:
        data = f" + the data {format_bytes(per_loader)}" + (f" x {copies}" if copies > 1 else "")
    if len(ranks) == 1:
        who = f"rank {ranks[0]} needs at least {need:,} bytes ({format_bytes(need)}: {parts}{data})"
    else:
        who = (
            f"the {len(ranks)} ranks on {where} need at least {need:,} bytes together "
            f"({format_bytes(need)}; the largest, rank {worst['rank']}: "
            f"{format_bytes(worst['total'])} = {parts}{data and ';' + data[2:]})"
        )
    static = worst["params"] + worst["grads"] + worst["optimizer"]
    fix = (
        "Parameters, gradients and optimizer state alone are too large: a smaller model "
        "(model.hidden), or its stages spread over more machines (launch/multinode.sh)."
        if static * len(ranks) > capacity or len(ranks) == 1
        else "Fewer ranks on this machine, a smaller model or batch, or more machines."
    )
    return OutOfMemory(
        f"out of memory {PHASE}: {who}, but {where} has {capacity:,} bytes "
        f"({format_bytes(capacity)}) of memory. {fix}",
        needed=need,
        cap=capacity,
        rank=int(worst["rank"]),
        phase=PHASE,
        records=records,
    )
