"""The one place parallelisms are applied to a plain model, in a fixed, documented order.

1. tensor (+ sequence) parallel: rewrites the projections' parameters as DTensors on the tp mesh;
2. compile: each block separately, so compilation is reused across identical blocks;
3. FSDP / HSDP: shards whatever TP produced over the data-parallel mesh (2-D DTensors with TP).

Pipeline splitting (first) and recomputation (after TP) join this order with the N-D issue.
"""

from __future__ import annotations

import torch

from apogee.models.llama import Transformer
from apogee.parallel.fsdp import apply_fsdp
from apogee.parallel.mesh import Mesh
from apogee.parallel.tensor import apply_tensor_parallel


def parallelize(model: Transformer, mesh: Mesh, *, param_dtype: torch.dtype, compile: bool) -> Transformer:
    if mesh.tp is not None:
        apply_tensor_parallel(
            model, mesh.tp, sequence_parallel=mesh.parallel.sequence_parallel, loss_parallel=mesh.parallel.loss_parallel
        )
    if compile:
        for block in model.layers.values():
            block.compile()  # in place: parameter names (and so checkpoints) stay unchanged
    if mesh.fsdp is not None:
        apply_fsdp(model, mesh.fsdp, param_dtype=param_dtype)
    return model
