"""The planner's byte count of apogee's eager block (planner.compute.ENGINE_BLOCK_BYTES) against the
engine itself: every memory-bound op's operand and result bytes in one forward + loss + backward,
counted by a dispatch mode (tests/traffic.py), per layer and per token, in each dtype regime the
engine trains in, with and without recomputation."""

from __future__ import annotations

import pytest
from traffic import count_step

from apogee.planner.compute import AUTOCAST_CAST_BYTES, ENGINE_CE_BYTES, engine_block_bytes
from apogee.planner.spec import ModelShape

SHAPES = [  # (dim, heads, kv_heads, ffn): GQA with head_dim 16, and head_dim 48 with one kv head
    (64, 4, 2, 160),
    (96, 2, 1, 256),
]
T1, T2 = 16, 32


def _shape(dim, heads, kv, ffn, vocab=512) -> ModelShape:
    return ModelShape(layers=1, hidden=dim, heads=heads, kv_heads=kv, ffn_hidden=ffn, vocab=vocab, seq_len=T2)


@pytest.mark.parametrize("regime", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("dims", SHAPES, ids=["hd16", "hd48"])
def test_engine_block_bytes_equal_the_engines_ops(regime, recompute, dims):
    dim, heads, kv, ffn = dims
    counts = {(L, T): count_step(layers=L, tokens=T, dim=dim, heads=heads, kv_heads=kv, ffn=ffn, vocab=512,
                                 regime=regime, recompute=recompute).total()
              for L in (1, 2) for T in (T1, T2)}
    per_layer = {T: counts[2, T] - counts[1, T] for T in (T1, T2)}
    per_token = (per_layer[T2] - per_layer[T1]) / (T2 - T1)
    per_layer_fixed = per_layer[T1] - per_token * T1

    r_f, r_b, s_f, s_b, r_re, s_re = engine_block_bytes(_shape(*dims), regime)
    expected = r_f + r_b + s_f + s_b + (r_re + s_re if recompute != "none" else 0.0)
    assert per_token == expected, (per_token, expected)

    # Per layer, whatever the tokens: under autocast each matmul weight's cast to bf16 and its gradient's
    # cast back (again in a recompute); the norm gains' reads, a few times dim bytes, in every regime.
    m = _shape(*dims)
    matmul_params = m.attn_params() + m.dense_mlp_params()
    casts = (2 + (recompute != "none")) * AUTOCAST_CAST_BYTES * matmul_params if regime == "autocast" else 0
    assert abs(per_layer_fixed - casts) <= 64 * dim, (per_layer_fixed, casts)


@pytest.mark.parametrize("regime", ["fp32", "bf16", "autocast"])
def test_engine_loss_bytes_per_logit(regime):
    """The loss over logits.float() (ENGINE_CE_BYTES): per token, the head's traffic is the vocabulary
    times the per-logit bytes; the final norm and the embedding add a few times dim (< 1% here)."""
    dim, heads, kv, ffn, vocab = 32, 2, 1, 64, 16384
    rest = {}
    for T in (T1, T2):
        one, two = (count_step(layers=L, tokens=T, dim=dim, heads=heads, kv_heads=kv, ffn=ffn, vocab=vocab,
                               regime=regime).total() for L in (1, 2))
        rest[T] = 2 * one - two  # the model without its block
    per_token = (rest[T2] - rest[T1]) / (T2 - T1)
    assert per_token == pytest.approx(sum(ENGINE_CE_BYTES[regime]) * vocab, rel=0.01)
