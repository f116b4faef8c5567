"""Data parallelism with FSDP2 ``fully_shard``: FSDP on a 1-D mesh, HSDP on a 2-D one.

Each transformer block is its own FSDP unit so only one block's parameters are gathered at a time;
the root unit holds embeddings, final norm and output. Gradients are reduced in fp32.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from apogee.models.llama import Transformer


def apply_fsdp(model: Transformer, mesh: DeviceMesh, *, param_dtype: torch.dtype, reshard_after_forward: str = "default",
               cpu_offload: bool = False) -> None:
    """``reshard_after_forward``: default | always | never (see ParallelConfig)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Pinned host memory only exists with an accelerator.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # By default the last block's parameters stay gathered: backward needs them first.
        reshard = {"always": True, "never": False}.get(reshard_after_forward, i < len(blocks) - 1)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
