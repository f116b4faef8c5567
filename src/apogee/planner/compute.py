"""Compute time of one micro-batch on one pipeline stage rank: GEMMs, attention, memory-bound ops.

GEMMs run at the accelerator's calibrated efficiency times their wave-quantization efficiency (a GEMM
is cut into output tiles and the tiles run in waves over the SMs; a last partial wave wastes the idle
SMs), and never faster than their memory traffic allows. Attention runs at ``attn_eff`` (flash) or as
GEMMs plus a memory-bound softmax (eager). Everything else (norms, activations, residuals, dropout,
softmax, the fp32 loss) is memory-bound: priced op by op (the byte table below) over the achievable
HBM bandwidth (``mem_bw_gbs x hbm_eff``). Attention and memory-bound work run at the stack's speed
relative to their kernels alone, as the GEMMs do through gemm_eff (``Accelerator.stack_speed``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

from apogee.planner.cluster import Accelerator
from apogee.planner.spec import ModelShape

TILE_M, TILE_N = 128, 256  # cuBLAS/CUTLASS's common large bf16 tile on Ampere and Hopper
# A tile's main loop runs K/k_step iterations behind a pipeline fill and an epilogue worth about 128
# of K (3-4 stages of 32-64 deep k-slices in CUTLASS's multistage/warp-specialised kernels), so a GEMM
# with reduction depth K reaches K/(K+128) of its large-K efficiency.
K_OVERHEAD = 128
# Bytes per GEMM operand element and, relative to 16-bit, per stored activation.
ELEM_BYTES = {"bf16": 2, "fp8": 1, "fp32": 4}


def hbm_bytes_per_s(acc: Accelerator) -> float:
    """What a streaming kernel achieves in the stack: the datasheet HBM bandwidth times the accelerator's
    ``hbm_eff`` (a copy kernel alone) times the stack's speed (``Accelerator.stack_speed``)."""
    return acc.mem_bw_gbs * 1e9 * acc.hbm_eff * acc.stack_speed


