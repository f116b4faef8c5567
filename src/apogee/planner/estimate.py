"""One layout -> predicted step time, throughput, MFU, memory, communication, checkpoint interval, goodput."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache

from apogee.planner import comms
from apogee.planner.cluster import GIB, Accelerator, Cluster
from apogee.planner.compute import AUTOCAST_CAST_BYTES, hbm_bytes_per_s, layer_times, logits_times
from apogee.planner.errors import PlannerError
from apogee.planner.host import gpu_dispatch_s, host_microbatch_s, host_step_s, measured_host_s, oversubscription
from apogee.planner.memory import (
    MemoryBreakdown,
    engine_autocast,
    memory_per_gpu,
    reduces_each_micro_batch,
    stage_layer_counts,
    stage_params,
    wraps_in_fsdp,
)
from apogee.planner.schedule import bubble_fraction, bubble_slots
from apogee.planner.spec import Layout, ModelShape, RunSpec, stack_refusal

# The zero levels apogee's engine runs (apogee.planner.export maps them to [parallel]; memory.wraps_in_fsdp
# says what each holds). Megatron-LM's stack has all four.
APOGEE_ZERO = (0, 2, 3)
GRAD_REDUCE_BYTES = 4  # fp32 gradient reduction: Megatron-LM main_grad and torchtitan's reduce_dtype default
# Per-step memory traffic outside the layers (priced at compute.hbm_bytes_per_s):
#   Adam on the rank's optimizer shard: read fp32 grad, master, m, v (16); write master, m, v (12) and
#   the bf16 weight (2); plus the gradient-norm pass re-reading the fp32 grad (4)       = 34 bytes/param
#   on every parameter the rank holds (not only its shard): zero the fp32 gradient buffer before the
#   first micro-batch (write 4)                                                          = 4 bytes/param
ADAM_BYTES_PER_PARAM = 34
# apogee's engine (stack = "apogee", train/optim.py) holds fp32 parameters and no bf16 copy: its fused
# AdamW reads param, grad, m, v and writes param, m, v (28 bytes, at Accelerator.engine_adam_bw_eff where
# measured); clip_grad_norm reads each gradient once for its norm (one foreach norm, 4), then scales the
# gradients in place (8; charged always: early in training the norm is above the clip).
ENGINE_ADAM_BYTES_PER_PARAM = 28
ENGINE_CLIP_BYTES_PER_PARAM = 12
GRAD_ZERO_BYTES_PER_PARAM = 4
GRAD_ACCUMULATE_BYTES_PER_PARAM = 12  # .grad += g in fp32: read two, write one
# TP collectives overlapped with GEMMs still cost some time: the communication kernels take SMs from
# the GEMMs (Wang et al. 2023, "Overlap communication with dependent computation", report ~10-20%
# residual); we charge 15% of the communication.
TP_OVERLAP_RESIDUAL = 0.15


@dataclass
class Estimate:
    layout: Layout
    step_time_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    memory: MemoryBreakdown
    capacity_gib: float
    fits: bool
    bubble_fraction: float
    comm_s: dict[str, float] = field(default_factory=dict)  # total time per axis
    comm_exposed_s: dict[str, float] = field(default_factory=dict)  # what is not hidden behind compute
    compute_s: float = 0.0
    checkpoint_interval_s: float = 0.0
    checkpoint_write_s: float = 0.0
    goodput: float = 0.0
    power_kw: float = 0.0  # the cluster's draw (cluster.Cluster.power_w)
    energy_j_per_token: float = 0.0  # per token trained at the predicted step time
    energy_j_per_useful_token: float = 0.0  # the same over goodput: checkpoint stalls and lost work included
    host_wait_s: float = 0.0  # of the step, the GPU idle while the host dispatches (small micro-batches)

    def to_json(self) -> dict:
        return {
            "layout": {k: v for k, v in self.layout.__dict__.items()},
            "step_time_s": self.step_time_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "model_tflops_per_gpu": self.model_tflops_per_gpu,
            "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu,
            "mfu": self.mfu,
            "memory_gib_per_gpu": self.memory.gib(),
            "capacity_gib": self.capacity_gib,
            "fits": self.fits,
            "pipeline_bubble": self.bubble_fraction,
            "compute_s": self.compute_s,
            "comm_s": self.comm_s,
            "comm_exposed_s": self.comm_exposed_s,
            "checkpoint_interval_s": self.checkpoint_interval_s,
            "checkpoint_write_s": self.checkpoint_write_s,
            "goodput": self.goodput,
            "power_kw": self.power_kw,
            "energy_j_per_token": self.energy_j_per_token,
            "energy_j_per_useful_token": self.energy_j_per_useful_token,
            "host_wait_s": self.host_wait_s,
        }


def check_layout(m: ModelShape, lay: Layout, cluster: Cluster, global_batch: int, stack: str = "apogee"
                 ) -> str | None:
    """Why ``lay`` is invalid for this model and cluster (and, for apogee, its engine), or None when it
    is valid."""
    why = stack_refusal(m, stack)
    if why:
        return why
    if stack == "apogee" and lay.zero not in APOGEE_ZERO:
        return (f"layout.zero={lay.zero}: apogee's engine has zero 0 (replicated), 2 (FSDP2 keeping gathered "
                "weights from forward to backward) and 3 (FSDP2), no ZeRO-1 sharded optimizer; "
                "train.stack = \"megatron\" prices Megatron-LM's")
    if lay.dp_replicate > 1:
        if stack != "apogee" or lay.zero < 2:
            return (f"layout.dp_replicate={lay.dp_replicate}: replicas of FSDP shards (HSDP) are apogee's, at zero 2 "
                    "or 3 (zero 0 replicates over all of dp already)")
        if lay.dp % lay.dp_replicate:
            return f"layout.dp_replicate={lay.dp_replicate} must divide layout.dp={lay.dp}"
        if lay.shard_group == 1:
            return (f"layout.dp_replicate={lay.dp_replicate} = dp with cp 1 leaves nothing to shard: that is "
                    "layout.zero=0")
    if lay.pp_split == "embedding_loss":
        if stack != "megatron":
            return ("layout.pp_split=embedding_loss is Megatron-LM's (train.stack = \"megatron\"); apogee's engine "
                    "balances its stages by their weights and attention (apogee.parallel.balance)")
        if lay.pp == 1 or (m.layers + 2) % (lay.pp * lay.virtual_stages):
            return (f"layout.pp_split=embedding_loss needs pp > 1 and model.layers + 2 = {m.layers + 2} divisible by "
                    f"pp x virtual_stages = {lay.pp * lay.virtual_stages}")
    if stack == "apogee" and lay.cp_comm == "p2p":
        return ("layout.cp_comm=p2p: apogee's engine all-gathers K and V (apogee.parallel.context); "
                "the ring is Megatron-LM's (train.stack = \"megatron\")")
    if stack == "apogee" and lay.zero == 0 and lay.cp > 1:
        return (f"layout.zero=0 with layout.cp={lay.cp}: apogee shards model state over the context axis "
                "(FSDP2 over dp_shard x cp); use zero 2 or 3")
    if lay.world != cluster.gpus:
        return f"layout tp*pp*dp*cp = {lay.world} but the cluster has {cluster.gpus} GPUs"
    if m.heads % lay.tp or m.kv_heads % lay.tp and lay.tp % m.kv_heads:
        return f"layout.tp={lay.tp} must divide model.heads={m.heads} and model.kv_heads={m.kv_heads}"
    if lay.tp > cluster.gpus_per_node:
        return f"layout.tp={lay.tp} exceeds cluster.gpus_per_node={cluster.gpus_per_node} (TP needs NVLink)"
    if m.layers + (2 if lay.pp_split == "embedding_loss" else 0) < lay.pp * lay.virtual_stages:
        return (f"layout.pp x layout.virtual_stages = {lay.pp * lay.virtual_stages} pipeline stages exceed "
                f"model.layers={m.layers} (each stage needs a layer)")
    if lay.virtual_stages > 1 and lay.pp_schedule != "interleaved-1f1b":
        return f"layout.virtual_stages={lay.virtual_stages} needs pp_schedule=interleaved-1f1b"
    if lay.pp == 1 and (lay.virtual_stages > 1 or lay.pp_schedule not in ("1f1b",)):
        return "pp_schedule/virtual_stages only apply with layout.pp > 1"
    if m.seq_len % (2 * lay.cp) and lay.cp > 1:
        return f"layout.cp={lay.cp}: model.seq_len={m.seq_len} must be divisible by 2*cp (load-balanced ring attention)"
    if global_batch % (lay.dp * lay.microbatch):
        return f"train.global_batch={global_batch} must be divisible by dp*microbatch={lay.dp * lay.microbatch}"
    n_micro = global_batch // (lay.dp * lay.microbatch)
    if lay.pp_schedule == "interleaved-1f1b" and lay.pp > 1 and n_micro % lay.pp:
        return f"interleaved-1f1b needs micro-batches per step ({n_micro}) divisible by pp={lay.pp}"
    if lay.ep > 1 or lay.expert_tp:
        if not m.experts or m.experts % lay.ep:
            return f"layout.ep={lay.ep} must divide model.experts={m.experts}"
        if not lay.expert_tp and (lay.dp * lay.cp) % lay.ep:
            return (f"layout.ep={lay.ep} must divide dp*cp={lay.dp * lay.cp} (experts are sharded over data ranks; "
                    "layout.expert_tp below tp folds them over the tensor ranks too)")
        if lay.etp > cluster.gpus_per_node or m.moe_ffn_hidden % lay.etp:
            return (f"layout.expert_tp={lay.etp} must divide model.moe_ffn_hidden={m.moe_ffn_hidden} and fit in a "
                    f"node of {cluster.gpus_per_node}")
        if (lay.tp * lay.dp * lay.cp) % (lay.ep * lay.etp):
            return (f"layout.ep x layout.expert_tp = {lay.ep * lay.etp} must divide tp*dp*cp = "
                    f"{lay.tp * lay.dp * lay.cp} (the expert groups fold over a stage's tensor, data and context "
                    "ranks)")
    if lay.sequence_parallel and lay.tp == 1:
        return "layout.sequence_parallel needs layout.tp > 1"
    return None


def eager_regime(run: RunSpec, lay: Layout) -> str | None:
    """The dtype regime of apogee's eager block (compute.ENGINE_BLOCK_BYTES) this run trains in, or None
    where its memory-bound ops are fused (Megatron-LM, or layout.compile; apogee has no GPT block)."""
    if run.stack != "apogee" or lay.compile or run.model.mlp != "swiglu":
        return None
    if run.precision == "fp32":
        return "fp32"
    return "autocast" if engine_autocast(lay, run.precision) else "bf16"


@lru_cache(maxsize=64)
def _engine_accelerator(acc: Accelerator) -> Accelerator:
    """``acc`` with its GEMMs at the engine's measured cuBLAS efficiency (one object per accelerator,
    so the cost model's caches, keyed on the accelerator, keep working)."""
    return dataclasses.replace(acc, gemm_eff=acc.engine_gemm_eff)


