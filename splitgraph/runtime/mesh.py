"""The 2D rank layout: data-parallel replicas x pipeline stages, built as a DeviceMesh.

    world size = parallel.dp x pipeline.stages
    mesh = init_device_mesh(device_type, (dp, pp), mesh_dim_names=("dp", "pp"))

DeviceMesh lays ranks out row-major, so a pipeline (one row, the "pp" dimension) is `pp`
consecutive ranks and a stage's data-parallel peers (one column, "dp") are `pp` apart:

    dp=2, pp=2:   pipeline 0 = ranks 0 1      stage 0's peers = ranks 0 2
                  pipeline 1 = ranks 2 3      stage 1's peers = ranks 1 3

torchrun numbers ranks node by node, so with pp dividing the GPUs per node each pipeline
stays inside a node (its activations cross NVLink on the critical path, every microbatch)
and only the per-step gradient all-reduce crosses nodes. `Layout.coords` is the one place
that states this arithmetic: it is needed before any process group exists (to decide which
ranks load data), and `build_mesh` checks it against the mesh DeviceMesh actually built.
Everything else takes its groups from the mesh (`mesh["pp"]`, `mesh["dp"]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from splitgraph.config import ParallelConfig, PipelineConfig, num_stages


@dataclass(frozen=True)
class Layout:
    """dp replicas of a pp-rank pipeline; rank = d * pp + p (DeviceMesh's row-major order)."""

    dp: int
    pp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.pp

    def coords(self, rank: int) -> tuple[int, int]:
        """(replica, pipeline rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this {self.dp}x{self.pp} layout")
        return divmod(rank, self.pp)

    def rank_at(self, replica: int, pipeline_rank: int) -> int:
        return replica * self.pp + pipeline_rank

    def pipeline(self, replica: int) -> tuple[int, ...]:
        """The global ranks of one replica, in pipeline order."""
        return tuple(self.rank_at(replica, p) for p in range(self.pp))

    def describe(self, ranks_per_node: int | None = None) -> str:
        """The replicas and their ranks; with `ranks_per_node` (torchrun's LOCAL_WORLD_SIZE,
        ranks numbered node by node) also the nodes each pipeline spans."""
        rows = [f"layout: dp={self.dp} x pp={self.pp} = {self.world_size} ranks"]
        for d in range(self.dp):
            ranks = self.pipeline(d)
            line = f"  replica {d}: ranks {list(ranks)}"
            if ranks_per_node:
                nodes = sorted({r // ranks_per_node for r in ranks})
                where = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {nodes}"
                line += f" on {where}"
                if len(nodes) > 1:
                    line += " (its activations cross nodes: prefer pipeline.stages dividing"
                    line += f" the {ranks_per_node} ranks per node)"
            rows.append(line)
        return "\n".join(rows)


def layout_of(pipeline: PipelineConfig, parallel: ParallelConfig, world_size: int) -> Layout:
    """The layout a validated config's pipeline and parallel sections ask for on
    `world_size` ranks."""
    return Layout(dp=parallel.dp, pp=num_stages(pipeline, parallel, world_size))


def build_mesh(layout: Layout, device_type: str, timeout: timedelta | None = None) -> Any:
    """The ("dp", "pp") DeviceMesh over the default process group (collective: every rank).

    `timeout` (runtime.timeout) bounds every wait on the mesh's groups. `init_device_mesh`
    gives its subgroups torch's default timeout (30 min on gloo), so with several replicas,
    whose gradient all-reduce runs on the "dp" groups, the groups are made here with
    `new_subgroups_by_enumeration(timeout=...)` and the mesh from them; with one replica the
    "pp" dimension is the default group itself (runtime.timeout) and the "dp" groups carry no
    traffic."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    from splitgraph.runtime.comm import check_timeout

    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(
            f"the {layout.dp}x{layout.pp} layout needs {layout.world_size} ranks; the process "
            f"group has {dist.get_world_size()}"
        )
    if timeout is not None and layout.dp > 1:
        grid = [list(layout.pipeline(d)) for d in range(layout.dp)]
        pp_group, _ = dist.new_subgroups_by_enumeration(grid, timeout=timeout)
        dp_group, _ = dist.new_subgroups_by_enumeration(
            [list(col) for col in zip(*grid)], timeout=timeout
        )
        for group, what in ((dp_group, "data-parallel"), (pp_group, "pipeline")):
            check_timeout(group, timeout, what)
        mesh = DeviceMesh.from_group(
            [dp_group, pp_group],
            device_type,
            mesh=torch.tensor(grid, dtype=torch.int),
            mesh_dim_names=("dp", "pp"),
        )
    else:
        mesh = init_device_mesh(device_type, (layout.dp, layout.pp), mesh_dim_names=("dp", "pp"))
    got = tuple(mesh.get_coordinate())
    want = layout.coords(dist.get_rank())
    if got != want:  # Layout.coords decided data loading before the mesh existed
        raise RuntimeError(f"DeviceMesh put rank {dist.get_rank()} at {got}; expected {want}")
    return mesh


@dataclass(frozen=True)
class MeshGroups:
    """What one rank takes from the mesh: its pipeline group, its data-parallel group, and
    every replica's ranks (NCCL channel groups must be created for all of them by all)."""

    pp_rank: int
    pp_size: int
    pp_group: Any
    dp_rank: int
    dp_size: int
    dp_group: Any
    replicas: tuple[tuple[int, ...], ...]

    @staticmethod
    def from_mesh(mesh: Any) -> MeshGroups:
        pp, dp = mesh["pp"], mesh["dp"]
        replicas = tuple(tuple(int(r) for r in row) for row in mesh.mesh.tolist())
        return MeshGroups(
            pp_rank=pp.get_local_rank(),
            pp_size=pp.size(),
            pp_group=pp.get_group(),
            dp_rank=dp.get_local_rank(),
            dp_size=dp.size(),
            dp_group=dp.get_group(),
            replicas=replicas,
        )