# --- memory-bound work, op by op ---------------------------------------------------------------------
# Bytes each non-GEMM, non-attention op reads and writes per token, in 16-bit activations (2 bytes per
# element, dropout masks 1 byte), for one layer and one micro-batch. h hidden, f ffn_hidden, kv the
# K/V width (kv_heads x head_dim). Two regions:
#   R: ops on the full hidden vector (norms, residual adds, bias-dropout-add): replicated on every TP
#      rank, or split 1/tp under sequence parallelism;
#   S: ops inside the TP-sharded part (activation function, rotary, bias grads of column-parallel
#      layers): 1/tp on every rank.
# GEMM operands and results are not counted here (the GEMM's own memory roofline covers them), nor
# what the attention kernel reads and writes (attn_eff covers flash attention; eager attention's
# score GEMMs are GEMMs, its softmax chain is counted below).
#
# GPT block (Megatron-LM: fused LayerNorm, bias in the GEMM epilogue, jit-fused bias-GeLU and
# bias-dropout-add, dropout 0.1 on both residual branches):
#   forward   R  LayerNorm x2: read x, write y                          2 x (2h + 2h)       = 8h
#                bias-dropout-add x2: read branch, residual; write out;
#                write the 1-byte mask                                  2 x (2h+2h+2h+1h)   = 14h
#             S  bias + GeLU on fc1's output: read, write               2f + 2f             = 4f
#   backward  R  dropout-add backward x2: read grad, mask; write grad  2 x (2h+1h+2h)      = 10h
#                LayerNorm backward x2: read dy, x; write dx            2 x 6h              = 12h
#                residual gradient sum x2: read two, write one          2 x 6h              = 12h
#                bias grads of the row-parallel layers (proj, fc2)      2 x 2h              = 4h
#             S  GeLU backward (+ fused dbias): read grad, pre-activation; write grad
#                                                                       2f + 2f + 2f        = 6f
#                qkv bias grad: read the qkv gradient                   2(h + 2kv)
#   = R 22h forward, 38h backward; with f = 4h: ~106h bytes per token per layer in all at tp=1.
# Llama block (RMSNorm, rotary, SwiGLU, no biases, no dropout):
#   forward   R  RMSNorm x2 (4h each), residual add x2 (read two, write one: 6h each)     = 20h
#             S  rotary on q and k: read, write                         4(h + kv)
#                SwiGLU: read gate, up; write silu(gate)*up             2f + 2f + 2f        = 6f
#   backward  R  RMSNorm backward x2 (6h each), residual gradient sum x2 (6h each)        = 24h
#             S  SwiGLU backward: read dy, gate, up; write dgate, dup   10f
#                rotary backward on dq, dk                              4(h + kv)
# Eager attention (Megatron 2021) adds the softmax chain on the b x a/t x s x s scores (E elements):
#   forward   fused scale-mask-softmax: read, write 2 + 2; dropout: read, write, mask 2 + 2 + 1  = 9E
#   backward  dropout backward: read grad, mask; write 2 + 1 + 2; softmax backward: read grad,
#             softmax output; write 2 + 2 + 2                                                = 11E
#   plus the [b a s d] -> [s b h] permute copy of the context (read, write: 4h/t each way).
# MoE layers: the routed MLP's activation on top_k copies of each token, and the token permute /
# unpermute copies (read, write 2h per copy, forward and backward: 2 x 4h x top_k each way).
def _block_bytes(m: ModelShape, *, moe: bool) -> tuple[float, float, float, float]:
    """(R forward, R backward, S forward, S backward) bytes per token, unsharded."""
    h, q, kv = m.hidden, m.q_dim, m.kv_dim
    if moe:
        f = m.moe_ffn_hidden * (m.top_k + m.shared_experts)
    else:
        f = m.ffn_hidden
    if m.mlp == "gelu":
        rf, rb = 22 * h, 38 * h
        sf, sb = 4 * f, 6 * f + 2 * (q + 2 * kv)
    else:
        rf, rb = 20 * h, 24 * h
        sf, sb = 4 * (q + kv) + 6 * f, 10 * f + 4 * (q + kv)
    if m.attention == "eager":
        sf, sb = sf + 4 * q, sb + 4 * q
    if moe:
        rf, rb = rf + 8 * h * m.top_k, rb + 8 * h * m.top_k
    return rf, rb, sf, sb


# apogee's own Llama block run eagerly (apogee.models.llama; `train.compile = false`): every op is its own
# kernel, so the count is far above the fused one above. Per token, per layer, for each dtype regime of
# the engine: "fp32" (CPU), "bf16" (FSDP2's bf16 parameters) and "autocast" (no FSDP on a GPU: fp32
# weights and residual stream, bf16 matmuls). Columns: R forward / backward (h-wide: RMSNorm in fp32 --
# the fused CUDA kernel, x.float() and back -- the gain, residual adds, under autocast also each Linear's
# bf16 cast of its fp32 input and of its input gradient), rotary forward / backward per q or kv element
# (x.float(), four half-width products, sub/add, stack, cast back), rotary cos/sin reads per head_dim,
# SwiGLU forward / backward per ffn element, and the last residual add (which recomputation skips: its
# backward needs nothing). Derived from the engine's op list and checked against it byte for byte by
# tests/unit/test_planner_traffic.py (a dispatch mode counting every op's operand bytes).
ENGINE_BLOCK_BYTES = {
    #            R fwd, R bwd, rope fwd, rope bwd, cos/sin fwd, bwd, swiglu fwd, bwd, last add
    "fp32": (56, 132, 36, 40, 8, 8, 20, 36, 12),
    "bf16": (60, 102, 48, 52, 4, 4, 10, 18, 6),
    "autocast": (82, 174, 48, 52, 8, 8, 10, 18, 10),
}
ENGINE_RSTD_BYTES = 8  # two RMSNorms' fp32 reciprocal RMS per token: written forward, read backward
# Under autocast each matmul weight is cast to bf16 in every forward (read 4, write 2 bytes) and its bf16
# gradient back to fp32 (read 2, write 4): 6 + 6 bytes per parameter per micro-batch, 6 more per recompute.
AUTOCAST_CAST_BYTES = 6
# apogee's loss, (forward, backward) bytes per logit: F.cross_entropy(logits.float()) over 16-bit logits:
# cast (read 2, write 4) 6, log_softmax (read, write) 8; backward: nll_loss's gradient (write) 4,
# log_softmax backward (read two, write one) 12, the cast back 6. fp32 logits skip both casts.
ENGINE_CE_BYTES = {"fp32": (8, 16), "bf16": (14, 22), "autocast": (14, 22)}