def estimate(run: RunSpec, lay: Layout, *, memory: MemoryBreakdown | None = None) -> Estimate:
    m, cl = run.model, run.cluster
    why = check_layout(m, lay, cl, run.global_batch, run.stack)
    if why:
        raise PlannerError(why)
    acc = cl.accel
    if run.stack == "apogee" and acc.engine_gemm_eff is not None:
        acc = _engine_accelerator(acc)
    eager = eager_regime(run, lay)
    mem = memory or memory_per_gpu(m, lay, cl, global_batch=run.global_batch, precision=run.precision,
                                   stack=run.stack)
    capacity = acc.mem_gib * GIB

    t, p, v, mb = lay.tp, lay.pp, lay.virtual_stages, lay.microbatch
    n_micro = run.global_batch // (lay.dp * mb)
    tokens = mb * m.seq_len / lay.cp  # per rank per micro-batch
    sp = lay.sequence_parallel

    # --- one micro-batch on each pipeline rank ---------------------------------------------------
    fsdp = wraps_in_fsdp(lay, run.stack)
    ranks_node = min(cl.gpus, cl.gpus_per_node)
    share = oversubscription(acc, ranks_node)
    counts = rank_layer_counts(run, lay)
    # A device's measured host table holds the layout or not, whatever a rank's block count.
    host_measured = acc.host_bound and measured_host_s("micro_batch", m, lay, acc, counts[0], fsdp) is not None
    lf, lb = logits_times(m, t, lay.cp, mb, acc, run.precision, eager)
    if acc.host_bound:
        lf, lb = lf * share, lb * share
    act_bytes = tokens * m.hidden * (4 if run.precision == "fp32" else 2)
    parts: dict[tuple[int, bool], _MicroBatch] = {}
    work = []  # per pp rank: one micro-batch's forward + backward with its exposed TP/CP/EP traffic
    host_wait = []  # per pp rank: what of it the device spends waiting on the host's dispatch (GPUs)
    for r, layers in enumerate(counts):
        last = r == p - 1
        if (layers, last) not in parts:
            parts[layers, last] = _micro_batch(run, lay, acc, eager, layers, last, act_bytes, share, fsdp,
                                               host_measured)
        part = parts[layers, last]
        # The last rank also runs the output layer and the loss.
        f, b = part.f + (lf if last else 0.0), part.b + (lb if last else 0.0)
        # apogee's eager step on a GPU: neither phase ends before the host has dispatched it (compiled
        # blocks launch a few fused kernels instead; not modelled).
        hf, hb = gpu_dispatch_s(lay, acc, layers, last) if eager is not None else (0.0, 0.0)
        host_wait.append(max(0.0, hf - f) + max(0.0, hb - b))
        work.append(part.time + (lf + lb if last else 0.0) + host_wait[-1])
    slow = max(range(p), key=work.__getitem__)
    part = parts[counts[slow], slow == p - 1]
    f_stage, b_stage = part.f, part.b
    Ls = max(counts)

    pp_comm = pp_exposed = 0.0
    if p > 1:
        pp_link = comms.axis_link(lay, "pp", cl)
        one = comms.p2p(act_bytes / t, pp_link)  # scatter/gather over TP ranks (Narayanan §4.1)
        vv = v if lay.pp_schedule == "interleaved-1f1b" else 1
        pp_comm = 2 * vv * one * n_micro
        # Steady-state sends overlap the next micro-batch's compute; the warm-up and cool-down ones
        # (one per stage boundary per chunk) lie on the critical path.
        pp_exposed = 2 * (p - 1) * one + 2 * vv * one * n_micro * 0.1

    slots = bubble_slots(lay.pp_schedule, p, v)
    bubble = bubble_fraction(lay.pp_schedule, p, v, n_micro)
    # Steady state moves at the slowest rank's pace. The fill and drain pass every other rank once:
    # with equal ranks the bubble is `slots` micro-batches of one rank; with unequal ones (uneven layer
    # counts, the output layer on the last) the other ranks' mean work stands for that one rank's.
    t_pipe = n_micro * work[slow]
    if p > 1:
        t_pipe += slots * (sum(work) - work[slow]) / (p - 1)
    if acc.host_bound and share > 1 and p > 1:
        # Ranks sharing a node's cores: ``work`` is each rank's at the contended rate (all ranks computing
        # at once), but a rank waiting in the bubble leaves its core to the others. The schedule at the
        # uncontended rate is one bound, the node's whole work at the contended rate over its ranks
        # (work conservation) the other.
        t_pipe = max(t_pipe / share, n_micro * sum(work) / p)
    t_pipe += pp_exposed

    # --- data parallel ---------------------------------------------------------------------------
    nonexpert, experts = stage_params(m, lay, stack=run.stack)
    params_rank = nonexpert + experts
    shard = lay.shard_group
    dp_link = comms.axis_link(lay, "dp", cl, size=shard, stride=t)
    # Each routed expert's gradients and state go to its own replicas (Layout.expert_dp), ep x etp apart.
    ex_shard = lay.expert_dp if experts else 1
    ex_link = comms.axis_link(lay, "dp", cl, size=ex_shard, stride=lay.ep * lay.etp)

    def over_dp(collective, per_param: float) -> float:
        """A data-parallel collective of ``per_param`` bytes a parameter: the non-expert parameters over the
        shard group, the experts' over their replicas."""
        return collective(per_param * nonexpert, shard, dp_link) + collective(per_param * experts, ex_shard, ex_link)
    dp_comm = dp_exposed = replica_ar = 0.0
    reductions = 1
    if lay.dp_replicate > 1:
        # HSDP: each replica's reduced gradient shard is all-reduced across the replicas once a step (the
        # engine's set_requires_all_reduce on the last micro-batch), between ranks one replica apart.
        replica_link = comms.axis_link(lay, "dp", cl, size=lay.dp_replicate, stride=t * shard)
        replica_ar = comms.all_reduce(GRAD_REDUCE_BYTES * params_rank / shard, lay.dp_replicate, replica_link)
        if acc.host_bound:  # one all-reduce per FSDP unit (the blocks and the root), as the reductions below
            replica_ar += Ls * 2 * (lay.dp_replicate - 1) * replica_link.latency
    if shard > 1 or ex_shard > 1:
        grad_rs = over_dp(comms.reduce_scatter, GRAD_REDUCE_BYTES)
        param_ag = over_dp(comms.all_gather, 2)
        if fsdp:
            # FSDP2, one unit (block) at a time: weight gathers (fsdp_gathers_per_step) and gradient
            # reductions, one per micro-batch or one a step (memory.reduces_each_micro_batch): a
            # reduce-scatter, or at zero 0 (a replicate-only mesh) an all-reduce. Prefetched behind
            # the neighbouring blocks' compute on GPUs; on a host-bound device gloo's copies and socket
            # I/O run on the rank's own cores and the latency is paid per unit.
            units = Ls + 1
            gathers = fsdp_gathers_per_step(lay, n_micro)
            reductions = n_micro if reduces_each_micro_batch(lay, run.stack) else 1
            param_ag = over_dp(comms.all_gather, 2 * (2 if run.precision == "fp32" else 1))
            if lay.zero == 0:  # apogee's replicate-only mesh (Megatron's FSDP is zero 3 only)
                grad_rs = over_dp(comms.all_reduce, GRAD_REDUCE_BYTES)
            if acc.host_bound:
                param_ag += (units - 1) * (shard - 1) * dp_link.latency
                grad_rs += (units - 1) * (shard - 1) * dp_link.latency * (2 if lay.zero == 0 else 1)
            dp_comm = gathers * param_ag + reductions * grad_rs + replica_ar
            if acc.host_bound:
                dp_exposed = dp_comm
            else:
                # Each gather and reduction hides behind the blocks around it; the step's last block's
                # gather and reductions do not.
                dp_exposed = (max(0.0, dp_comm - n_micro * (f_stage + b_stage))
                              + (param_ag / max(1, Ls) if gathers else 0.0) + (grad_rs + replica_ar) / max(1, Ls))
        else:
            dp_comm = grad_rs + param_ag
            if lay.dp_overlap and not acc.host_bound:
                # Gradient buckets reduce during the last micro-batch's backward; the parameter
                # all-gather overlaps the next step's first forward (Megatron-LM distributed optimizer).
                dp_exposed = max(0.0, grad_rs - b_stage) + max(0.0, param_ag - f_stage) + grad_rs / max(1, Ls)
            else:
                dp_exposed = dp_comm
    if host_measured:
        # The replica ran the data-parallel traffic at the real parameter bytes: the gathers are in its
        # micro-batch time, the gradient reduction is what its micro-batch with gradient sync adds (with
        # HSDP, the replicas' all-reduce too, which only the last micro-batch runs). Every micro-batch that
        # reduces (grad_reduce = "micro_batch") pays its reduce-scatter so: on a rank whose threads fill its
        # cores, gloo's copies, sums and socket I/O take the cores from the blocks they would overlap.
        # Engine runs, debug on 2 ranks at micro-batch 1, min step reducing every micro-batch against once
        # a step: dp_shard=2 0.744 / 0.756 s against 0.599 / 0.577 s, 21-26 ms a reduction (the replica's
        # sync: 19-24 ms); cp=2 1.858 / 1.838 s against 1.648 / 1.523 s, 14-21 ms (replica: 23-35 ms).
        sync = measured_host_s("sync", m, lay, acc, Ls, fsdp)
        dp_exposed = sync + (reductions - 1) * max(0.0, sync - replica_ar)
    local_params = nonexpert / shard + experts / ex_shard if lay.zero >= 1 else params_rank
    # apogee under autocast drops its gradients after each step (set_to_none) instead of zeroing a buffer:
    # the first micro-batch's fp32 gradients become .grad, each later one is added in place.
    grad_buffer = (GRAD_ACCUMULATE_BYTES_PER_PARAM * (n_micro - 1) if eager == "autocast"
                   else GRAD_ZERO_BYTES_PER_PARAM) * params_rank
    if run.stack == "apogee":
        adam_rate = (acc.mem_bw_gbs * 1e9 * acc.engine_adam_bw_eff if acc.engine_adam_bw_eff
                     else hbm_bytes_per_s(acc))
        t_opt = (ENGINE_ADAM_BYTES_PER_PARAM * local_params / adam_rate
                 + (ENGINE_CLIP_BYTES_PER_PARAM * local_params + grad_buffer) / hbm_bytes_per_s(acc))
    else:
        t_opt = (ADAM_BYTES_PER_PARAM * local_params + grad_buffer) / hbm_bytes_per_s(acc)
    if acc.host_bound:
        measured_step = measured_host_s("step", m, lay, acc, Ls, fsdp)
        # Small latency-bound collectives every step: the loss mean over data ranks and the global
        # gradient norm, plus (sequence parallel) one all-reduce per norm gain's partial gradient.
        small = (1 if shard > 1 else 0) + (1 if cl.gpus > 1 else 0) + ((2 * Ls + 1) if sp and t > 1 else 0)
        if measured_step is None:
            t_opt = (t_opt + host_step_s(m, lay, acc, Ls)) * share
        else:
            t_opt = measured_step  # clipping and AdamW over the real parameters, all ranks at once
            small = 1 if shard > 1 else 0  # the replica's clipping ran the others
        t_opt += small * comms.all_reduce(8, max(2, min(cl.gpus, ranks_node)), comms.axis_link(lay, "tp", cl, size=2, stride=1))

    step = t_pipe + dp_exposed + t_opt
    tokens_step = run.global_batch * m.seq_len
    tok_per_gpu = tokens_step / step / cl.gpus
    model_flops = m.model_flops_per_token() * tokens_step
    hw_flops = model_flops + _recompute_flops(m, lay) * tokens_step
    model_tflops = model_flops / step / cl.gpus / 1e12
    peak = acc.peak(run.precision)
    est = Estimate(
        layout=lay, step_time_s=step, tokens_per_s_per_gpu=tok_per_gpu, model_tflops_per_gpu=model_tflops,
        hardware_tflops_per_gpu=hw_flops / step / cl.gpus / 1e12, mfu=model_tflops * 1e12 / peak,
        memory=mem, capacity_gib=acc.mem_gib, fits=mem.total <= capacity, bubble_fraction=bubble,
        comm_s={"tp": part.tp_comm * n_micro, "cp": part.cp_comm * n_micro, "ep": part.ep_comm * n_micro,
                "pp": pp_comm, "dp": dp_comm},
        comm_exposed_s={"tp": part.tp_exposed * n_micro, "cp": part.cp_exposed * n_micro,
                        "ep": part.ep_comm * n_micro, "pp": pp_exposed, "dp": dp_exposed},
        compute_s=n_micro * (f_stage + b_stage) + t_opt, host_wait_s=n_micro * host_wait[slow],
    )
    _checkpointing(run, est)
    _energy(run, est, tokens_step)
    return est


