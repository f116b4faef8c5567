"""Deterministic parameter initialisation that does not depend on the parallel layout.

Every parameter is drawn in full from a generator seeded by (seed, parameter name), then each rank
keeps its own shard. The same seed therefore gives the same model on one process or on any mesh,
which is what lets a parallel run reproduce the single-process loss.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from apogee.models.llama import Transformer, rope_cos_sin

# Output projections of each residual branch are scaled down with depth (GPT-2, nanoGPT).
_RESIDUAL_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight")


def _full_init(name: str, shape: torch.Size, model: Transformer, seed: int) -> torch.Tensor:
    args = model.args
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = args.init_std
    if name.endswith(_RESIDUAL_OUTPUTS):
        std = args.init_std / math.sqrt(2 * args.n_layers)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_weights(model: Transformer, seed: int, device: torch.device, param_device: torch.device | None = None
                 ) -> None:
    """Materialise a meta-device (possibly sharded) model on ``device`` and fill it from ``seed``;
    ``param_device``: the parameters' home where it differs (the host under FSDP2's CPU offload, whose
    sharded parameters must live there; the buffers stay on ``device``, where the compute runs)."""
    model.to_empty(device=param_device or device)
    # to_empty gives each module a fresh plain Parameter, which unties a tied weight (DTensor
    # parameters are swapped in place and stay tied): tie again before filling.
    model.tie_weights()
    for name, param in model.named_parameters():  # a tied weight is visited once, by its first name
        full = _full_init(name, param.shape, model, seed).to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank slices its own shard from the same full tensor, no traffic.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
    args = model.args
    model.rope = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta, device=device)


def count_parameters(model: nn.Module) -> int:
    """Global parameter count (DTensor shapes are global), each tied weight once."""
    return sum(p.numel() for p in model.parameters())
