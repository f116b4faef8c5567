"""Memory per device: model states (ZeRO stages), activations (Korthikanti 2022), buffers.

All figures are bytes on the most loaded pipeline stage (the first: it holds the embedding and, under
1F1B, the most micro-batches in flight; the last stage's logits are checked too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from apogee.planner.cluster import GIB, Cluster
from apogee.planner.spec import Layout, ModelShape

# Mixed-precision Adam (Rajbhandari et al. 2020, §3.1): 2 bytes of 16-bit weights, 2 of 16-bit
# gradients, 12 of fp32 master weights, momentum and variance.
W_BYTES, G_BYTES, OPT_BYTES = 2, 2, 12
# CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation that no tensor accounts for: the
# accelerator's reserved_gib (2.5 GiB on GPUs; see cluster.py). This is the GPU default.
RESERVED_BYTES = 2.5 * GIB
DP_BUCKET_BYTES = 2 * 25_000_000 * 4  # two fp32 gradient buckets of 25M elements (DDP default size) in flight


def zero_model_state_bytes(psi: float, nd: int, stage: int) -> float:
    """Per-device model-state bytes for ``psi`` parameters on ``nd`` data-parallel ranks.

    ZeRO paper Figure 1: stage 0 = 16psi, 1 = 4psi + 12psi/nd, 2 = 2psi + 14psi/nd, 3 = 16psi/nd.
    """
    w, g, o = zero_split(psi, nd, stage)
    return w + g + o


def zero_split(psi: float, nd: int, stage: int) -> tuple[float, float, float]:
    w = W_BYTES * psi / (nd if stage >= 3 else 1)
    g = G_BYTES * psi / (nd if stage >= 2 else 1)
    o = OPT_BYTES * psi / (nd if stage >= 1 else 1)
    return w, g, o


@dataclass(frozen=True)
class MemoryBreakdown:
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def gib(self) -> dict[str, float]:
        d = {k: v / GIB for k, v in asdict(self).items()}
        d["total"] = self.total / GIB
        return d


def stage_params(m: ModelShape, lay: Layout) -> tuple[float, float]:
    """(non-expert params, routed-expert params) held by one rank of the first pipeline stage."""
    L = m.layers
    layers_here = -(-L // lay.pp)  # ceil: the first stage gets any remainder
    dense_here = max(0, min(layers_here, L - m.moe_layers))
    moe_here = layers_here - dense_here
    per_dense = m.attn_params() + m.norm_params() + m.dense_mlp_params()
    shared, routed = m.moe_layer_mlp_params() if m.moe_layers else (0, 0)
    per_moe_nonexpert = m.attn_params() + m.norm_params() + shared
    nonexpert = (dense_here * per_dense + moe_here * per_moe_nonexpert) / lay.tp
    nonexpert += m.embedding_params() / lay.tp
    if lay.pp == 1:
        nonexpert += m.output_params() / lay.tp
    experts = moe_here * routed / (lay.ep * lay.tp)
    return nonexpert, experts


def activation_bytes_per_layer(m: ModelShape, lay: Layout, *, micro_tokens: float, act_bytes: float = 2.0) -> float:
    """Bytes of stored activations for one layer and one micro-batch of ``micro_tokens`` tokens (per CP
    rank), with activations of ``act_bytes`` bytes (2: bf16, 4: fp32).

    GPT blocks (the published Megatron-LM runs): Korthikanti 2022 Table 2 exactly, for 16-bit
    activations (scaled by ``act_bytes / 2``). Llama blocks: what apogee's own block
    (apogee.models.llama) leaves for backward, tensor by tensor, per token, in units of the hidden size
    (tests/unit/test_planner.py measures the engine's live activation bytes and compares):

      each RMSNorm   its fp32 input (4: the x.float() copy under bf16, x itself in fp32), the normalised
                     output and the gain-scaled output (a each; the latter is the next Linears' input),
                     and the fp32 reciprocal RMS (4 bytes per token)
      attention      q, k, v after rotary: a (1 + 2 kv/heads); the attention output (also wo's input): a;
                     the kernel's fp32 logsumexp: 4 per head and token
      SwiGLU         gate and up outputs, silu(gate), the product (w2's input): 4 a f / h

    Tensor parallelism (DTensor plans, apogee.parallel.tensor) shards the attention and MLP terms by tp.
    Under sequence parallelism the norms run on sequence shards (their input and normalised output
    shrink by tp), but the Linears keep the *all-gathered* input for their weight gradient, so the
    gain-scaled output stays whole, unlike Megatron's SP, which re-gathers it in backward.

    Recompute ``full`` keeps the block input. ``selective`` (apogee.parallel.recompute: save the
    outputs of matmuls, attention and collectives, recompute the elementwise rest) keeps the block
    input, q/k/v, the attention output and logsumexp, every matmul output (wo and w2 included: under
    tp as the pre-reduction partial sum, plus the collective's result), the gate and up outputs, and
    under sequence parallelism the two all-gathered norm outputs.
    """
    sbh = micro_tokens * m.hidden
    t = lay.tp
    sp = lay.sequence_parallel and t > 1
    if m.mlp == "gelu":
        return act_bytes / 2 * _korthikanti_gpt(m, lay, sbh, t, sp)
    a = act_bytes
    norm_shard = t if sp else 1
    if lay.recompute == "full":
        return a * sbh / norm_shard  # the block input only
    f = (m.ffn_hidden if not m.moe_layers else m.moe_ffn_hidden * (m.top_k + m.shared_experts)) / m.hidden
    kv = m.kv_heads / m.heads
    qkv = a * (1 + 2 * kv) / t
    lse = 4 * m.heads / m.hidden / t
    if lay.recompute == "selective":
        collective = a / t if sp else (a if t > 1 else 0.0)  # reduce-scatter (SP) or all-reduce output
        per = (a / norm_shard + qkv + a / t + lse + 2 * (a + collective) + 2 * a * f / t
               + (2 * a if sp else 0.0))
    else:
        per = 2 * norm_activation_units(m, lay, a) + qkv + a / t + lse + 4 * a * f / t
    if m.moe_layers:
        per += a * m.top_k / norm_shard  # the token copies dispatched to experts
    return sbh * per


def norm_activation_units(m: ModelShape, lay: Layout, act_bytes: float) -> float:
    """Bytes per token per hidden unit one apogee RMSNorm keeps for backward (see above)."""
    norm_shard = lay.tp if lay.sequence_parallel and lay.tp > 1 else 1
    return (4 + act_bytes + 4 / m.hidden) / norm_shard + act_bytes


def head_activation_bytes(m: ModelShape, lay: Layout, *, micro_tokens: float, act_bytes: float = 2.0) -> float:
    """Bytes the stage holding the output layer keeps per micro-batch beyond its blocks: the final
    norm (llama) and the cross-entropy's fp32 log-softmax over the vocabulary shard (Korthikanti 2022
    §4.3: 4sbv/t); the 16-bit logits themselves are not kept."""
    logits = 4 * micro_tokens * m.vocab / lay.tp
    if m.mlp == "gelu":
        return logits
    return logits + micro_tokens * m.hidden * norm_activation_units(m, lay, act_bytes)


def _korthikanti_gpt(m: ModelShape, lay: Layout, sbh: float, t: int, sp: bool) -> float:
    """GPT block (dropout, GeLU, LayerNorm), 16-bit: Korthikanti's terms; flash attention stores no scores."""
    if lay.recompute == "full":
        return 2 * sbh / (t if sp else 1)
    a, s = m.heads, m.seq_len / lay.cp
    score = 5 * a * s / m.hidden if m.attention == "eager" else 0.0
    if lay.recompute == "selective":
        score = 0.0
    if sp:
        return sbh * (34 / t + score / t)
    return sbh * (10 + 24 / t + score / t)


def in_flight_microbatches(lay: Layout, n_micro: int) -> float:
    """Layers' worth of micro-batches the first stage holds, in units of 'all L/p layers of one micro-batch'."""
    p, v = lay.pp, lay.virtual_stages
    if p == 1:
        return 1.0
    if lay.pp_schedule == "gpipe":
        return float(n_micro)
    held = float(min(p, n_micro))
    if lay.pp_schedule == "interleaved-1f1b" and v > 1:
        held *= 1 + (p - 1) / (p * v)  # Korthikanti 2022 §4.2.3
    return held


def memory_per_gpu(m: ModelShape, lay: Layout, cluster: Cluster, *, global_batch: int,
                   precision: str = "bf16") -> MemoryBreakdown:
    nonexpert, experts = stage_params(m, lay)
    shard_dp = lay.dp * lay.cp  # FSDP/ZeRO shard over the data and context axes (torchtitan's dp_shard x cp)
    ex_dp = max(1, shard_dp // lay.ep)
    w1, g1, o1 = zero_split(nonexpert, shard_dp, lay.zero)
    w2, g2, o2 = zero_split(experts, ex_dp, lay.zero)
    params, grads, opt = w1 + w2, g1 + g2, o1 + o2
    if precision == "fp32":
        # Plain fp32 training (the engine on CPU): 4-byte weights and grads, 8 bytes of Adam moments and no
        # master copy; the same 16 bytes per parameter, split differently across the ZeRO stages.
        params, grads, opt = params * 2, grads * 2, opt * 8 / 12
    if precision == "fp8":
        params += (nonexpert + experts) / (shard_dp if lay.zero >= 3 else 1)  # fp8 weight copies

    n_micro = max(1, global_batch // (lay.dp * lay.microbatch))
    micro_tokens = lay.microbatch * m.seq_len / lay.cp
    act_bytes = 4.0 if precision == "fp32" else 2.0
    per_layer = activation_bytes_per_layer(m, lay, micro_tokens=micro_tokens, act_bytes=act_bytes)
    layers_here = -(-m.layers // lay.pp)
    acts = per_layer * layers_here * in_flight_microbatches(lay, n_micro)
    if lay.recompute == "full":
        # The layer being recomputed holds its full activations during its backward.
        full = activation_bytes_per_layer(m, dataclasses.replace(lay, recompute="none"), micro_tokens=micro_tokens,
                                          act_bytes=act_bytes)
        acts += full
    if m.mlp == "gelu":
        # Megatron keeps the embedding's dropout output (Korthikanti 2022 §4.3); apogee's embedding
        # output is the first block's input, counted there.
        acts += act_bytes * micro_tokens * m.hidden / (lay.tp if lay.sequence_parallel else 1)
    if lay.pp == 1:
        acts += head_activation_bytes(m, lay, micro_tokens=micro_tokens, act_bytes=act_bytes)

    buffers = cluster.accel.reserved_gib * GIB
    if lay.zero >= 3 and shard_dp > 1:
        # Two unsharded layers in flight (the one computing and the one prefetched).
        per_layer_params = (nonexpert + experts) / max(1, layers_here)
        buffers += 2 * W_BYTES * per_layer_params
    elif lay.dp > 1:
        buffers += DP_BUCKET_BYTES
    if lay.tp > 1:
        buffers += 2 * micro_tokens * m.hidden * act_bytes  # all-gather / reduce-scatter staging
    return MemoryBreakdown(params=params, grads=grads, optimizer=opt, activations=acts, buffers=buffers)