def engine_block_bytes(m: ModelShape, regime: str) -> tuple[float, float, float, float, float, float]:
    """apogee's eager block per token, unsharded: (R fwd, R bwd, S fwd, S bwd, R recompute, S recompute)."""
    rf, rb, qf, qb, cf, cb, ff, fb, last = ENGINE_BLOCK_BYTES[regime]
    h, q, kv, hd, f = m.hidden, m.q_dim, m.kv_dim, m.head_dim, m.ffn_hidden
    r_fwd, r_bwd = rf * h + ENGINE_RSTD_BYTES, rb * h + ENGINE_RSTD_BYTES
    s_fwd = qf * (q + kv) + 2 * cf * hd + ff * f
    s_bwd = qb * (q + kv) + 2 * cb * hd + fb * f
    return r_fwd, r_bwd, s_fwd, s_bwd, r_fwd - last * h, s_fwd


def elementwise_bytes(m: ModelShape, tp: int, cp: int, mb: int, sp: bool, *, moe: bool = False,
                      eager: str | None = None) -> tuple[float, float]:
    """(forward, backward) HBM bytes of one layer's memory-bound ops for one micro-batch on one rank.
    ``eager``: apogee's eager block in that dtype regime (ENGINE_BLOCK_BYTES) instead of the fused count."""
    tokens = mb * m.seq_len / cp
    r_div = tp if (sp and tp > 1) else 1
    if eager is not None and not moe:
        rf, rb, sf, sb, _, _ = engine_block_bytes(m, eager)
        return tokens * (rf / r_div + sf / tp), tokens * (rb / r_div + sb / tp)
    rf, rb, sf, sb = _block_bytes(m, moe=moe)
    fwd = tokens * (rf / r_div + sf / tp)
    bwd = tokens * (rb / r_div + sb / tp)
    if m.attention == "eager":
        scores = mb * m.heads / tp * (m.seq_len / cp) * m.seq_len
        fwd += 9 * scores
        bwd += 11 * scores
    return fwd, bwd


def selective_recompute_bytes(m: ModelShape, tp: int, cp: int, mb: int, sp: bool, eager: str | None = None) -> float:
    """HBM bytes the selective recompute pass adds: GPT/eager, the softmax chain forward (Korthikanti
    2022); Llama, the two norms' and SwiGLU's forward; apogee's eager block, its whole elementwise
    forward but the last residual add (apogee.parallel.recompute saves only matmul and attention outputs)."""
    if m.attention == "eager":
        return 9 * mb * m.heads / tp * (m.seq_len / cp) * m.seq_len
    tokens = mb * m.seq_len / cp
    r_div = tp if (sp and tp > 1) else 1
    if eager is not None:
        _, _, _, _, r_re, s_re = engine_block_bytes(m, eager)
        return tokens * (r_re / r_div + s_re / tp)
    return tokens * (8 * m.hidden / r_div + 6 * m.ffn_hidden / tp)


# Megatron-LM's vocab-parallel cross-entropy runs on logits.float() (V = vocab/tp columns per rank):
#   forward   cast bf16 -> fp32 (read 2V, write 4V) 6V; max (read) 4V; subtract max (read, write) 8V;
#             exp (read, write) 8V; sum (read) 4V; divide in place -> softmax, kept for backward 8V = 38V
#   backward  softmax - one_hot, times grad_output, in place (read, write) 8V; cast the gradient
#             back to bf16 for the output layer's dgrad GEMM (read 4V, write 2V) 6V               = 14V
CE_FWD_BYTES, CE_BWD_BYTES = 38, 14


