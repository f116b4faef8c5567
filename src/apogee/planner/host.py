"""Host-side cost of a step on a host-bound device (the cpu device): op dispatch, autograd, DTensor, FSDP2.

On a GPU the host enqueues kernels ahead of the device and this work hides behind it (its accelerators
carry zero costs). On CPU ranks every Python-level torch call, autograd node, DTensor sharding
propagation and FSDP2 hook runs on the same cores as the math, and for small models it is most of
the step. Where the device carries a measured host table (``measured_host_s``: a replica of the layout at
the run's parameter sizes and a few tokens, timed by benchmarks/planner_vs_measured.py) that is the cost,
and it also holds the work that scales with the parameters rather than the tokens (FSDP2's gathers,
copies and reduce-scatters, clipping and AdamW over the real parameters). Otherwise it is count x
unit cost: the counts below are the engine's own (apogee's Llama block, torchtitan-style TP plan,
FSDP2 per block), the unit costs come from micro-benchmarks of one primitive each (a chain of tiny
ops forward + backward, a chain of DTensor ops, one FSDP2 unit around a tiny Linear).
"""

from __future__ import annotations

from apogee.planner.cluster import Accelerator
from apogee.planner.spec import Layout, ModelShape

# apogee.models.llama, counted with a TorchFunctionMode (forward calls) and a walk of the autograd
# graph (backward nodes); tests/unit/test_planner.py re-counts them from the model so they cannot drift.
#   one TransformerBlock: 65 torch calls forward (2 RMSNorms, 7 Linears, 2 rotaries, SDPA, SwiGLU,
#   residuals, views), 82 autograd nodes;
#   the rest of the model (embedding, final norm, output layer, fp32 cast, cross-entropy): 11 / 17.
BLOCK_CALLS, BLOCK_NODES = 65, 82
HEAD_CALLS, HEAD_NODES = 11, 17
# Tensor parallelism (apogee.parallel.tensor, sequence parallel, tp=2), per block and per micro-batch,
# counted the same way in a gloo run: 45 torch calls on DTensors (norms and residuals on Shard(1)
# activations, the DTensor weights of the 7 Linears, PrepareModuleInput) and 59 more plain calls
# (to_local/from_local wrappers, redistribute internals). The embedding/output boundary counts as one
# more block.
TP_DTENSOR_CALLS, TP_PLAIN_CALLS = 45, 59
# Per step, after the micro-batches: gradient clipping takes one foreach norm of the local gradients and
# sums their squares (foreach norm, stack, pow, sum, divide, add), then the square root, the item and one
# foreach scale: 9 calls, plus a to_local per DTensor gradient for the norm and again for the scale.
# AdamW(foreach) runs ~12 calls per parameter group (2 groups).
CLIP_CALLS = 9
OPT_CALLS = 24
TENSORS_PER_BLOCK = 9  # 7 Linear weights, 2 RMSNorm gains
TENSORS_HEAD = 3  # embedding, final norm, output (untied)


def host_microbatch_s(m: ModelShape, lay: Layout, acc: Accelerator, layers: int, fsdp: bool) -> float:
    """Host seconds of one micro-batch's forward + backward on a rank holding ``layers`` blocks."""
    if not acc.host_bound:
        return 0.0
    per_call = acc.host_call_s
    t = (layers * BLOCK_CALLS + HEAD_CALLS) * per_call + (layers * BLOCK_NODES + HEAD_NODES) * acc.host_node_s
    if lay.tp > 1:
        # Each plain wrapper call also leaves about one autograd node behind.
        t += (layers + 1) * (TP_DTENSOR_CALLS * acc.dtensor_call_s + TP_PLAIN_CALLS * (per_call + acc.host_node_s))
    if fsdp:
        t += (layers + 1) * acc.fsdp_unit_s  # every block is a unit, and the root holds the rest
    return t


