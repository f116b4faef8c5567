"""Context parallelism: each rank of the cp axis holds a slice of every sequence.

Attention needs all keys and values of a sequence, so each block all-gathers K and V over the cp
axis and attends its local queries to them (Llama 3's all-gather context parallelism; Dubey et
al. 2024, section 3.3.2). K/V are small under grouped-query attention, which makes the all-gather
cheaper than a ring of point-to-point exchanges and keeps the kernel a plain SDPA call. The
backward of the all-gather is a reduce-scatter, so gradients of K/V reach the ranks that own them.

Causal attention gives late tokens more work than early ones, so sequences are split into 2 x cp
chunks and rank i takes chunks i and 2cp-1-i: every rank then holds the same amount of work.

Each local chunk attends to the keys up to its own end, causally aligned to the bottom right (the
chunk's last query sees the last key): one SDPA call per chunk with torch's lower-right causal bias,
which the fused kernels (flash, memory-efficient) accept, so no [local, seq] mask is ever built and a
GPU keeps its flash kernel at long sequence lengths.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.bias import causal_lower_right


def load_balanced_positions(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global positions of the tokens that cp rank ``rank`` holds, in its local order."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    mirror = 2 * cp - 1 - rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


class ContextParallelAttention(nn.Module):
    """Causal attention of local queries against keys and values gathered from the whole cp axis.

    Inputs are [batch, heads, local_seq, head_dim] in the load-balanced order (chunks ``rank`` and
    ``2 cp - 1 - rank``); the gathered keys are put back in sequence order, and each local chunk
    attends to the prefix ending with it, so the result equals full-sequence causal attention
    restricted to the local queries.
    """

    def __init__(self, cp_mesh: DeviceMesh):
        super().__init__()
        self.cp_mesh = cp_mesh
        self.cp = cp_mesh.size()
        self.rank = cp_mesh.get_local_rank()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        chunk = q.shape[2] // 2
        k_all = _gather_seq(k, self.cp_mesh, self.cp)  # [batch, heads, seq, dim] in sequence order
        v_all = _gather_seq(v, self.cp_mesh, self.cp)
        out = []
        for half, global_chunk in enumerate((self.rank, 2 * self.cp - 1 - self.rank)):
            end = (global_chunk + 1) * chunk  # keys up to this chunk's last token
            out.append(F.scaled_dot_product_attention(
                q[:, :, half * chunk:(half + 1) * chunk], k_all[:, :, :end], v_all[:, :, :end],
                attn_mask=causal_lower_right(chunk, end), enable_gqa=q.shape[1] != k.shape[1]))
        return torch.cat(out, dim=2)


# torch 2.13 renamed the differentiable all-gather; 2.11 has only the old name.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _gather_seq(x: torch.Tensor, mesh: DeviceMesh, cp: int) -> torch.Tensor:
    """All-gather the load-balanced [batch, heads, local, dim] slices along the sequence dim (2), back in
    sequence order, differentiably: rank r holds chunks r and 2cp-1-r, so the first halves in rank order
    are chunks 0..cp-1 and the second halves in reverse rank order chunks cp..2cp-1."""
    gathered = _all_gather_autograd(x.contiguous(), gather_dim=0, group=mesh)  # [cp*batch, ...], rank-major
    halves = [part.chunk(2, dim=2) for part in gathered.chunk(cp, dim=0)]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=2)


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Swap every block's attention core for the all-gather context-parallel one."""
    for block in model.layers.values():
        block.attention.core = ContextParallelAttention(cp_mesh)
