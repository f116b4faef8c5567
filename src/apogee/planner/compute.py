"""Compute time of one micro-batch on one pipeline stage rank: GEMMs, attention, memory-bound ops.

GEMMs run at the accelerator's calibrated efficiency times their wave-quantization efficiency (a GEMM
is cut into output tiles and the tiles run in waves over the SMs; a last partial wave wastes the idle
SMs), and never faster than their memory traffic allows. Attention runs at ``attn_eff`` (flash) or as
GEMMs plus a memory-bound softmax (eager). Everything else (norms, activations, residuals, dropout,
softmax) is memory-bound: priced as traffic over HBM bandwidth.
"""

from __future__ import annotations

from functools import lru_cache

from apogee.planner.cluster import Accelerator
from apogee.planner.memory import activation_bytes_per_layer
from apogee.planner.spec import Layout, ModelShape

TILE_M, TILE_N = 128, 256  # cuBLAS/CUTLASS's common large bf16 tile on Ampere and Hopper
# A tile's main loop runs K/k_step iterations behind a pipeline fill and an epilogue worth about 128
# of K (3-4 stages of 32-64 deep k-slices in CUTLASS's multistage/warp-specialised kernels), so a GEMM
# with reduction depth K reaches K/(K+128) of its large-K efficiency.
K_OVERHEAD = 128
# Bytes moved per stored activation byte in forward + backward by the memory-bound ops: written once
# and read once in forward, read once and its gradient written and read once in backward.
ELEMENTWISE_TRAFFIC = 5.0
# Bytes per GEMM operand element and, relative to 16-bit, per stored activation.
ELEM_BYTES = {"bf16": 2, "fp8": 1, "fp32": 4}


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
    t_mem = elem_bytes * batch * (M * K + K * N + M * N) / (acc.mem_bw_gbs * 1e9)
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
    t_core, t_mem = _gemm_parts(M, N, K, acc, peak, batch, elem_bytes, core_eff(acc, peak, elem_bytes))
    return max(t_core, t_mem)


_gemm_time = gemm_time


def gemm_efficiency(M: float, N: float, K: float, acc: Accelerator, precision: str = "bf16") -> float:
    """Predicted fraction of peak for one [M,K]x[K,N] GEMM (for reports and tests)."""
    peak = acc.peak(precision)
    return 2.0 * M * N * K / gemm_time(M, N, K, acc, peak, elem_bytes=ELEM_BYTES.get(precision, 2)) / peak


@lru_cache(maxsize=65536)
def layer_times(m: ModelShape, tp: int, cp: int, ep: int, mb: int, sp: bool, recompute: str,
                acc: Accelerator, precision: str) -> tuple[float, float]:
    """(forward seconds, backward seconds incl. recompute) of one transformer layer, one micro-batch.

    MoE layers use the MoE MLP; the caller weights dense and MoE layers.
    """
    return _layer(m, tp, cp, ep, mb, sp, recompute, acc, precision, moe=False)


@lru_cache(maxsize=65536)
def moe_layer_times(m: ModelShape, tp: int, cp: int, ep: int, mb: int, sp: bool, recompute: str,
                    acc: Accelerator, precision: str) -> tuple[float, float]:
    return _layer(m, tp, cp, ep, mb, sp, recompute, acc, precision, moe=True)