def gpu_dispatch_s(lay: Layout, acc: Accelerator, layers: int, head: bool) -> tuple[float, float]:
    """Host seconds a GPU rank's host takes to dispatch one micro-batch's forward and its backward in
    apogee's eager step (``layers`` blocks; ``head``: the embedding, output layer and loss too): the
    engine's calls and autograd nodes at the host's measured cost each, kernel launch included. The
    device cannot finish a phase before its host has enqueued it. TP's DTensor dispatch and FSDP2's hooks
    are not counted (not measured on a GPU's host), so on such layouts this is a lower bound. Zero where
    the accelerator's host costs are not measured."""
    if acc.host_bound:
        return 0.0, 0.0
    calls = layers * BLOCK_CALLS + (HEAD_CALLS if head else 0)
    nodes = layers * BLOCK_NODES + (HEAD_NODES if head else 0)
    recomputed = layers * BLOCK_CALLS if lay.recompute == "full" else 0  # the forward, again in backward
    return calls * acc.host_call_s, nodes * acc.host_node_s + recomputed * acc.host_call_s


def host_key(m: ModelShape, lay: Layout, fsdp: bool) -> tuple:
    """What a measured host entry depends on: the parameter shapes of a block and of the embedding and
    output (the replica runs the real ones; its entry is per block and the rest, so not the depth),
    tensor parallelism and sequence parallelism (DTensor ops and their collectives), FSDP2 units,
    recomputation (a replayed forward), and whether the rank runs pipeline stages (the replica then
    runs each of its stages alone, without the schedule: the per-block part is the same work, the rest
    is the median over ranks of the embedding / output stages' extra, and the schedule's own host work
    is not in it)."""
    shapes = (m.hidden, m.ffn_hidden, m.heads, m.kv_heads, m.vocab)
    # The zero level under FSDP: its gathers differ (memory.wraps_in_fsdp), so each has its own entry.
    # HSDP: the replicas' all-reduce is in the gradient-sync part, so it is a layout of its own.
    return shapes + (lay.tp, lay.sequence_parallel and lay.tp > 1, lay.zero if fsdp else None, lay.recompute,
                     lay.pp > 1, lay.dp_replicate > 1)


def measured_host_s(part: str, m: ModelShape, lay: Layout, acc: Accelerator, layers: int, fsdp: bool
                    ) -> float | None:
    """Seconds of a rank holding ``layers`` blocks, from the device's measured host table (contention
    and the collectives' latency included), or None where it holds no such layout. ``part``:
    "micro_batch" (one micro-batch's forward + backward with gradient sync off), "sync" (what the last
    micro-batch adds with gradient sync on: the gradient reduce-scatter) or "step" (clipping, AdamW and
    zero_grad)."""
    got = (acc.host_table or {}).get(host_key(m, lay, fsdp))
    if got is None:
        return None
    per_block, rest = got[part]
    return layers * per_block + rest


def host_step_s(m: ModelShape, lay: Layout, acc: Accelerator, layers: int) -> float:
    """Host seconds of the per-step work outside the micro-batches: clipping and the optimizer's calls."""
    if not acc.host_bound:
        return 0.0
    tensors = layers * TENSORS_PER_BLOCK + TENSORS_HEAD
    sharded = lay.tp > 1 or lay.dp * lay.cp > 1  # parameters are DTensors (FSDP2 at every zero level)
    if sharded:
        # Clipping unwraps each gradient (to_local, a DTensor call) for the norm and for the scale.
        return 2 * tensors * acc.dtensor_call_s + CLIP_CALLS * acc.host_call_s + OPT_CALLS * acc.dtensor_call_s
    return (CLIP_CALLS + OPT_CALLS) * acc.host_call_s


def oversubscription(acc: Accelerator, ranks_per_node: int) -> float:
    """How much slower a rank's host work runs because the node's ranks share its cores: each rank
    gets max(1, cores // ranks) threads (apogee.train.trainer), and ranks x threads beyond the cores
    time-share them. Where the device's ``contention`` was measured (all ranks computing at once
    against one alone), that figure instead."""
    if not acc.host_bound:
        return 1.0
    if acc.contention > 0 and ranks_per_node > 1:
        return acc.contention  # measured with this many ranks on the node
    threads = max(1, acc.cores // max(1, ranks_per_node))
    return max(1.0, ranks_per_node * threads / acc.cores)
