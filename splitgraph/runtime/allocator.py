"""The smallest GPU memory cap PyTorch's CUDA caching allocator can honour for a run.

On GPU `pipeline.memory_cap` becomes `torch.cuda.set_per_process_memory_fraction`, and the
caching allocator counts the *segments* it reserves from the device against it, not the
tensors it hands out. It reserves (c10/core/AllocatorConfig.h and CUDACachingAllocator.cpp:
kSmallSize, kSmallBuffer, kLargeBuffer, kMinLargeAlloc, kRoundLarge):

    request <= 1 MiB            a share of a 2 MiB segment (the small pool)
    1 MiB < request < 10 MiB    a 20 MiB segment
    request >= 10 MiB           a segment of its own, rounded up to 2 MiB

Every run holds small tensors (the loss, the step's scalars) and its largest tensor at once,
so a cap below one small segment plus the largest tensor's segment fails at the first
allocation that needs it, whatever else the run does: `config.validate` refuses it before
anything starts, naming the floor. The floor is a lower bound, not a fit: the planner and
the CPU accounting say what the whole run needs. (`PYTORCH_CUDA_ALLOC_CONF` settings such as
expandable segments change how segments grow, not that a 1-10 MiB tensor needs more than
its size; the CUDA context itself is outside the allocator and outside the cap.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitgraph.config import DataConfig, Workload

SMALL_SIZE = 1 << 20  # kSmallSize: the largest request served from the small pool
SMALL_SEGMENT = 2 << 20  # kSmallBuffer
LARGE_SEGMENT = 20 << 20  # kLargeBuffer: for requests between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge


def segment_bytes(request: int) -> int:
    """The segment the caching allocator reserves for a request of `request` bytes on an
    empty pool (its `get_allocation_size`)."""
    if request <= SMALL_SIZE:
        return SMALL_SEGMENT
    if request < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return ROUND_LARGE * math.ceil(request / ROUND_LARGE)


def largest_tensor(work: Workload, data: DataConfig) -> tuple[int, str]:
    """The run's largest single tensor on any rank, in bytes, and what it is: a weight (its
    gradient and optimizer slots are the same size), a microbatch's widest activation, or the
    training inputs kept on the device (synthetic data, `data.on_device`)."""
    from splitgraph.config import DataName

    p_item = {"float64": 8}.get(str(_value(work.runtime.dtype)), 4)  # bf16: float32 masters
    c_item = {"float64": 8, "bfloat16": 2}.get(str(_value(work.runtime.dtype)), 4)
    m = work.model
    dims = [int(m.in_features), *(int(h) for h in m.hidden), int(m.out_features)]
    found = []
    i = max(range(len(dims) - 1), key=lambda k: dims[k] * dims[k + 1])
    found.append(
        (dims[i] * dims[i + 1] * p_item, f"the weight of layer {i} ({dims[i]} x {dims[i + 1]})")
    )
    # each replica runs B/dp rows in m microbatches
    rows = math.ceil(max(work.local_batch, 1) / max(work.pipeline.microbatches, 1))
    width = max(dims)
    found.append((rows * width * c_item, f"an activation of {rows} rows x {width} units"))
    if DataName(_value(data.name)) == DataName.synthetic and data.on_device:
        n = data.samples
        train = n - int(n * data.test_fraction)
        found.append(
            (train * dims[0] * p_item, f"the training inputs on the device ({train} x {dims[0]})")
        )
    return max(found)


def min_cap(work: Workload, data: DataConfig) -> tuple[int, str]:
    """The smallest cap the allocator can honour for this run, and why."""
    size, what = largest_tensor(work, data)
    seg = segment_bytes(size)
    if size <= SMALL_SIZE:
        return seg, f"its largest tensor, {what}, fits one {seg >> 20} MiB small-pool segment"
    return seg + SMALL_SEGMENT, (
        f"its largest tensor, {what} ({size:,} bytes), takes a {seg / 2**20:g} MiB segment, "
        f"and its small tensors a {SMALL_SEGMENT >> 20} MiB one"
    )


def _value(v: Any) -> Any:
    return getattr(v, "value", v)
