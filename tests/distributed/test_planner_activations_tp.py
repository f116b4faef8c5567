"""Under tensor (and sequence) parallelism on 2 gloo ranks, the planner's activation bytes per rank
equal what each rank of apogee's model holds for backward (tests/activations.py), for every
recompute mode."""

from __future__ import annotations

import pytest
from activations import DIM, FFN, HEADS, KV, SEQ, TOKENS, VOCAB, held_after_forward, measured_on_ranks

from apogee.planner.memory import activation_bytes_per_layer, head_activation_bytes
from apogee.planner.spec import Layout, ModelShape

CASES = [(sp, rc) for sp in (False, True) for rc in ("none", "selective", "full")]


def _measure(mesh):
    return [(held_after_forward(1, recompute=rc, tp_mesh=mesh, sequence_parallel=sp),
             held_after_forward(3, recompute=rc, tp_mesh=mesh, sequence_parallel=sp)) for sp, rc in CASES]


def test_tp2_activations_per_rank_match_the_planner(tmp_path):
    world = 2
    m = ModelShape(layers=1, hidden=DIM, heads=HEADS, kv_heads=KV, ffn_hidden=FFN, vocab=VOCAB, seq_len=SEQ)
    got = measured_on_ranks(_measure, world, "tp", str(tmp_path / "init"))
    for rank in range(world):
        for (sp, rc), (one, three) in zip(CASES, got[rank]):
            lay = Layout(tp=world, sequence_parallel=sp, recompute=rc)
            per_layer = (three - one) / 2
            expected = activation_bytes_per_layer(m, lay, micro_tokens=TOKENS, act_bytes=4.0)
            assert per_layer == pytest.approx(expected, rel=1e-6), (rank, sp, rc)
            head = head_activation_bytes(m, lay, micro_tokens=TOKENS, act_bytes=4.0)
            assert one - per_layer == pytest.approx(head, rel=0.01), (rank, sp, rc)