def fsdp_gathers_per_step(lay: Layout, n_micro: int) -> int:
    """How often a step gathers a data-parallel rank's weights under FSDP2 (apogee's zero levels, see
    memory.wraps_in_fsdp). Without a pipeline: zero 3 before each micro-batch's forward and again for
    its backward, zero 2 once per micro-batch (kept from forward to backward), zero 0 never (nothing is
    sharded). Under a pipeline schedule torch keeps the weights gathered after each backward until the
    step's last (pipelining.stage), so zero 3 gathers for every backward plus the forwards that run
    before the first one (the micro-batches in flight), and zero 2 gathers once."""
    if lay.zero == 0:
        return 0
    if lay.pp == 1:
        return n_micro * (2 if lay.zero >= 3 else 1)
    if lay.zero == 2:
        return 1
    return n_micro + min(n_micro, lay.pp * lay.virtual_stages)


def rank_layer_counts(run: RunSpec, lay: Layout) -> list[int]:
    """Transformer blocks each pp rank holds (all its virtual stages together), as the run's stack
    splits them (memory.stage_layer_counts, which the memory model uses too)."""
    counts = stage_layer_counts(run.model, lay, run.stack)
    return [sum(counts[r::lay.pp]) for r in range(lay.pp)]


@dataclass(frozen=True)
class _MicroBatch:
    """One micro-batch's forward and backward on a pp rank, and its tensor/context/expert traffic."""
    f: float
    b: float
    tp_comm: float
    tp_exposed: float
    cp_comm: float
    cp_exposed: float
    ep_comm: float

    @property
    def time(self) -> float:
        return self.f + self.b + self.tp_exposed + self.cp_exposed + self.ep_comm


