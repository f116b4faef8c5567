"""All-gather context-parallel attention equals full causal attention, outputs and gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from apogee.parallel.context import ContextParallelAttention, load_balanced_positions


def test_load_balanced_positions_cover_the_sequence_evenly():
    cp, seq = 4, 32
    parts = [load_balanced_positions(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    # Causal work per rank (sum of positions + 1) is equal: the point of the mirrored split.
    work = {int((p + 1).sum()) for p in parts}
    assert len(work) == 1
    assert parts[0].tolist() == [0, 1, 2, 3, 28, 29, 30, 31]


def _worker(rank: int, world: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    torch.manual_seed(0)
    b, h, kv, s, d = 2, 4, 2, 24, 8
    q, k, v = (torch.randn(b, n, s, d, requires_grad=True) for n in (h, kv, kv))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    weight = torch.randn_like(ref)
    (ref * weight).sum().backward()
    pos = load_balanced_positions(s, world, rank)
    ql, kl, vl = (t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    out = ContextParallelAttention(mesh)(ql, kl, vl)
    (out * weight[:, :, pos]).sum().backward()
    errors = [
        (out - ref[:, :, pos]).abs().max().item(),
        (ql.grad - q.grad[:, :, pos]).abs().max().item(),
        (kl.grad - k.grad[:, :, pos]).abs().max().item(),
        (vl.grad - v.grad[:, :, pos]).abs().max().item(),
    ]
    results[rank] = errors
    dist.destroy_process_group()


def test_matches_full_attention_on_3_ranks(tmp_path):
    world = 3
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, str(tmp_path / "init"), results), nprocs=world)
        for rank in range(world):
            assert max(results[rank]) < 1e-5, (rank, results[rank])