def _layer(m, tp, cp, ep, mb, sp, recompute, acc, precision, *, moe):
    peak = acc.peak(precision)
    eb = ELEM_BYTES.get(precision, 2)

    def gemm_time(M, N, K, acc, peak, batch=1):  # this precision's operand width
        return _gemm_time(M, N, K, acc, peak, batch, elem_bytes=eb)
    tokens = mb * m.seq_len / cp
    h = m.hidden
    gemms = [
        (tokens, (h + 2 * m.kv_dim) / tp, h),  # qkv
        (tokens, h, h / tp),  # attention output projection
    ]
    if moe:
        # Routed experts: each EP rank runs experts/ep experts on ~tokens*top_k*... tokens; the FLOPs
        # equal top_k dense MLPs of moe_ffn_hidden. Grouped GEMM per expert of tokens*top_k/experts*ep rows.
        per_expert_tokens = max(1.0, tokens * m.top_k / m.experts * ep)
        n_local = m.experts // ep
        f = m.moe_ffn_hidden
        up = (m.mlp_mats - 1) * f / tp
        expert = gemm_time(per_expert_tokens, up, h, acc, peak) + gemm_time(per_expert_tokens, h, f / tp, acc, peak)
        # ep ranks each hold n_local experts: total work per rank = n_local experts' GEMMs.
        moe_t = n_local * expert
        if m.shared_experts:
            fs = m.shared_experts * f
            gemms += [(tokens, (m.mlp_mats - 1) * fs / tp, h), (tokens, h, fs / tp)]
        gemms.append((tokens, m.experts, h))  # router
    else:
        moe_t = 0.0
        f = m.ffn_hidden
        gemms += [(tokens, (m.mlp_mats - 1) * f / tp, h), (tokens, h, f / tp)]
    t_gemm = sum(gemm_time(M, N, K, acc, peak) for M, N, K in gemms) + moe_t

    # Attention scores: per rank heads/tp, queries tokens, keys seq_len (all keys under CP).
    attn_flops = 4.0 * tokens * m.seq_len * h / tp
    peak16 = acc.peak("bf16")  # attention stays in 16-bit under fp8 recipes
    if m.attention == "flash":
        # Causal flash attention skips the masked half. attn_eff covers forward + backward together
        # (FA counts backward as 2.5x forward: it recomputes the scores); split 1 : 2.5.
        t_attn = 3.5 * attn_flops / 2 / (peak16 * acc.attn_eff)
        attn_f, attn_b = t_attn / 3.5, t_attn * 2.5 / 3.5
    else:
        # Eager (Megatron 2021): per head, scores = Q K^T (K = head_dim) then O = P V (K = seq_len),
        # batched over micro-batch x heads/tp; the whole s x s square is computed, masked or not.
        nb = mb * m.heads / tp
        sq = m.seq_len / cp
        attn_f = _gemm_time(sq, m.seq_len, m.head_dim, acc, peak16, nb) + _gemm_time(sq, m.head_dim, m.seq_len, acc, peak16, nb)
        attn_b = 2 * attn_f
    bytes_moved = activation_bytes_per_layer(
        m, Layout(tp=tp, cp=cp, microbatch=mb, sequence_parallel=sp, recompute="none"), micro_tokens=tokens
    )
    act_scale = 2.0 if precision == "fp32" else 1.0  # the breakdown counts 16-bit activations
    t_elem = ELEMENTWISE_TRAFFIC * act_scale * bytes_moved / (acc.mem_bw_gbs * 1e9)

    fwd = t_gemm + attn_f + 0.4 * t_elem
    bwd = 2 * t_gemm + attn_b + 0.6 * t_elem
    if recompute == "full":
        bwd += fwd
    elif recompute == "selective":
        # GPT/eager: recompute the attention core (scores, softmax, dropout); Llama: norms and SwiGLU.
        bwd += (attn_f + 0.2 * t_elem) if m.attention == "eager" else 0.2 * t_elem
    return fwd, bwd


def logits_times(m: ModelShape, tp: int, cp: int, mb: int, acc: Accelerator, precision: str) -> tuple[float, float]:
    """(forward, backward) seconds of the output projection + cross-entropy on the last stage."""
    peak = acc.peak(precision)
    tokens = mb * m.seq_len / cp
    f = gemm_time(tokens, m.vocab / tp, m.hidden, acc, peak, elem_bytes=ELEM_BYTES.get(precision, 2))
    ce = 3 * 4 * tokens * m.vocab / tp / (acc.mem_bw_gbs * 1e9)  # fp32 softmax: read, write, read
    return f + ce, 2 * f + ce
