"""Memory per device: model states (ZeRO stages), activations (GPT: Korthikanti 2022; Llama: apogee's own block), buffers.

All figures are bytes on one rank of the most loaded pipeline stage. Both ends are priced and the larger
total is returned: the first stage holds the embedding and, under 1F1B, the most micro-batches in
flight; the last holds the output layer (with tied embeddings, a copy of the embedding weight) and the
loss' fp32 logits, which dominate with a large vocabulary. A middle stage never exceeds the first: the
engine's split gives it no more layers (``stage_layer_counts``), it holds fewer micro-batches and no
embedding.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass
from functools import lru_cache

from apogee.parallel.balance import balanced_stage_sizes
from apogee.planner.cluster import GIB, Cluster
from apogee.planner.errors import PlannerError
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


def stage_layer_counts(m: ModelShape, lay: Layout, stack: str = "apogee") -> list[int]:
    """Layers of each of the ``pp x virtual_stages`` pipeline stages, as ``stack`` assigns them.

    Megatron-LM (``stack = "megatron"``) splits evenly where the stages divide the layers (its default,
    what the published runs used), or with ``layout.pp_split = "embedding_loss"`` gives the embedding and
    the loss a layer's slot each; otherwise, as with its uneven-split flags, and always for apogee:

    The engine's balance (``apogee.parallel.balance``, which ``apogee.parallel.pipeline.split_layers``
    uses too; tests/unit/test_planner_stages.py checks they agree): a layer costs its
    weights plus 2 x seq_len x hidden of attention, the last stage's output projection vocab x hidden in
    the same units; the smallest max-load cap is found and surplus layers come off the most loaded,
    latest stages first. So a large vocabulary moves layers off the last stage onto the others, and
    no stage holds more layers than the first.
    """
    return list(_layer_counts(m, lay.pp * lay.virtual_stages, lay.pp_split, stack))


@lru_cache(maxsize=4096)
def _layer_counts(m: ModelShape, n_stages: int, pp_split: str, stack: str) -> tuple[int, ...]:
    # Cached, as the helpers below: the search prices many layouts sharing a few splits.
    if pp_split == "embedding_loss":
        # Megatron-LM's embedding- and loss-aware split: layers + 2 slots in even chunks, the embedding in
        # the first chunk's first slot and the loss in the last chunk's last (estimate.check_layout
        # requires the slots to divide evenly).
        counts = [(m.layers + 2) // n_stages] * n_stages
        counts[0] -= 1
        counts[-1] -= 1
        return tuple(counts)
    if stack == "megatron" and n_stages > 1 and m.layers % n_stages == 0:
        return (m.layers // n_stages,) * n_stages
    L = m.layers
    if n_stages == 1:
        return (L,)
    if L < n_stages:
        raise PlannerError(f"model.layers={L} cannot fill layout.pp x layout.virtual_stages = {n_stages} pipeline stages")
    layer = m.attn_params() + m.dense_mlp_params() + 2 * m.seq_len * m.hidden
    caps = balanced_stage_sizes(L, n_stages, m.vocab * m.hidden / layer)
    return tuple(caps)


def rank_layer_ranges(m: ModelShape, lay: Layout, stage: str = "first", stack: str = "apogee") -> list[range]:
    """Global layer indices held by the pp rank running the ``stage`` ("first" or "last") pipeline stage.

    With virtual stages (interleaved 1F1B, torch's "loop" placement) pp rank r runs stages r, r + pp, ...:
    the first rank also holds stages pp, 2 pp, ..., the last rank stages 2 pp - 1, ..., the last one.
    """
    return list(_rank_layer_ranges(m, lay.pp, lay.virtual_stages, lay.pp_split, stack, stage))


@lru_cache(maxsize=4096)
def _rank_layer_ranges(m: ModelShape, pp: int, v: int, pp_split: str, stack: str, stage: str) -> tuple[range, ...]:
    counts = _layer_counts(m, pp * v, pp_split, stack)
    starts = list(itertools.accumulate(counts, initial=0))
    r = 0 if stage == "first" else pp - 1
    return tuple(range(starts[s], starts[s] + counts[s]) for s in range(r, len(counts), pp))


@lru_cache(maxsize=4096)
def _layers_held(m: ModelShape, pp: int, v: int, pp_split: str, stack: str, stage: str) -> tuple[int, int]:
    """(dense, MoE) layers the pp rank running ``stage`` holds (dense layers come first, ModelShape.dense_layers)."""
    dense_end = m.layers - m.moe_layers
    dense_here = moe_here = 0
    for r in _rank_layer_ranges(m, pp, v, pp_split, stack, stage):
        d = max(0, min(r.stop, dense_end) - r.start)
        dense_here += d
        moe_here += len(r) - d
    return dense_here, moe_here


def stage_params(m: ModelShape, lay: Layout, stage: str = "first", stack: str = "apogee") -> tuple[float, float]:
    """(non-expert params, routed-expert params) held by one rank of the ``stage`` ("first" or "last")
    pipeline stage. With ``pp == 1`` the one stage holds the whole model (the final norm, ``hidden``
    parameters, is left out there as it always was)."""
    if stage not in ("first", "last"):
        raise ValueError(f"stage must be 'first' or 'last', got {stage!r}")
    per_dense = m.attn_params() + m.norm_params() + m.dense_mlp_params()
    shared, routed = m.moe_layer_mlp_params() if m.moe_layers else (0, 0)
    per_moe_nonexpert = m.attn_params() + m.norm_params() + shared
    dense_here, moe_here = _layers_held(m, lay.pp, lay.virtual_stages, lay.pp_split, stack, stage)
    nonexpert = (dense_here * per_dense + moe_here * per_moe_nonexpert) / lay.tp
    if lay.pp == 1:
        nonexpert += (m.embedding_params() + m.output_params()) / lay.tp
    elif stage == "first":
        nonexpert += m.embedding_params() / lay.tp
    else:
        # The final norm and a vocab x hidden output weight: untied, the output layer; tied, the last
        # stage's copy of the embedding (apogee.parallel.pipeline.tie_across_stages), which
        # ModelShape.output_params() counts as 0 because the whole model holds it once.
        final_norm = 2 * m.hidden if m.mlp == "gelu" else m.hidden
        nonexpert += (m.vocab * m.hidden + final_norm) / lay.tp
    experts = moe_here * routed / (lay.ep * lay.etp)
    return nonexpert, experts


def wraps_in_fsdp(lay: Layout, stack: str = "apogee") -> bool:
    """Whether the stack runs this layout's data parallelism as FSDP units (weights gathered per block,
    gradients reduced per block). apogee does for every zero level it has (apogee.planner.export maps
    them): 3 is FSDP2, 2 is FSDP2 keeping each block's gathered weights from its forward to its backward
    (reshard_after_forward = "never"), 0 is FSDP2 over a replicate-only mesh (dp_replicate). Megatron-LM
    only at zero 3; its zero 1-2 are the distributed optimizer."""
    return lay.dp * lay.cp > 1 and (stack != "megatron" or lay.zero >= 3)


def reduces_each_micro_batch(lay: Layout, stack: str = "apogee") -> bool:
    """Whether apogee's FSDP2 reduce-scatters every micro-batch's gradients (parallel.grad_reduce =
    "micro_batch") and so accumulates them sharded: only without a pipeline (torch's schedule turns
    gradient sync off until the step's last backward) and where something is sharded (zero 2, 3)."""
    return (stack != "megatron" and wraps_in_fsdp(lay, stack) and lay.grad_reduce == "micro_batch"
            and lay.pp == 1 and lay.zero >= 2)


def engine_autocast(lay: Layout, precision: str) -> bool:
    """apogee without FSDP (nothing to shard or replicate over: one GPU, or tp / pp alone) trains bf16 as
    autocast over fp32 weights (apogee.train.trainer); FSDP2 instead gathers bf16 weights (param_dtype)."""
    return precision == "bf16" and not wraps_in_fsdp(lay)


def _sp_shard(lay: Layout) -> int:
    """How many ways sequence parallelism splits the h-wide activations (the norms, the residual)."""
    return lay.tp if lay.sequence_parallel and lay.tp > 1 else 1


def activation_bytes_per_layer(m: ModelShape, lay: Layout, *, micro_tokens: float, act_bytes: float = 2.0,
                               autocast: bool = False, compiled: bool = False) -> float:
    """Bytes of stored activations for one layer and one micro-batch of ``micro_tokens`` tokens (per CP
    rank), with activations of ``act_bytes`` bytes (2: bf16, 4: fp32).

    GPT blocks (the published Megatron-LM runs): Korthikanti 2022 Table 2 exactly, for 16-bit
    activations (scaled by ``act_bytes / 2``). Llama blocks: what apogee's own block
    (apogee.models.llama) leaves for backward, tensor by tensor, per token, in units of the hidden size
    (tests/unit/test_planner_activations.py measures the engine's live activation bytes and compares):

      each RMSNorm   its fp32 input (4: the x.float() copy under bf16, x itself in fp32), the normalised
                     output and the gain-scaled output (a each; the latter is the next Linears' input),
                     and the fp32 reciprocal RMS (4 bytes per token)
      attention      q, k, v after rotary: a (q + 2 kv), their widths per hidden unit (q = heads x head_dim /
                     hidden: 1 unless model.head_dim is set; kv = kv_heads x head_dim / hidden); the
                     attention output (also wo's input): a q;
                     the kernel's fp32 logsumexp: 4 per head and token
      SwiGLU         gate and up outputs, silu(gate), the product (w2's input): 4 a f / h

    Tensor parallelism (DTensor plans, apogee.parallel.tensor) shards the attention and MLP terms by tp.
    Under sequence parallelism the norms run on sequence shards (their input and normalised output
    shrink by tp), but the Linears keep the *all-gathered* input for their weight gradient, so the
    gain-scaled output stays whole, unlike Megatron's SP, which re-gathers it in backward.

    ``autocast`` (``engine_autocast``: fp32 weights, bf16 autocast; measured on an H100, docs/planner.md):
    the residual stream is fp32, so each RMSNorm keeps its fp32 input and fp32 normalised output, and
    every Linear after it keeps its own bf16 cast of the gain-scaled output (3 for q/k/v, 2 for
    gate/up); each Linear also keeps the bf16 cast of its fp32 weight (2 bytes per matmul weight, per
    micro-batch in flight: autocast re-casts in every forward). Recompute keeps the fp32 block input
    and no weight casts (they are recomputed).

    ``compiled`` (``layout.compile``: the engine's per-block torch.compile; what its autograd graph saves,
    counted by saved-tensor hooks on CPU and on an H100, tests/unit/test_planner_activations.py): the
    block input, the two reciprocal RMS, each norm's output once (in the activation dtype, shared by the
    Linears that read it: no fp32 normalised copy, no per-Linear cast), q/k/v, the attention output and
    its [tokens, h] copy that wo reads, the logsumexp, and three of SwiGLU's four ffn-wide tensors (the
    partitioner recomputes one); weight casts as eager. Counted for tp = 1, no recompute, dense blocks;
    otherwise the eager count stands (not measured compiled).

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
    norm_shard = _sp_shard(lay)
    block_input = 4.0 if autocast else a  # the residual stream: fp32 under autocast
    if lay.recompute == "full":
        return block_input * sbh / norm_shard  # the block input only
    f = (m.ffn_hidden if not m.moe_layers else m.moe_ffn_hidden * (m.top_k + m.shared_experts)) / m.hidden
    q, kv = m.q_dim / m.hidden, m.kv_dim / m.hidden  # widths per hidden unit (q is 1 unless head_dim is set)
    qkv = a * (q + 2 * kv) / t
    lse = 4 * m.heads / m.hidden / t
    counted_compiled = compiled and t == 1 and not m.moe_layers  # the compiled block's own count applies
    if lay.recompute == "selective":
        collective = a / t if sp else (a if t > 1 else 0.0)  # reduce-scatter (SP) or all-reduce output
        per = (block_input / norm_shard + qkv + a * q / t + lse + 2 * (a + collective) + 2 * a * f / t
               + (2 * a if sp else 0.0))
    elif counted_compiled:
        per = block_input + 8 / m.hidden + 2 * a + qkv + 2 * a * q + lse + 3 * a * f
    elif autocast:
        per = (norm_activation_units(m, lay, a, autocast_linears=3) + norm_activation_units(m, lay, a, autocast_linears=2)
               + qkv + a * q / t + lse + 4 * a * f / t)
    else:
        per = 2 * norm_activation_units(m, lay, a) + qkv + a * q / t + lse + 4 * a * f / t
    if m.moe_layers:
        per += a * m.top_k / norm_shard  # the token copies dispatched to experts
    if lay.cp > 1 and not counted_compiled:
        # apogee's context parallelism (apogee.parallel.context) all-gathers K and V, and attention keeps the
        # gathered ones (cp times the local); without recompute the two causal chunks' outputs are kept by
        # their attention calls beside the concatenated output wo reads (measured on 2 gloo ranks,
        # tests/distributed/test_planner_activations_cp.py). Selective recompute keeps the all-gathers'
        # outputs (collectives) and recomputes the concatenation: not measured.
        per += 2 * a * kv * (lay.cp - 1) / t + (a * q / t if lay.recompute == "none" else 0.0)
    weight_casts = 2.0 * (m.attn_params() + m.dense_mlp_params()) / t if autocast and lay.recompute == "none" else 0.0
    return sbh * per + weight_casts


def megatron_llama_activation_bytes(m: ModelShape, lay: Layout, *, micro_tokens: float,
                                    act_bytes: float = 2.0) -> float:
    """Bytes one Llama block keeps per micro-batch in Megatron-LM (``stack = "megatron"``), by Korthikanti
    2022's accounting (Table 2, whose GPT count is 34 sbh / t under sequence parallelism) applied to
    RMSNorm, rotary GQA attention with a flash kernel and SwiGLU, no dropout, in bytes per token per hidden
    unit at 16-bit activations: the two norms' inputs (2 + 2), the QKV input (2), q (2 q), k and v (4 kv),
    the attention output (2 q) (q, kv: the query and K/V widths over hidden, as in activation_bytes_per_layer)
    and the kernel's fp32 logsumexp (4 heads / hidden), the fc1 input (2),
    its gate and up outputs (4 f / h), the SwiGLU output (2 f / h). With sequence parallelism everything is
    split by tp: the norm outputs are kept sharded and re-gathered in backward (Korthikanti §4.2.2), unlike
    apogee's DTensor Linears (activation_bytes_per_layer). Without it the norm inputs and the QKV and fc1
    inputs are whole. Selective recompute re-runs the attention core, which a flash kernel does not store:
    the same as none. Full: the block input."""
    sbh = micro_tokens * m.hidden
    t = lay.tp
    if lay.recompute == "full":
        return act_bytes * sbh / _sp_shard(lay)
    f = (m.ffn_hidden if not m.moe_layers else m.moe_ffn_hidden * (m.top_k + m.shared_experts)) / m.hidden
    q = m.q_dim / m.hidden
    sharded = 2 * q + 4 * m.kv_dim / m.hidden + 2 * q + 4 * m.heads / m.hidden + 6 * f  # q, k/v, out, lse, MLP
    whole = 2 + 2 + 2 + 2  # norm inputs, QKV input, fc1 input
    units = (whole + sharded) / t if lay.sequence_parallel and t > 1 else whole + sharded / t
    if m.moe_layers:
        units += m.top_k / _sp_shard(lay)  # the token copies dispatched to experts
    return act_bytes / 2 * sbh * units


def norm_activation_units(m: ModelShape, lay: Layout, act_bytes: float, autocast_linears: int = 0) -> float:
    """Bytes per token per hidden unit one apogee RMSNorm keeps for backward (see above); under autocast
    (``autocast_linears`` > 0) its fp32 input and output, and one bf16 cast per Linear reading it."""
    norm_shard = _sp_shard(lay)
    if autocast_linears:
        return (4 + 4 + 4 / m.hidden) / norm_shard + 2 * autocast_linears
    return (4 + act_bytes + 4 / m.hidden) / norm_shard + act_bytes


def head_activation_bytes(m: ModelShape, lay: Layout, *, micro_tokens: float, act_bytes: float = 2.0,
                          autocast: bool = False, megatron: bool = False) -> float:
    """Bytes the stage holding the output layer keeps per micro-batch beyond its blocks: the final
    norm (llama) and the cross-entropy's fp32 log-softmax over the vocabulary shard (Korthikanti 2022
    §4.3: 4sbv/t); the 16-bit logits themselves are not kept. Under autocast also the output
    weight's bf16 cast (the output layer is never recomputed). ``megatron``: Megatron-LM's final
    RMSNorm keeps only its input (split by tp under sequence parallelism)."""
    logits = 4 * micro_tokens * m.vocab / lay.tp
    if m.mlp == "gelu":
        return logits
    if megatron:
        return logits + act_bytes * micro_tokens * m.hidden / _sp_shard(lay)
    norm = micro_tokens * m.hidden * norm_activation_units(m, lay, act_bytes, autocast_linears=1 if autocast else 0)
    return logits + norm + (2.0 * m.vocab * m.hidden / lay.tp if autocast else 0.0)


def loss_backward_bytes(m: ModelShape, lay: Layout, *, micro_tokens: float) -> float:
    """The transient peak at the start of backward on the stage with the output layer, on top of what
    forward and loss keep: 8 bytes per logit of the vocabulary shard (the fp32 gradient of the
    log-softmax input, its bf16 cast and one more bf16 logits-sized buffer; measured on an H100 with
    the engine, 7.83 GiB at 8192 tokens x 128256, docs/planner.md). apogee's loss only (llama)."""
    return 0.0 if m.mlp == "gelu" else 8.0 * micro_tokens * m.vocab / lay.tp


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


