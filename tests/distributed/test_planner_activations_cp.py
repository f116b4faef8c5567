"""Under context parallelism on 2 gloo ranks (apogee.parallel.context: K and V all-gathered), the planner's
activation bytes per block equal what each rank's blocks save for backward (tests/activations.py,
saved-tensor hooks), in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
from activations import DIM, FFN, HEADS, KV, SEQ, TOKENS, VOCAB, measured_on_ranks, saved_by_blocks

from apogee.planner.memory import activation_bytes_per_layer
from apogee.planner.spec import Layout, ModelShape

AUTOCAST = (False, True)


def _measure(mesh):
    return [(saved_by_blocks(1, autocast=ac, cp_mesh=mesh), saved_by_blocks(3, autocast=ac, cp_mesh=mesh))
            for ac in AUTOCAST]


def test_cp2_activations_per_rank_match_the_planner(tmp_path):
    world = 2
    m = ModelShape(layers=1, hidden=DIM, heads=HEADS, kv_heads=KV, ffn_hidden=FFN, vocab=VOCAB, seq_len=SEQ)
    got = measured_on_ranks(_measure, world, "cp", str(tmp_path / "init"))
    for rank in range(world):
        for autocast, (one, three) in zip(AUTOCAST, got[rank]):
            per_layer = (three - one) / 2
            want = activation_bytes_per_layer(m, Layout(cp=world), micro_tokens=TOKENS / world,
                                              act_bytes=2.0 if autocast else 4.0, autocast=autocast)
            plain = activation_bytes_per_layer(m, Layout(), micro_tokens=TOKENS / world,
                                               act_bytes=2.0 if autocast else 4.0, autocast=autocast)
            assert per_layer - plain > 0.8 * (want - plain) > 0  # the gathered K/V and the output copy are real
            # fp32 within 1%: on CPU the lower-right causal chunk's attention also keeps a materialised mask
            # (4 KiB here; GPU kernels take the causal bias without one), which the planner leaves out.
            # Under autocast the count still moves between processes (the modal count over five passes,
            # tests/activations.py): -0.3..+1.3% per layer from the counts seen in four runs (not found why).
            assert per_layer == pytest.approx(want, rel=0.025 if autocast else 0.01), (rank, autocast)