def _micro_batch(run: RunSpec, lay: Layout, acc: Accelerator, eager: str | None, Ls: int, last: bool,
                 act_bytes: float, share: float, fsdp: bool, host_measured: bool) -> _MicroBatch:
    """A pp rank holding ``Ls`` blocks (``last``: and the output layer, priced by the caller)."""
    m, cl, t, mb = run.model, run.cluster, lay.tp, lay.microbatch
    tokens = mb * m.seq_len / lay.cp  # per rank per micro-batch
    key = (m, t, lay.cp, lay.ep, mb, lay.sequence_parallel, lay.recompute, acc, run.precision, eager)
    n_moe = round(Ls * m.moe_layers / m.layers)
    fd, bd = layer_times(*key)
    fm, bm = layer_times(*key, moe=True, etp=lay.etp) if n_moe else (0.0, 0.0)
    f_stage = (Ls - n_moe) * fd + n_moe * fm
    b_stage = (Ls - n_moe) * bd + n_moe * bm
    if eager == "autocast":
        # Every forward casts the blocks' (and on the last rank the output layer's) matmul weights to bf16
        # and every backward their gradients back (compute.AUTOCAST_CAST_BYTES each way; a recompute
        # pass casts the blocks' again).
        block_params = Ls * (m.attn_params() + m.dense_mlp_params()) / t
        cast_params = block_params + (m.vocab * m.hidden / t if last else 0.0)
        recast = block_params if lay.recompute != "none" else 0.0
        f_stage += AUTOCAST_CAST_BYTES * cast_params / hbm_bytes_per_s(acc)
        b_stage += AUTOCAST_CAST_BYTES * (cast_params + recast) / hbm_bytes_per_s(acc)
    # Host-bound devices (cpu): dispatch/autograd/DTensor/FSDP host work joins the compute, and all of
    # it slows down when the node's ranks x threads exceed its cores.
    if acc.host_bound:
        if host_measured:
            f_stage = f_stage * share + measured_host_s("micro_batch", m, lay, acc, Ls, fsdp)  # already shared
        else:
            f_stage = (f_stage + host_microbatch_s(m, lay, acc, Ls, fsdp)) * share
        b_stage *= share

    tp_link = comms.axis_link(lay, "tp", cl)
    if host_measured:
        tp_link = dataclasses.replace(tp_link, latency=0.0)  # the measured host time holds the latency
    n_tp = 4 + (2 if lay.recompute == "full" else 0)  # 2 fwd + 2 bwd (+2 in the recomputed forward)
    tp_comm = Ls * n_tp * comms.all_reduce(act_bytes, t, tp_link)
    tp_comm += 2 * comms.all_reduce(act_bytes, t, tp_link) if t > 1 else 0.0  # embedding / logits boundaries
    if lay.tp_overlap and not acc.host_bound:
        tp_exposed = max(0.0, tp_comm - 0.5 * (f_stage + b_stage)) + TP_OVERLAP_RESIDUAL * tp_comm
    else:
        tp_exposed = tp_comm

    cp_comm = cp_exposed = 0.0
    if lay.cp > 1:
        cp_link = comms.axis_link(lay, "cp", cl)
        if host_measured:
            cp_link = dataclasses.replace(cp_link, latency=0.0)  # the measured host time holds the latency
        kv_bytes = 2 * tokens * m.kv_dim * (4 if run.precision == "fp32" else 2) / t  # this rank's K and V
        if run.stack != "megatron" or lay.cp_comm == "all_gather":
            # K and V each all-gathered before attention (again in a full recompute's forward), their
            # gradients reduce-scattered in backward, on the critical path: apogee.parallel.context, and
            # Llama 3's (Dubey et al. 2024, section 3.3.2: "exposed in the critical path").
            gathers = 1 + (1 if lay.recompute == "full" else 0)
            one = kv_bytes * lay.cp / 2  # K or V, gathered
            cp_comm = Ls * 2 * (gathers * comms.all_gather(one, lay.cp, cp_link)
                                + comms.reduce_scatter(one, lay.cp, cp_link))
            cp_exposed = cp_comm
        else:
            # Ring attention passes K,V (cp-1) times forward, K,V and their grads backward, behind attention.
            cp_comm = Ls * 3 * (lay.cp - 1) * comms.p2p(kv_bytes, cp_link)
            cp_exposed = max(0.0, cp_comm - 0.5 * (f_stage + b_stage))

    ep_comm = 0.0
    if lay.ep > 1 and n_moe:
        # Each expert-tensor group of etp ranks dispatches its tokens (16-bit) to the experts they are routed to,
        # on the expert group's ep ranks etp apart (Layout.expert_dp), and combines the results back: tokens /
        # tp per rank (its sequence shard), gathered etp ways.
        token_bytes = tokens / t * lay.etp * m.hidden * 2
        one = comms.expert_dispatch(token_bytes, m.experts, m.top_k, lay.ep, lay.etp, cl,
                                    deduplicated=lay.ep_dispatch == "deepep")
        ep_comm = n_moe * 4 * one  # dispatch + combine, forward + backward
        if lay.recompute == "full":
            ep_comm *= 1.5
    return _MicroBatch(f_stage, b_stage, tp_comm, tp_exposed, cp_comm, cp_exposed, ep_comm)


