"""Activation recomputation (activation checkpointing) per transformer block.

``full``: a block keeps only its input; backward reruns its forward. ``selective``: torch's
op-level selective checkpointing (``create_selective_checkpoint_contexts``) keeps the outputs of the
expensive ops (matmuls, attention, and collectives so tensor parallelism does not repeat its
traffic) and recomputes the cheap, memory-hungry elementwise rest (norms, rotary, SiLU and gating,
residual adds). Both use non-reentrant ``torch.utils.checkpoint``, which composes with FSDP2,
DTensor and ``torch.compile``.

The block is not wrapped in another module (as ``checkpoint_wrapper`` would, adding
``_checkpoint_wrapped_module.`` to every parameter name): its class is swapped for a subclass whose
``forward`` runs the original one under checkpoint, the way ``fully_shard`` swaps classes. Parameter
names, and so seeded initialisation, optimizer state and checkpoints, are the same with and without
recomputation.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def _save_list() -> set:
    ops = torch.ops.aten
    names = [
        (ops.mm, "default"), (ops.addmm, "default"), (ops.bmm, "default"), (ops.linear, "default"),
        (ops._scaled_dot_product_flash_attention, "default"),
        (ops._scaled_dot_product_efficient_attention, "default"),
        (ops._scaled_dot_product_cudnn_attention, "default"),
        (ops._scaled_dot_product_flash_attention_for_cpu, "default"),
    ]
    saved = {getattr(op, overload) for op, overload in names if hasattr(op, overload)}
    functional = getattr(torch.ops, "_c10d_functional", None)
    if functional is not None:
        for name in ("reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce"):
            if hasattr(functional, name):
                saved.add(getattr(functional, name).default)
    return saved


def _policy(saved: set):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


class _Recomputed:
    """Mixin placed before a block's class: forward under non-reentrant checkpoint."""

    _recompute_context_fn = None

    def forward(self, *args, **kwargs):
        extra = {"context_fn": self._recompute_context_fn} if self._recompute_context_fn is not None else {}
        return checkpoint(super().forward, *args, use_reentrant=False, **extra, **kwargs)


@functools.cache
def _recomputed_class(cls: type) -> type:
    return type(f"Recomputed{cls.__name__}", (_Recomputed, cls), {})


def apply_recompute(blocks: list[nn.Module], mode: str) -> None:
    """Recompute each block's activations in backward (``mode``: none | selective | full)."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ValueError(f"recompute mode must be none, selective or full, got {mode!r}")
    context_fn = None
    if mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _policy(_save_list()))
    for block in blocks:
        if isinstance(block, _Recomputed):
            continue
        block.__class__ = _recomputed_class(type(block))
        block._recompute_context_fn = context_fn
