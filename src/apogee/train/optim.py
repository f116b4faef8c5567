"""AdamW, the learning-rate schedule, and gradient clipping that is correct over sharded parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from apogee.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay applies to matrices only; norm gains (1-D) are not decayed.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The parameters' device decides (the host under CPU offload, whatever the compute device).
    on_gpu = all(p.device.type == "cuda" for p in model.parameters())
    fast = {"fused": True} if on_gpu else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fast)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (1-based). Derived from the step alone, so the
    schedule needs no state of its own in a checkpoint."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        # Warmup-stable-decay: hold the peak, then decay linearly over the last decay_fraction.
        decay_start = cfg.steps - int(cfg.steps * cfg.decay_fraction)
        if step <= decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, *, pp: int = 1, counted_elsewhere: Sequence[torch.Tensor] = ()) -> float:
    """Global L2 norm of all gradients, as one process would compute it; clipped to ``max_norm``.

    Each rank sums the squares of its local shards, dividing a shard replicated over some mesh axes
    by their size so that every element counts once, and one all-reduce over the world adds them
    up. (DTensor's own norm reduces mesh axis by axis, one collective each.) Under pipeline
    parallelism (``pp`` stages) each rank holds only its stages' parameters: a plain tensor is then
    the same on the world / pp ranks of its stage, not on every rank. ``counted_elsewhere``: copies
    of a parameter another rank counts (a tied embedding's second copy), clipped but not counted.
    ``max_norm <= 0`` only measures.
    """
    for p in model.parameters():
        if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements):
            # Sequence-parallel norm gains leave partial sums over tp; reduce them once, here, so
            # the norm sees true values and the optimizer needs no reduction of its own.
            p.grad = p.grad.redistribute(p.grad.device_mesh, [Replicate() if pl.is_partial() else pl for pl in p.grad.placements])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    world = dist.get_world_size() if dist.is_initialized() else 1
    skip = {id(p.grad) for p in counted_elsewhere}
    # Local shards grouped by how many ranks hold a copy of each element, so that each group's squares
    # are divided once. One foreach norm per group: a few kernel launches and one read of each gradient,
    # where a loop over tensors launched several kernels a tensor and squared each into a temporary.
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if id(g) in skip:
            continue
        if isinstance(g, DTensor):
            copies = 1
            for size, placement in zip(g.device_mesh.shape, g.placements):
                if placement.is_replicate():
                    copies *= size
            by_copies.setdefault(copies, []).append(g.to_local())
        else:
            by_copies.setdefault(world // pp, []).append(g)  # the same on every rank of its stage
    total_sq = torch.zeros((), device=device, dtype=torch.float32)
    for copies, tensors in by_copies.items():
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        total_sq += torch.stack(norms).pow(2).sum() / copies
    if world > 1:
        dist.all_reduce(total_sq)
    total = total_sq.sqrt().item()
    if max_norm > 0 and grads:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return total