def _recompute_flops(m: ModelShape, lay: Layout) -> float:
    if lay.recompute == "full":
        return m.matmul_flops_per_token() - 2 * m.hidden * m.vocab + m.attn_flops_per_token()
    if lay.recompute == "selective" and m.attention == "eager":
        return m.attn_flops_per_token()
    return 0.0


def _energy(run: RunSpec, est: Estimate, tokens_step: int) -> None:
    """Energy per token with every accelerator at TDP for the whole step (cluster.Cluster's convention):
    bubbles and exposed communication are charged as busy, so this is the ceiling a power meter should
    stay under. Per useful token the checkpoint stalls, restarts and recomputed work after failures
    (1 - goodput) draw power too."""
    watts = run.cluster.power_w
    est.power_kw = watts / 1e3
    est.energy_j_per_token = watts * est.step_time_s / tokens_step
    est.energy_j_per_useful_token = est.energy_j_per_token / est.goodput if est.goodput > 0 else math.inf


def _checkpointing(run: RunSpec, est: Estimate) -> None:
    """Young/Daly optimal checkpoint interval and the expected goodput under the cluster's MTBF."""
    cl = run.cluster
    ckpt_bytes = (run.checkpoint_gb * 1e9) if run.checkpoint_gb else 14.0 * run.model.num_params()
    delta = ckpt_bytes / (cl.checkpoint_write_gbs * 1e9)  # seconds the job stalls per checkpoint
    mtbf = cl.mtbf_s
    # Daly 2006, Eq. 37 (first-order form for delta < 2M): tau = sqrt(2 delta M) - delta.
    tau = math.sqrt(2 * delta * mtbf) - delta if delta < 2 * mtbf else mtbf
    tau = max(tau, est.step_time_s)
    # Useful fraction: the checkpoint stalls, plus per failure the restart and on average half an
    # interval of lost work (Young 1974).
    useful = tau / (tau + delta)
    lost_per_failure = cl.restart_s + (tau + delta) / 2
    goodput = useful * max(0.0, 1.0 - lost_per_failure / mtbf)
    est.checkpoint_interval_s = tau
    est.checkpoint_write_s = delta
    est.goodput = goodput
