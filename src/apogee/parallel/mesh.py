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
    dp: DeviceMesh | None = None  # data parallel (replicate x shard) flattened: who loads which batch
    fsdp: DeviceMesh | None = None  # what FSDP2 shards over: 1-D for FSDP, 2-D (replicate, shard) for HSDP
    dp_cp: DeviceMesh | None = None  # every rank holding different tokens: losses are averaged over it

    @classmethod
    def build(cls, parallel: ParallelConfig, device_type: str) -> "Mesh":
        if not dist.is_initialized():
            return cls(parallel, None)
        shape = tuple(getattr(parallel, axis) for axis in MESH_ORDER)
        world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_ORDER)
        # Flattened views are built here, once, and kept (torch deprecates slicing flattened dims
        # back out of the root mesh).
        dp = world["dp_replicate", "dp_shard"]._flatten("dp")
        # Context-parallel ranks hold different tokens of the same sequences, so their gradients are
        # averaged like data-parallel ones: FSDP shards over dp_shard x cp.
        shard = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        fsdp = None
        if parallel.dp_replicate > 1:
            fsdp = _concatenate(world, world["dp_replicate"], shard)
        elif parallel.dp_shard * parallel.cp > 1 or parallel.cpu_offload:
            fsdp = shard  # with cpu_offload on one rank: FSDP2 over a 1-rank mesh, for its offload policy
        dp_cp = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return cls(parallel, world, dp, fsdp, dp_cp)

    def _axis(self, name: str) -> DeviceMesh | None:
        """The 1-D mesh of one axis, or None when that axis is not split."""
        return self.world[name] if self.world is not None and getattr(self.parallel, name) > 1 else None

    def _rank_on(self, name: str) -> int:
        return self.world[name].get_local_rank() if self.world is not None else 0

    @property
    def pp(self) -> DeviceMesh | None:
        return self._axis("pp")

    @property
    def pp_rank(self) -> int:
        return self._rank_on("pp")

    @property
    def tp(self) -> DeviceMesh | None:
        return self._axis("tp")

    @property
    def cp(self) -> DeviceMesh | None:
        return self._axis("cp")

    @property
    def cp_rank(self) -> int:
        return self._rank_on("cp")

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank() if self.world is not None else 0

    @property
    def dp_size(self) -> int:
        return self.parallel.dp


def _concatenate(world: DeviceMesh, *meshes: DeviceMesh) -> DeviceMesh:
    """One mesh from sub-meshes of ``world`` (torch >= 2.13 has a method; 2.11 slices the root)."""
    concatenate = getattr(type(world), "_concatenate", None)
    if concatenate is not None:
        return concatenate(list(meshes))
    return world[tuple(name for mesh in meshes for name in mesh.mesh_dim_names)]
