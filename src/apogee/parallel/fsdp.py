"""Data parallelism with FSDP2 ``fully_shard``: FSDP on a 1-D mesh, HSDP on a 2-D one.

Each transformer block is its own FSDP unit so only one block's parameters are gathered at a time;
the root unit holds embeddings, final norm and output. Gradients are reduced in fp32.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from apogee.models.llama import Transformer


def apply_fsdp(model: Transformer, mesh: DeviceMesh, *, param_dtype: torch.dtype) -> None:
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
