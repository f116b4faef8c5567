"""Under tensor (and sequence) parallelism on 2 gloo ranks, the planner's activation bytes per rank
equal what each rank of apogee's model holds for backward (tests/activations.py), for every
recompute mode."""

from __future__ import annotations

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from activations import DIM, FFN, HEADS, KV, SEQ, TOKENS, VOCAB, held_after_forward

from apogee.planner.memory import activation_bytes_per_layer, head_activation_bytes
from apogee.planner.spec import Layout, ModelShape

CASES = [(sp, rc) for sp in (False, True) for rc in ("none", "selective", "full")]


def _worker(rank: int, world: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    results[rank] = [(held_after_forward(1, recompute=rc, tp_mesh=mesh, sequence_parallel=sp),
                      held_after_forward(3, recompute=rc, tp_mesh=mesh, sequence_parallel=sp)) for sp, rc in CASES]
    dist.destroy_process_group()


def test_tp2_activations_per_rank_match_the_planner(tmp_path):
    world = 2
    m = ModelShape(layers=1, hidden=DIM, heads=HEADS, kv_heads=KV, ffn_hidden=FFN, vocab=VOCAB, seq_len=SEQ)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, str(tmp_path / "init"), results), nprocs=world)
        got = {rank: results[rank] for rank in range(world)}
    for rank in range(world):
        for (sp, rc), (one, three) in zip(CASES, got[rank]):
            lay = Layout(tp=world, sequence_parallel=sp, recompute=rc)
            per_layer = (three - one) / 2
            expected = activation_bytes_per_layer(m, lay, micro_tokens=TOKENS, act_bytes=4.0)
            assert per_layer == pytest.approx(expected, rel=1e-6), (rank, sp, rc)
            head = head_activation_bytes(m, lay, micro_tokens=TOKENS, act_bytes=4.0)
            assert one - per_layer == pytest.approx(head, rel=0.01), (rank, sp, rc)