def in_flight_microbatches(lay: Layout, n_micro: int, stage: str = "first") -> float:
    """Micro-batches the ``stage`` ("first" or "last") rank holds, in units of 'all its layers of one micro-batch'.

    GPipe runs every forward before any backward: all ``n_micro`` everywhere. 1F1B: the first stage holds
    min(p, n_micro), the last one (its backward follows each forward at once). Interleaved 1F1B (torch's
    ScheduleInterleaved1F1B): rank r runs (v - 1) p + 2 (p - 1 - r) warm-up forwards of one chunk (1/v of
    its layers) before its first backward, so the first rank holds p (1 + (p - 1)/(p v)) (Korthikanti 2022
    §4.2.3) and the last ((v - 1) p + 1) / v.
    """
    p, v = lay.pp, lay.virtual_stages
    if p == 1:
        return 1.0
    if lay.pp_schedule == "gpipe":
        return float(n_micro)
    interleaved = lay.pp_schedule == "interleaved-1f1b" and v > 1
    if stage == "last":
        return min((v - 1) * p + 1, n_micro * v) / v if interleaved else 1.0
    held = float(min(p, n_micro))
    if interleaved:
        held *= 1 + (p - 1) / (p * v)  # Korthikanti 2022 §4.2.3
    return held


def memory_per_gpu(m: ModelShape, lay: Layout, cluster: Cluster, *, global_batch: int,
                   precision: str = "bf16", stack: str = "apogee") -> MemoryBreakdown:
    """The breakdown of the most loaded pipeline stage: the first or the last, whichever totals more
    (the first on a tie; with ``pp == 1`` the one stage)."""
    kw = dict(global_batch=global_batch, precision=precision, stack=stack)
    first = stage_memory(m, lay, cluster, stage="first", **kw)
    if lay.pp == 1:
        return first
    last = stage_memory(m, lay, cluster, stage="last", **kw)
    return last if last.total > first.total else first