def wave_eff(M: float, N: float, sms: int, batch: float = 1) -> float:
    """Fraction of SM-time doing useful tiles: the last wave of tiles leaves SMs idle, and a dimension
    smaller than a tile pads it (the library picks a narrower tile, down to 64)."""
    tn = min(TILE_N, 64 * -(-int(N) // 64))
    tiles = -(-int(M) // TILE_M) * -(-int(N) // tn) * int(batch)
    waves = -(-tiles // sms)
    pad = (M * N) / (TILE_M * -(-int(M) // TILE_M) * tn * -(-int(N) // tn))
    return tiles / (waves * sms) * pad


# The shape at which each accelerator's ``gemm_eff`` is stated: a square 8192^3 GEMM, the size of the
# documented H100 matmul measurement (shared/planner/FORMULAS.md), so a stated gemm_eff compares
# directly with such a measurement.
GEMM_REF_SHAPE = (8192, 8192, 8192)


def _gemm_parts(M: float, N: float, K: float, acc: Accelerator, peak: float, batch: float, elem_bytes: float,
                core: float) -> tuple[float, float]:
    """(tensor-core seconds at core efficiency ``core``, compulsory HBM seconds) of a GEMM."""
    flops = 2.0 * M * N * K * batch
    t_core = flops / (peak * core * wave_eff(M, N, acc.sms, batch) * K / (K + K_OVERHEAD))
    t_mem = elem_bytes * batch * (M * K + K * N + M * N) / hbm_bytes_per_s(acc)
    return t_core, t_mem


@lru_cache(maxsize=256)
def core_eff(acc: Accelerator, peak: float, elem_bytes: float = 2) -> float:
    """Main-loop efficiency, solved so that the reference GEMM (GEMM_REF_SHAPE) lands exactly on the
    accelerator's stated ``gemm_eff``: every other shape then differs from it only by its own wave
    quantization, K prologue and memory roofline."""
    M, N, K = GEMM_REF_SHAPE
    t_ref = 2.0 * M * N * K / (peak * acc.gemm_eff)
    t_core1, _ = _gemm_parts(M, N, K, acc, peak, 1, elem_bytes, 1.0)
    return t_core1 / t_ref


def gemm_time(M: float, N: float, K: float, acc: Accelerator, peak: float, batch: float = 1,
              elem_bytes: float = 2) -> float:
    """Seconds for ``batch`` [M,K]x[K,N] GEMMs: tensor-core time (calibrated main-loop efficiency x
    wave quantization x K/(K+128)), never faster than the operands and result cross HBM once.

    Tried and rejected (benchmarks/planner_accuracy.py, docs/planner.md): charging the HBM time on
    top of the core time (an arithmetic-intensity penalty, t_core + t_mem, or only the epilogue's
    store of C) makes the A100 rows worse (MAE 2.5% -> 7.6% / 5.0%) and moves the H100 rows by
    less than 2 points: the shapes in the published runs are all far above the ridge point.
    """
    key = (round(M), round(N), round(K))
    if acc.gemm_table is not None and key in acc.gemm_table:
        return batch * acc.gemm_table[key]
    shapes = acc.gemm_shape_table
    if shapes is not None and elem_bytes == 2 and key in shapes and GEMM_REF_SHAPE in shapes:
        # The measured ratio to the reference shape, at the reference's calibrated in-stack time.
        t_ref = 2.0 * math.prod(GEMM_REF_SHAPE) / (peak * acc.gemm_eff)
        return batch * shapes[key] / shapes[GEMM_REF_SHAPE] * t_ref
    t_core, t_mem = _gemm_parts(M, N, K, acc, peak, batch, elem_bytes, core_eff(acc, peak, elem_bytes))
    return max(t_core, t_mem)


_gemm_time = gemm_time


def gemm_efficiency(M: float, N: float, K: float, acc: Accelerator, precision: str = "bf16") -> float:
    """Predicted fraction of peak for one [M,K]x[K,N] GEMM (for reports and tests)."""
    peak = acc.peak(precision)
    return 2.0 * M * N * K / gemm_time(M, N, K, acc, peak, elem_bytes=ELEM_BYTES.get(precision, 2)) / peak


class LayerParts(NamedTuple):
    """Seconds of one transformer layer and micro-batch by kind of work; ``recompute`` is the backward's
    re-run forward (full) or its memory-bound part (selective)."""
    gemm_f: float
    gemm_b: float
    attn_f: float
    attn_b: float
    elem_f: float
    elem_b: float
    recompute: float

    @property
    def forward(self) -> float:
        return self.gemm_f + self.attn_f + self.elem_f

    @property
    def backward(self) -> float:
        return self.gemm_b + self.attn_b + self.elem_b + self.recompute


@lru_cache(maxsize=65536)
def layer_parts(m: ModelShape, tp: int, cp: int, ep: int, mb: int, sp: bool, recompute: str,
                acc: Accelerator, precision: str, eager: str | None = None, *, moe: bool = False,
                etp: int = 0) -> LayerParts:
    """One transformer layer's work for one micro-batch, by kind (GEMMs, attention, memory-bound ops).

    ``moe``: the layer's MLP is the MoE MLP (the caller weights dense and MoE layers), its experts split
    ``etp`` ways (Layout.etp; 0: tp). ``eager``: the memory-bound ops are apogee's eager block in that dtype
    regime (ENGINE_BLOCK_BYTES), else the fused count.
    """
    return _layer(m, tp, cp, ep, mb, sp, recompute, acc, precision, moe=moe, eager=eager, etp=etp or tp)


def layer_times(m: ModelShape, tp: int, cp: int, ep: int, mb: int, sp: bool, recompute: str,
                acc: Accelerator, precision: str, eager: str | None = None, *, moe: bool = False, etp: int = 0
                ) -> tuple[float, float]:
    """(forward seconds, backward seconds incl. recompute) of one transformer layer, one micro-batch."""
    parts = layer_parts(m, tp, cp, ep, mb, sp, recompute, acc, precision, eager, moe=moe, etp=etp)
    return parts.forward, parts.backward


def attn_efficiency(acc: Accelerator, head_dim: int) -> float:
    """Flash attention's fraction of peak in the stack: the kernel's measured figure (head-dim-64 where the
    accelerator has one: the kernels run small heads far below large ones; else ``attn_eff``) times the
    stack's speed (``Accelerator.stack_speed``)."""
    if head_dim <= 64 and acc.attn_eff_hd64 is not None:
        return acc.attn_eff_hd64 * acc.stack_speed
    return acc.attn_eff * acc.stack_speed


def _attn_gemms(m: ModelShape, tokens: float, tp: int) -> list[tuple[float, float, float]]:
    """The attention block's forward GEMMs [M, N, K]: fused or separate Q/K/V, then the output projection."""
    h, q = m.hidden, m.q_dim
    if m.fused_gemms:
        qkv = [(tokens, (q + 2 * m.kv_dim) / tp, h)]
    else:
        qkv = [(tokens, q / tp, h), (tokens, m.kv_dim / tp, h), (tokens, m.kv_dim / tp, h)]
    return qkv + [(tokens, h, q / tp)]


def _mlp_gemms(m: ModelShape, tokens: float, f: float, tp: int) -> list[tuple[float, float, float]]:
    """A dense MLP's forward GEMMs (GeLU: fc1, fc2; SwiGLU: gate and up, fused or not, then down)."""
    ups = m.mlp_mats - 1
    if m.fused_gemms or ups == 1:
        up = [(tokens, ups * f / tp, m.hidden)]
    else:
        up = [(tokens, f / tp, m.hidden)] * ups
    return up + [(tokens, m.hidden, f / tp)]


def dense_layer_gemms(m: ModelShape, tokens: float, tp: int) -> list[tuple[float, float, float]]:
    """A dense layer's forward GEMMs [M, N, K] on one TP rank, one per weight (the same shape repeats)."""
    return _attn_gemms(m, tokens, tp) + _mlp_gemms(m, tokens, m.ffn_hidden, tp)


def linear_products(M: float, N: float, K: float) -> list[tuple[tuple[int, int, int], str]]:
    """The three GEMMs the cost model prices for one forward [M,K] x [K,N], as ((M, N, K) key, role): the
    forward at (M, N, K), the input gradient at (M, K, N), the weight gradient at (K, N, M)."""
    keys = ((M, N, K), "fwd"), ((M, K, N), "dgrad"), ((K, N, M), "wgrad")
    return [((round(a), round(b), round(c)), role) for (a, b, c), role in keys]


def gemm_products(m: ModelShape, tp: int, cp: int, mb: int) -> list[tuple[tuple[int, int, int], str]]:
    """Every GEMM the cost model prices for a dense layer (three per weight) and the output layer (its
    forward; its backward is priced as twice it) at this layout, as (key, role) (``linear_products``)."""
    tokens = mb * m.seq_len / cp
    priced = [p for shape in dense_layer_gemms(m, tokens, tp) for p in linear_products(*shape)]
    return priced + linear_products(tokens, m.vocab / tp, m.hidden)[:1]


def gemm_shapes(m: ModelShape, tp: int, cp: int, mb: int) -> set[tuple[int, int, int]]:
    """Every (M, N, K) the cost model prices at this layout (what a measured gemm_table must hold)."""
    return {key for key, _ in gemm_products(m, tp, cp, mb)}


def elem_key(m: ModelShape, tp: int, cp: int, mb: int, sp: bool) -> tuple[int, ...]:
    """The per-rank shape of one block's memory-bound ops: (micro-batch, tokens per sequence of the norms and
    residuals, of the rotary and SwiGLU, hidden, query heads, kv heads, head dim, ffn hidden) on one rank."""
    seq = round(m.seq_len / cp)
    return (mb, seq // (tp if sp and tp > 1 else 1), seq, m.hidden, m.heads // tp, max(1, m.kv_heads // tp),
            m.head_dim, round(m.ffn_hidden / tp))


def _layer(m, tp, cp, ep, mb, sp, recompute, acc, precision, *, moe, eager, etp):
    peak = acc.peak(precision)
    eb = ELEM_BYTES.get(precision, 2)

    def gemm_time(M, N, K, acc, peak, batch=1):  # this precision's operand width
        return _gemm_time(M, N, K, acc, peak, batch, elem_bytes=eb)
    tokens = mb * m.seq_len / cp
    h = m.hidden
    gemms = _attn_gemms(m, tokens, tp)
    if moe:
        # Routed experts, Megatron-LM's way: each rank routes its own tokens (a sequence shard of them
        # under sequence parallelism, tokens / tp), the etp ranks splitting an expert pool theirs, and
        # each of the ep ranks of an expert group runs experts / ep experts, each on its share of the
        # group's tokens x top_k, at ffn width moe_ffn_hidden / etp. Per rank that is top_k dense MLPs'
        # FLOPs over tp whatever etp; the GEMMs' shapes differ (Grouped GEMM, one expert after another).
        routed = tokens / tp if sp and tp > 1 else tokens
        per_expert_tokens = max(1.0, tokens / tp * etp * m.top_k / m.experts * ep)
        n_local = m.experts // ep
        f = m.moe_ffn_hidden
        up = (m.mlp_mats - 1) * f / etp
        expert = gemm_time(per_expert_tokens, up, h, acc, peak) + gemm_time(per_expert_tokens, h, f / etp, acc, peak)
        moe_t = n_local * expert
        if m.shared_experts:
            fs = m.shared_experts * f
            gemms += [(tokens, (m.mlp_mats - 1) * fs / tp, h), (tokens, h, fs / tp)]
        gemms.append((routed, m.experts, h))  # router
    else:
        moe_t = 0.0
        f = m.ffn_hidden
        gemms += _mlp_gemms(m, tokens, f, tp)
    t_gemm = sum(gemm_time(M, N, K, acc, peak) for M, N, K in gemms) + moe_t
    # Backward: for a forward [M,K]x[K,N], the input gradient is [M,N]x[N,K] (reduction depth N) and
    # the weight gradient [K,M]x[M,N] (reduction depth M = the micro-batch's tokens); same FLOPs, other
    # shapes, so other wave and K-prologue efficiencies.
    t_gemm_b = sum(gemm_time(M, K, N, acc, peak) + gemm_time(K, N, M, acc, peak) for M, N, K in gemms) + 2 * moe_t

    # Attention scores: per rank heads/tp, queries tokens, keys seq_len (all keys under CP).
    attn_flops = 4.0 * tokens * m.seq_len * m.q_dim / tp
    peak16 = acc.peak("bf16")  # attention stays in 16-bit under fp8 recipes
    if m.attention == "flash":
        # Causal flash attention skips the masked half. attn_eff covers forward + backward together
        # (FA counts backward as 2.5x forward: it recomputes the scores); split 1 : 2.5.
        t_attn = 3.5 * attn_flops / 2 / (peak16 * attn_efficiency(acc, m.head_dim))
        attn_f, attn_b = t_attn / 3.5, t_attn * 2.5 / 3.5
    else:
        # Eager (Megatron 2021): per head, scores = Q K^T (K = head_dim) then O = P V (K = seq_len),
        # batched over micro-batch x heads/tp; the whole s x s square is computed, masked or not.
        nb = mb * m.heads / tp
        sq = m.seq_len / cp
        attn_f = _gemm_time(sq, m.seq_len, m.head_dim, acc, peak16, nb) + _gemm_time(sq, m.head_dim, m.seq_len, acc, peak16, nb)
        attn_b = 2 * attn_f
    act_scale = 2.0 if precision == "fp32" else 1.0  # the per-op counts are for 16-bit activations
    ef, eb_ = elementwise_bytes(m, tp, cp, mb, sp, moe=moe, eager=eager)
    bw = hbm_bytes_per_s(acc)
    scale = 1.0 if eager is not None else act_scale
    t_elem_f, t_elem_b = scale * ef / bw, scale * eb_ / bw
    measured = acc.elem_table.get(elem_key(m, tp, cp, mb, sp)) if acc.elem_table and not moe else None
    if measured is not None:
        # Forward one part, backward two (each op's backward reads and writes about twice its forward's bytes).
        t_elem_f, t_elem_b = measured / 3, 2 * measured / 3

    # The memory-bound part of a recompute pass. apogee's eager block re-runs its whole elementwise forward
    # but the last residual add, under full and selective recompute alike.
    re_elem = scale * selective_recompute_bytes(m, tp, cp, mb, sp, eager) / bw
    if recompute == "full":
        re = t_gemm + attn_f + (re_elem if eager is not None and measured is None else t_elem_f)
    elif recompute == "selective":
        # GPT/eager: recompute the attention core (scores, softmax, dropout); Llama: norms and SwiGLU.
        re = re_elem + (attn_f if m.attention == "eager" else 0.0)
    else:
        re = 0.0
    return LayerParts(t_gemm, t_gemm_b, attn_f, attn_b, t_elem_f, t_elem_b, re)


def logits_times(m: ModelShape, tp: int, cp: int, mb: int, acc: Accelerator, precision: str,
                 eager: str | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of the output projection + cross-entropy on the last stage
    (``eager``: apogee's loss in that dtype regime, ENGINE_CE_BYTES; else Megatron-LM's)."""
    peak = acc.peak(precision)
    tokens = mb * m.seq_len / cp
    f = gemm_time(tokens, m.vocab / tp, m.hidden, acc, peak, elem_bytes=ELEM_BYTES.get(precision, 2))
    per = tokens * m.vocab / tp / hbm_bytes_per_s(acc)
    if eager is not None:
        ce_f, ce_b = ENGINE_CE_BYTES[eager]
        return f + ce_f * per, 2 * f + ce_b * per
    return f + CE_FWD_BYTES * per, 2 * f + CE_BWD_BYTES * per
