"""One DeviceMesh that names every parallel axis, and the views of it each component needs.

Axis order, outermost to innermost, is ``MESH_ORDER``: tensor parallel innermost so the chattiest
traffic stays on the fastest links (neighbouring ranks share a node), pipeline outermost so its
point-to-point traffic is what crosses nodes. The planner may change this order in one place: here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from apogee.config import ParallelConfig

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Mesh:
    """The world mesh plus the sub-meshes used by FSDP, TP and the data loader."""

    parallel: ParallelConfig
    world: DeviceMesh | None  # None in a single process with no process group
    dp: DeviceMesh | None = None  # data parallel (replicate x shard) flattened to one axis

    @classmethod
    def build(cls, parallel: ParallelConfig, device_type: str) -> "Mesh":
        if not dist.is_initialized():
            return cls(parallel, None)
        shape = tuple(getattr(parallel, axis) for axis in MESH_ORDER)
        world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_ORDER)
        # Data parallel as one axis, for loaders and loss averaging; kept here rather than sliced
        # back out of the root mesh (torch deprecates slicing flattened dims from the root).
        dp = world["dp_replicate", "dp_shard"]._flatten("dp")
        return cls(parallel, world, dp)

    @property
    def tp(self) -> DeviceMesh | None:
        return self.world["tp"] if self.world is not None and self.parallel.tp > 1 else None

    @property
    def fsdp(self) -> DeviceMesh | None:
        """The mesh FSDP2 shards over: 1-D for FSDP, 2-D (replicate, shard) for HSDP and pure DDP."""
        if self.world is None or self.parallel.dp == 1:
            return None
        if self.parallel.dp_replicate > 1:
            return self.world["dp_replicate", "dp_shard"]
        return self.world["dp_shard"]

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank() if self.world is not None else 0

    @property
    def dp_size(self) -> int:
        return self.parallel.dp