def stage_memory(m: ModelShape, lay: Layout, cluster: Cluster, *, global_batch: int, precision: str = "bf16",
                 stage: str = "first", stack: str = "apogee") -> MemoryBreakdown:
    """Bytes on one rank of the ``stage`` ("first" or "last") pipeline stage, for ``stack``'s blocks
    (apogee's own, or Megatron-LM's: ``megatron_llama_activation_bytes`` for its Llama blocks)."""
    nonexpert, experts = stage_params(m, lay, stage, stack)
    shard_dp = lay.shard_group  # FSDP/ZeRO shard over the data and context axes (torchtitan's dp_shard x cp)
    megatron = stack == "megatron"
    fsdp = wraps_in_fsdp(lay, stack)
    zero, shards = lay.zero, shard_dp
    if not megatron:
        # apogee's FSDP2 keeps fp32 shards of weights and gradients and the Adam moments of its shard:
        # ZeRO-3's 16/nd bytes per parameter at zero 2 and 3 alike (zero 2's gathered weights are added
        # below), and the same state whole on every rank at zero 0 (a replicate-only mesh).
        zero, shards = 3, (1 if lay.zero == 0 else shard_dp)
    # Each expert's state is sharded over its replicas (experts are Megatron's alone: stack_refusal).
    w1, g1, o1 = zero_split(nonexpert, shards, zero)
    w2, g2, o2 = zero_split(experts, lay.expert_dp, zero)
    params, grads, opt = w1 + w2, g1 + g2, o1 + o2
    megatron_llama = megatron and m.mlp != "gelu"  # GPT blocks are Korthikanti's count in either stack
    autocast = engine_autocast(lay, precision) and not megatron
    if precision == "fp32" or autocast:
        # fp32 weights (the engine on CPU, or under autocast without FSDP): 4-byte weights and grads, 8 bytes
        # of Adam moments and no master copy; the same 16 bytes per parameter, split differently.
        params, grads, opt = params * 2, grads * 2, opt * 8 / 12
    if precision == "fp8":
        params += (nonexpert + experts) / (shard_dp if lay.zero >= 3 else 1)  # fp8 weight copies

    n_micro = max(1, global_batch // (lay.dp * lay.microbatch))
    micro_tokens = lay.microbatch * m.seq_len / lay.cp
    act_bytes = 4.0 if precision == "fp32" else 2.0
    gathered_bytes = 4 if precision == "fp32" else W_BYTES  # FSDP2's param_dtype (fp32 where the engine trains fp32)
    stage_weights = gathered_bytes * (nonexpert + experts)  # the stage's weights, all gathered
    keeps_gathered = fsdp and not megatron and lay.zero == 2
    if keeps_gathered:
        # reshard_after_forward = "never": every block keeps its gathered weights from its forward to its
        # backward, so the whole stage's are resident with the activations they serve.
        params += stage_weights
    if fsdp and n_micro > 1 and not megatron and not reduces_each_micro_batch(lay, stack):
        # Gradient sync off for all but the last micro-batch (parallel.grad_reduce = "step", or torch's
        # pipeline schedule): FSDP2 keeps each unit's gradient unsharded, in its fp32 reduce dtype, until
        # the one reduction: every gradient of the rank's stages is whole when the last micro-batch's
        # backward starts (torch fsdp _fsdp_param.to_accumulated_grad_if_needed). At zero 0 the
        # accumulated gradients are whole anyway (nothing is sharded).
        grads = 4.0 * (nonexpert + experts)

    def layer_bytes(layout: Layout) -> float:
        if megatron_llama:
            return megatron_llama_activation_bytes(m, layout, micro_tokens=micro_tokens, act_bytes=act_bytes)
        return activation_bytes_per_layer(m, layout, micro_tokens=micro_tokens, act_bytes=act_bytes,
                                          autocast=autocast, compiled=layout.compile)

    per_layer = layer_bytes(lay)
    layers_here = sum(_layers_held(m, lay.pp, lay.virtual_stages, lay.pp_split, stack, stage))
    acts = per_layer * layers_here * in_flight_microbatches(lay, n_micro, stage)
    has_output = lay.pp == 1 or stage == "last"
    # Transient peaks on top of what is kept: the loss' backward starts on the output stage, and under
    # full recompute the layer being recomputed holds its full activations during its backward; the
    # larger of the two (they do not overlap).
    transient = loss_backward_bytes(m, lay, micro_tokens=micro_tokens) if has_output and not megatron_llama else 0.0
    if lay.recompute == "full":
        transient = max(transient, layer_bytes(dataclasses.replace(lay, recompute="none")))
    acts += transient
    if m.mlp == "gelu" and (lay.pp == 1 or stage == "first"):
        # Megatron keeps the embedding's dropout output (Korthikanti 2022 §4.3); apogee's embedding
        # output is the first block's input, counted there.
        acts += act_bytes * micro_tokens * m.hidden / _sp_shard(lay)
    head = head_activation_bytes(m, lay, micro_tokens=micro_tokens, act_bytes=act_bytes, autocast=autocast,
                                 megatron=megatron_llama)
    if lay.pp == 1:
        acts += head  # one micro-batch's (accumulation runs them in turn)
    elif stage == "last":
        # The loss runs inside the last stage's forward, so what it saves lives as long as the
        # micro-batch: all of them under GPipe, one at a time under the 1F1B family.
        acts += head * (n_micro if lay.pp_schedule == "gpipe" else 1)

    buffers = cluster.accel.reserved_gib * GIB
    if fsdp:
        if not keeps_gathered:  # else they are among the kept gathered weights
            # Two unsharded layers in flight (the one computing and the one prefetched), in FSDP2's
            # param_dtype: bf16, or fp32 where the engine trains in fp32 (CPU).
            in_flight = 2 * stage_weights / max(1, layers_here)
            buffers += in_flight
            if lay.pp > 1 and not megatron:
                # Under a pipeline schedule torch keeps each block's gathered weights after its backward
                # until the step's last (pipelining.stage, backward_maybe_with_nosync: reshard_after_backward
                # False), and the next forward frees them again as it adds a micro-batch. So once a backward
                # has run the stage's weights are all gathered, with the micro-batch that backward freed gone.
                chunks = lay.virtual_stages if lay.pp_schedule == "interleaved-1f1b" else 1
                one_micro = per_layer * layers_here / chunks  # one micro-batch through one of its chunks
                params += max(0.0, stage_weights - in_flight - one_micro)
    elif lay.dp > 1:
        buffers += DP_BUCKET_BYTES
    if lay.tp > 1:
        buffers += 2 * micro_tokens * m.hidden * act_bytes  # all-gather / reduce-scatter staging
    return MemoryBreakdown(params=params, grads=grads, optimizer=opt, activations=acts, buffers=buffers)
