"""The one place parallelisms are applied to a plain model, in a fixed, documented order.

0. pipeline split (pp > 1): this rank's stages, each a plain Transformer holding its layers
   (pipeline.py); every later step applies to each stage as if it were a whole model;
1. tensor (+ sequence) parallel: rewrites the projections' parameters as DTensors on the tp mesh;
   context parallel: swaps each block's attention core for one that gathers K/V over cp
   (context.py); it holds no parameters, so its place relative to TP does not matter;
2. recompute: activation checkpointing per block (recompute.py), after TP so that it recomputes
   the sharded computation, before compile so that compile sees (and can optimise) the checkpoint;
3. compile: each block separately, so compilation is reused across identical blocks;
4. FSDP / HSDP: shards whatever TP produced over the data-parallel mesh (2-D DTensors with TP); one
   FSDP root per pipeline stage, which is what torch's pipeline schedules drive. FSDP shards over
   dp_shard x cp, so context-parallel ranks average their gradients like data-parallel ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apogee.models.llama import Transformer
from apogee.parallel.context import apply_context_parallel
from apogee.parallel.fsdp import apply_fsdp
from apogee.parallel.mesh import Mesh
from apogee.parallel.pipeline import split_model, stages_per_rank, tie_across_stages
from apogee.parallel.recompute import apply_recompute
from apogee.parallel.tensor import apply_tensor_parallel


@dataclass
class Parallelized:
    model: Transformer  # every parameter this rank holds, under the full model's names
    stages: list[tuple[int, Transformer]] = field(default_factory=list)  # (stage id, module); [] without pp


def parallelize_stages(model: Transformer, mesh: Mesh, *, param_dtype: torch.dtype, compile: bool,
                       seq_len: int | None = None) -> Parallelized:
    """Apply every parallelism of ``mesh.parallel`` in the documented order. ``seq_len`` (default:
    the model's context) weighs attention when balancing pipeline stages."""
    p = mesh.parallel
    if p.pp > 1:
        model, stages = split_model(
            model, pp_rank=mesh.pp_rank, pp=p.pp, schedule=p.pp_schedule,
            per_rank=stages_per_rank(p.pp_schedule, p.pp_stages_per_rank), seq_len=seq_len or model.args.max_seq_len,
        )
        parts = [module for _, module in stages]
    else:
        stages, parts = [], [model]
    for part in parts:
        if mesh.tp is not None:
            apply_tensor_parallel(part, mesh.tp, sequence_parallel=p.sequence_parallel, loss_parallel=p.loss_parallel)
        if mesh.cp is not None:
            apply_context_parallel(part, mesh.cp)
        apply_recompute(list(part.layers.values()), p.recompute)
        if compile:
            for block in part.layers.values():
                block.compile()  # in place: parameter names (and so checkpoints) stay unchanged
        if mesh.fsdp is not None:
            apply_fsdp(part, mesh.fsdp, param_dtype=param_dtype, reshard_after_forward=p.reshard_after_forward,
                       cpu_offload=p.cpu_offload)
    tie_across_stages(model, p.pp)
    return Parallelized(model, stages)


def parallelize(model: Transformer, mesh: Mesh, *, param_dtype: torch.dtype, compile: bool) -> Transformer:
    """``parallelize_stages`` for callers that run the model whole (no pipeline stages)."""
    done = parallelize_stages(model, mesh, param_dtype=param_dtype, compile=compile)
    if done.stages:
        raise ValueError("parallel.pp > 1: use parallelize_stages and run its stages with a pipeline schedule")
    return done.model
