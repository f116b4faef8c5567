"""The planner's activation memory against what apogee's own model keeps for backward, measured
(tests/activations.py). Two depths (1 and 3 layers) give the per-layer bytes and the rest (final
norm, loss); the planner's formulas must agree with both, per dtype and recompute mode."""

from __future__ import annotations

import pytest
import torch
from activations import DIM, FFN, HEADS, KV, SEQ, TOKENS, VOCAB, held_after_forward, saved_by_blocks

from apogee.planner.memory import activation_bytes_per_layer, head_activation_bytes
from apogee.planner.spec import Layout, ModelShape


@pytest.mark.parametrize("dtype,act_bytes", [(torch.float32, 4.0), (torch.bfloat16, 2.0)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_planner_activations_match_the_engine(dtype, act_bytes, recompute):
    one = held_after_forward(1, dtype=dtype, recompute=recompute)
    three = held_after_forward(3, dtype=dtype, recompute=recompute)
    per_layer = (three - one) / 2
    m = ModelShape(layers=1, hidden=DIM, heads=HEADS, kv_heads=KV, ffn_hidden=FFN, vocab=VOCAB, seq_len=SEQ)
    lay = Layout(recompute=recompute)
    assert per_layer == pytest.approx(activation_bytes_per_layer(m, lay, micro_tokens=TOKENS, act_bytes=act_bytes), rel=1e-6)
    # The rest: the final norm and the loss' fp32 log-softmax (plus 16 bytes of token ids per token).
    head = head_activation_bytes(m, lay, micro_tokens=TOKENS, act_bytes=act_bytes)
    assert one - per_layer == pytest.approx(head, rel=0.01)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_planner_activations_match_the_engine_under_autocast(recompute):
    # fp32 weights, bf16 autocast (the engine without FSDP, e.g. on one GPU): fp32 residual stream, a bf16
    # cast of each norm output per Linear, and of each matmul weight (recomputed under recompute).
    one = held_after_forward(1, recompute=recompute, autocast=True)
    three = held_after_forward(3, recompute=recompute, autocast=True)
    per_layer = (three - one) / 2
    m = ModelShape(layers=1, hidden=DIM, heads=HEADS, kv_heads=KV, ffn_hidden=FFN, vocab=VOCAB, seq_len=SEQ)
    lay = Layout(recompute=recompute)
    expect = activation_bytes_per_layer(m, lay, micro_tokens=TOKENS, act_bytes=2.0, autocast=True)
    assert per_layer == pytest.approx(expect, rel=1e-6)
    head = head_activation_bytes(m, lay, micro_tokens=TOKENS, act_bytes=2.0, autocast=True)
    assert one - per_layer == pytest.approx(head, rel=0.01)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_planner_activations_match_the_blocks_saved_tensors_eager_and_compiled(compiled, autocast):
    """What each block's autograd graph saves (saved-tensor hooks), eager and under the engine's per-block
    torch.compile, against the planner's count (layout.compile): compiled keeps each norm's output once,
    the attention output's [tokens, h] copy, and three of SwiGLU's four ffn-wide tensors. The same count
    matched an H100 (llama-1b block under autocast: 92.07 eager, 68.07 compiled, bytes per token per hidden
    unit with its weight casts; docs/planner.md)."""
    per_layer = (saved_by_blocks(3, compiled=compiled, autocast=autocast)
                 - saved_by_blocks(1, compiled=compiled, autocast=autocast)) / 2
    m = ModelShape(layers=1, hidden=DIM, heads=HEADS, kv_heads=KV, ffn_hidden=FFN, vocab=VOCAB, seq_len=SEQ)
    lay = Layout(compile=compiled)
    expect = activation_bytes_per_layer(m, lay, micro_tokens=TOKENS, act_bytes=2.0 if autocast else 4.0,
                                        autocast=autocast, compiled=compiled)
    assert per_layer == pytest.approx(expect, rel=1e-6)


def test_apogee_block_count_by_hand():
    # Llama-3-8B shape, bf16, no TP: two norms (4 + 2 + 2 + 4/h each), q/k/v 2(1 + 2 kv/a), the
    # attention output 2, logsumexp 4a/h, SwiGLU 8f/h bytes per token per hidden unit.
    m = ModelShape(layers=1, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256, seq_len=8192)
    per = activation_bytes_per_layer(m, Layout(), micro_tokens=8192) / (8192 * 4096)
    assert per == pytest.approx(2 * (8 + 4 / 4096) + 2 * (1 + 2 * 8 / 32) + 2 + 4 * 32 / 4096 + 8 * 14336 / 4096)
    # Sequence parallel over 8: the norms' fp32 input and normalised output shrink, the gathered
    # Linear input does not; the rest is sharded.
    sp = activation_bytes_per_layer(m, Layout(tp=8, sequence_parallel=True), micro_tokens=8192) / (8192 * 4096)
    assert sp == pytest.approx(2 * ((6 + 4 / 4096) / 8 + 2) + (2 * 1.5 + 2 + 4 * 32 / 4096 + 8 * 14336 / 4096) / 8)
