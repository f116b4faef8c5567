"""The planner's predicted step time and memory per rank against real CPU training runs of the engine.

    python benchmarks/planner_vs_measured.py [--steps 20] [--json] [--only NAME]
    python benchmarks/planner_vs_measured.py --gpu ...    # the engine on one GPU: planner_vs_measured_gpu.py

1. Micro-benchmarks (the `cpu` device's calibration, on this machine): ``nproc`` worker processes (gloo
   ranks) run at once, each pinned to the cores the engine gives a rank, with as many threads
   (apogee.train.cpu_cores), and take the minimum over repeats of each primitive (load from other work
   only adds time):
   - a chain of 100 tiny multiplies, forward and backward      -> host_call_s, host_node_s,
   - a chain of DTensor multiplies (no communication)          -> dtensor_call_s,
   - four FSDP2 units around tiny Linears vs the same unsharded -> fsdp_unit_s,
   - gloo all-gather on the run's TP (else DP) group, 1 KiB and 4 MiB -> link latency, bus bandwidth,
   - each rank's GEMM rate with every rank running GEMMs vs in its turn (ranks on distinct cores, the
     others in a barrier), counted in a window inside a 0.6 s run so that ranks starting apart do not
     count -> contention (the node's time-sharing; 1 where every rank has cores of its own),
   - the resident size after all of the above and one pass of the replica below at head_dim 2 (imports
     incl. torch._dynamo, gloo, op code pages; no model) -> reserved_gib,
   - a replica of the run at its parameter sizes and 2 x tp tokens a rank (the engine's model,
     parallel plans, loss, clipping and AdamW: every call, DTensor dispatch, FSDP2 unit and collective
     of the real step, FSDP2's gathers, copies and reduce-scatters and AdamW at the real parameter bytes,
     almost no token work; pipeline layouts: each rank's stages alone), 1 and 3 blocks per stage, all
     ranks at once, median -> host_table (per block and rest: a micro-batch with gradient sync off, less
     the replica's own few-token GEMMs; what gradient sync adds; the optimizer step). It replaces the
     host_* count model, the FSDP bandwidth terms and the optimizer's byte model,
   - every GEMM shape the cost model prices (compute.gemm_shapes), each product in the operand layout
     nn.Linear's autograd gives it (x @ W^T, g @ W, x^T @ g; gemm_roles) on copies of its operands that
     span twice the last-level cache, as in the model  -> gemm_table,
   - causal scaled_dot_product_attention forward + backward at the run's shape, on q, k, v and the
     output gradient in the model's transposed [batch, seq, heads, head_dim] layout -> attn_eff,
   - one block's norms, rotary, SwiGLU product and residual adds (the engine's modules) forward +
     backward, less the same on 2-token tensors (dispatch, priced by host_*) -> elem_table,
   - a 64 MiB copy -> mem_bw_gbs;
   the last four in turns, like contention's reference rate: ranks that time-share a core would mix
   waiting into a long op's minimum (attention), not into a short one's, and the model applies the
   time-sharing once, as contention. These replace the nominal figures of the `cpu` accelerator
   (apogee.planner.cluster); nothing is fitted to the runs below, and the training job itself is not
   timed for the calibration.
2. The engine trains each config for ``--steps`` steps (apogee.launch.launch_local, gloo ranks);
   metrics.jsonl gives tokens/s per step (log_interval 1) and rank 0's peak RSS (mem_gib = VmHWM). The
   first 3 steps (warm-up) and the last (it evaluates and checkpoints) are skipped. The error is taken
   against the minimum step time (the step least disturbed by other work on a shared machine, which is
   what the planner predicts); the median and maximum are printed too, with the load average. A second,
   shorter run of each config samples rank 0's resident size and glibc's free heap bytes (HeapSampler):
   its peak live memory = resident size less the freed chunks glibc keeps for reuse, the counterpart of
   the peak allocated memory the GPU comparison uses (planner_vs_measured_gpu.py). The peak RSS is
   printed beside it; the gap between the two is the allocator's fragmentation, which the planner does
   not model.
3. The planner predicts the same layout, mapped from the engine's config by export.engine_layout (tp, dp
   and its zero level: dp_shard = 3, dp_shard with reshard_after_forward never = 2, dp_replicate = 0,
   both = HSDP with layout.dp_replicate; grad_reduce, micro-batch; fp32).

Target (issue 5): within 10% on step time and memory per rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [
    # name, flavor, nproc, parallel, seq_len, global_batch, micro_batch. The 1-rank run goes last: it
    # trains in this process, and ranks spawned after it would inherit its peak RSS (Linux keeps
    # ru_maxrss, which the engine's mem_gib reads, across fork + exec).
    ("tiny dp_shard=2 x tp=2", "tiny", 4, {"dp_shard": 2, "tp": 2}, 128, 16, 4),
    ("debug dp_shard=2", "debug", 2, {"dp_shard": 2, "tp": 1}, 128, 16, 4),
    ("debug pp=2 1f1b", "debug", 2, {"pp": 2, "dp_shard": 1, "tp": 1, "pp_schedule": "1f1b"}, 256, 16, 2),
    ("debug pp=2 x dp_shard=2", "debug", 4, {"pp": 2, "dp_shard": 2, "tp": 1, "pp_schedule": "1f1b"}, 256, 16, 2),
    # One gradient reduction a step (parallel.grad_reduce), and the planner's other two zero levels
    # (estimate.APOGEE_ZERO, as export.layout_to_config writes them).
    ("debug dp_shard=2 reduce/step", "debug", 2, {"dp_shard": 2, "tp": 1, "grad_reduce": "step"}, 128, 16, 4),
    # Micro-batch 1: eight gradient reductions a step, each priced at the replica's measured sync.
    ("debug dp_shard=2 mb1", "debug", 2, {"dp_shard": 2, "tp": 1}, 128, 16, 1),
    ("debug dp_shard=2 zero 2", "debug", 2, {"dp_shard": 2, "tp": 1, "reshard_after_forward": "never"}, 128, 16, 4),
    ("debug dp_replicate=2 zero 0", "debug", 2, {"dp_replicate": 2, "dp_shard": 1, "tp": 1}, 128, 16, 4),
    # HSDP (the planner's layout.dp_replicate): 2 replicas of 2 shards, the replicas' all-reduce once a step.
    ("debug hsdp 2x2", "debug", 4, {"dp_replicate": 2, "dp_shard": 2, "tp": 1}, 128, 16, 4),
    # Context parallelism (apogee.parallel.context: K and V all-gathered): 2 ranks, each 128 of 256 tokens.
    ("debug cp=2", "debug", 2, {"dp_shard": 1, "cp": 2, "tp": 1}, 256, 16, 4),
    ("debug 1 rank", "debug", 1, {"dp_shard": 1, "tp": 1}, 256, 16, 4),
]
WARMUP_STEPS = 3
LIVE_STEPS = 6  # the heap-sampled run: past the first optimizer step, whose state the peak holds


def _threads(nproc: int) -> int:
    """A rank's thread count: the cores the engine pins it to (apogee.train.cpu_cores)."""
    from apogee.train.cpu_cores import rank_cores

    return len(rank_cores(sorted(os.sched_getaffinity(0)), 0, nproc))


def _best(fn, n: int) -> float:
    """Minimum of ``n`` timed calls after a warm-up: other work on a shared machine only ever adds
    time, so the minimum is the estimate least disturbed by it."""
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


CACHE_SPAN_BYTES = 64 * 2**20  # twice this machine's last-level cache (32 MiB L3): past it, all of it is evicted


def _best_cold(make, reps: int, span: float) -> float:
    """_best over calls that each take the next of enough copies of the operands (``make()`` -> (fn,
    operands)) to span ``span`` bytes: between two runs of one of the model's GEMMs, the rest of its
    micro-batch passes through the cache (its parameters and activations), which evicts the operands
    when that is more than the cache holds and leaves them warm in a model smaller than it."""
    fn, first = make()
    size = sum(t.numel() * t.element_size() for t in first)
    n = max(1, -(-round(min(span, CACHE_SPAN_BYTES)) // max(1, size)))
    copies = itertools.cycle([first] + [make()[1] for _ in range(n - 1)])
    return _best(lambda: fn(*next(copies)), reps)


def _gemm_role(role: str, key: tuple[int, int, int]):
    """A maker for _best_cold: the product at table key (M, N, K) = [M,K] x [K,N] in the operand layout
    its role has under apogee's nn.Linear (y = x W^T with W [out, in]): "fwd" x @ W.t(), "dgrad"
    g @ W (both contiguous), "wgrad" x.t() @ g (the weight gradient, a transposed first operand)."""
    import torch

    M, N, K = key

    def make():
        if role == "fwd":
            return (lambda a, w: a @ w.t()), (torch.randn(M, K), torch.randn(N, K))
        if role == "dgrad":
            return (lambda g, w: g @ w), (torch.randn(M, K), torch.randn(K, N))
        return (lambda x, g: x.t() @ g), (torch.randn(K, M), torch.randn(K, N))

    return make


def gemm_roles(m, tp: int, cp: int, mb: int) -> dict[tuple[int, int, int], list[str]]:
    """compute.gemm_products grouped by shape: the roles priced at each (M, N, K) (a shape can price
    several: the mean of their times is its table entry)."""
    from apogee.planner.compute import gemm_products

    roles: dict[tuple[int, int, int], list[str]] = {}
    for key, role in gemm_products(m, tp, cp, mb):
        roles.setdefault(key, []).append(role)
    return roles


def _elem_block(key: tuple, reps: int) -> float:
    """Seconds of one dense block's non-GEMM, non-attention ops, forward + backward, at compute.elem_key's
    shape (micro-batch, norm tokens, rotary tokens, hidden, heads, kv heads, ffn hidden) on one rank."""
    import torch
    import torch.nn.functional as F

    from apogee.models.llama import RMSNorm, apply_rope, rope_cos_sin

    mb, s_norm, s_rot, h, heads, kv, head_dim, f = key
    norms = [RMSNorm(h, 1e-5) for _ in range(2)]
    rope = rope_cos_sin(head_dim, s_rot, 10000.0)
    leaf = lambda *shape: torch.randn(*shape, requires_grad=True)  # noqa: E731
    x, r = leaf(mb, s_norm, h), leaf(mb, s_norm, h)
    q, k = leaf(mb, s_rot, heads, head_dim), leaf(mb, s_rot, kv, head_dim)
    g, u = leaf(mb, s_rot, f), leaf(mb, s_rot, f)
    grads = None

    def run():
        nonlocal grads
        outs = [norms[0](x), norms[1](r), x + r, r + x, apply_rope(q, rope), apply_rope(k, rope), F.silu(g) * u]
        grads = grads or [torch.randn_like(o) for o in outs]
        # Input gradients returned, not accumulated into .grad (in the block they flow on); the norm
        # gains' gradients are computed as in the block.
        torch.autograd.grad(outs, [x, r, q, k, g, u, *(n.weight for n in norms)], grads)

    return _best(run, reps)


def _host_replica(sections: dict, nproc: int, args, m, reps: int, span: float = 0.0) -> dict:
    """Seconds of the run's step work that scales with its parameters, not its tokens, on a replica of
    the layout (``sections``: the run's [parallel] section and batch, as apogee.config validates them):
    the engine's model (the run's ModelArgs ``args``: its hidden size, heads, ffn width and
    vocabulary), parallel plans (apogee.parallel.apply on this run's layout and mesh), loss, clipping
    and optimizer on 2 x tp tokens a rank (of a 2 x tp x cp sequence), so every torch call, autograd node, DTensor
    dispatch, collective and FSDP2 unit of the real step runs, with FSDP2's gathers, copies and
    reduce-scatters, the gradient accumulation, clipping and AdamW at the real parameter bytes, and
    almost no token work. All ranks at once, median of ``reps`` (the contention and the gloo latency
    the run sees). Models of 1 and 3 blocks (per pipeline stage) give per-block times and the rest
    (embedding, output, loss, the root unit): {"micro_batch": (per block, rest), "sync": ..., "step": ...}, where
    micro_batch is one micro-batch's forward + backward with gradient sync off (the engine reduces
    gradients once per step) less the replica's own few-token GEMMs (the GEMM table prices those
    products at the run's tokens; ``m``, the run's ModelShape, gives them; None keeps them), sync what a
    micro-batch with gradient sync on adds, and step is clipping + AdamW + zero_grad."""
    import contextlib

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel

    from apogee.config import load_config, validate
    from apogee.models.init import init_weights
    from apogee.models.llama import Transformer
    from apogee.parallel.apply import parallelize_stages
    from apogee.parallel.context import load_balanced_positions
    from apogee.parallel.mesh import Mesh
    from apogee.parallel.pipeline import stages_per_rank
    from apogee.train.optim import build_optimizer, clip_grad_norm

    cfg = load_config(None, sections)
    resolved = validate(cfg, nproc)
    mesh = Mesh.build(resolved, "cpu")
    tp, cp = resolved.tp, resolved.cp
    local = 2 * tp  # tokens a rank holds: a sequence of 2 x tp x cp under context parallelism
    seq = local * cp
    # Under a pipeline each rank builds its own stages of a model of 1 and 3 blocks per stage and runs
    # each stage alone (no schedule: its input a random hidden state, its output's gradient random),
    # which is the parameter work the schedule's actions do; the schedule's own host work is not in it.
    n_stages = resolved.pp * stages_per_rank(resolved.pp_schedule, resolved.pp_stages_per_rank)
    medians = {"micro_batch": [], "sync": [], "step": []}
    held = []
    for per_stage in (1, 3):
        small = dataclasses.replace(args, n_layers=per_stage * n_stages, max_seq_len=seq)
        with torch.device("meta"):
            model = Transformer(small)
        done = parallelize_stages(model, mesh, param_dtype=torch.float32, compile=False, seq_len=seq)
        model = done.model
        init_weights(model, 0, torch.device("cpu"))
        parts = [stage for _, stage in done.stages] or [model]
        tokens = torch.randint(0, small.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if cp > 1:  # as the trainer: the rank's load-balanced positions and their rotary rows
            positions = load_balanced_positions(seq, cp, mesh.cp_rank)
            model.rope = model.rope[:, positions]
            inputs, targets = inputs[:, positions], targets[:, positions]
        for stage in parts:
            stage.rope = model.rope  # initialised on the union after the split (apogee.parallel.pipeline)
        held.append(len(model.layers))
        optimizer = build_optimizer(model, cfg.train)
        hidden = torch.randn(1, local, small.dim, generator=torch.Generator().manual_seed(1))

        def micro_batch(sync: bool):
            for stage in parts:
                if hasattr(stage, "set_requires_gradient_sync"):
                    stage.set_requires_gradient_sync(sync)
                    if done.stages:  # as torch's pipeline stage runs an FSDP stage's backward
                        stage.set_is_last_backward(sync)
                        stage.set_reshard_after_backward(sync)
            with loss_parallel() if tp > 1 and resolved.loss_parallel else contextlib.nullcontext():
                for stage in parts:
                    first = stage.tok_embeddings is not None
                    out = stage(inputs if first else hidden.clone().requires_grad_())
                    if stage.output is not None:
                        F.cross_entropy(out.flatten(0, 1).float(), targets.flatten(0, 1)).backward()
                    else:
                        out.backward(torch.ones_like(out))

        def step():
            clip_grad_norm(model, cfg.train.grad_clip, pp=resolved.pp)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            micro_batch(True)
            step()
        laps = {"off": [], "on": [], "step": []}
        for _ in range(reps):  # a step's sequence: micro-batches without, then with, gradient sync
            if dist.is_initialized():
                dist.barrier()
            laps["off"].append(_timed(lambda: micro_batch(False)))
            laps["on"].append(_timed(lambda: micro_batch(True)))
            laps["step"].append(_timed(step))
        off = statistics.median(laps["off"])
        medians["micro_batch"].append(off)
        medians["sync"].append(statistics.median(laps["on"]) - off)
        medians["step"].append(statistics.median(laps["step"]))
    out = {}
    for key, (one, deep) in medians.items():
        per_block = max(0.0, (deep - one) / (held[1] - held[0]))
        out[key] = (per_block, max(0.0, one - held[0] * per_block))
    if m is None:
        return out
    gemm_block, gemm_rest = _replica_gemms_s(m, tp, local, reps, span)
    gemm_rest = gemm_rest if model.output is not None else 0.0  # the output layer is on the last stage
    per_block, rest = out["micro_batch"]
    out["micro_batch"] = (max(0.0, per_block - gemm_block), max(0.0, rest - gemm_rest))
    return out


def _replica_gemms_s(m, tp: int, tokens: int, reps: int, span: float) -> tuple[float, float]:
    """Seconds of the replica's own GEMMs at its ``tokens``, per block and for the output layer: the
    three products of each weight (compute.linear_products), each timed as _best_cold over ``span`` bytes."""
    from apogee.planner.compute import dense_layer_gemms, linear_products

    def products(shapes) -> float:
        return sum(_best_cold(_gemm_role(role, key), reps, span) for shape in shapes
                   for key, role in linear_products(*shape))

    return products(dense_layer_gemms(m, tokens, tp)), products([(tokens, m.vocab / tp, m.hidden)])


def _gemm_rate(a, b, run_s: float = 0.6, window: tuple[float, float] = (0.1, 0.5)) -> float:
    """GEMMs per second while ``a @ b`` runs back to back for ``run_s``, from the completions inside
    ``window`` (seconds after the start): first to last completion there, over the count between."""
    done = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < run_s:
        a @ b
        done.append(time.perf_counter() - t0)
    inside = [t for t in done if window[0] <= t < window[1]]
    return (len(inside) - 1) / (inside[-1] - inside[0])


def turns(nproc: int, cores: int) -> list[list[int]]:
    """The ranks that time a primitive together, turn by turn: no two of them on one core, each on the
    cores the engine pins it to (apogee.train.cpu_cores.rank_cores on ``cores`` cores)."""
    from apogee.train.cpu_cores import rank_cores

    groups: list[tuple[list[int], set[int]]] = []
    for rank in range(nproc):
        mine = set(rank_cores(list(range(cores)), rank, nproc))
        free = next((g for g in groups if not g[1] & mine), None)
        if free is None:
            groups.append(([rank], mine))
        else:
            free[0].append(rank)
            free[1].update(mine)
    return [ranks for ranks, _ in groups]


def _in_turns(rank: int, nproc: int, cores: int, fn):
    """``fn()`` on this rank in its turn (``turns``), the other ranks waiting in a barrier; returns what
    ``fn`` returned. One rank, or ranks with cores of their own: all at once."""
    import torch.distributed as dist

    got = None
    for turn in turns(nproc, cores):
        if nproc > 1:
            dist.barrier()
        if rank in turn:
            got = fn()
    if nproc > 1:
        dist.barrier()
    return got


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _worker(rank: int, args: tuple, out) -> None:
    nproc, dp, tp, roles, mb, heads, kv_heads, seq, head_dim, elem, reps, port, sections, model_args, m, span = args
    import torch
    import torch.distributed as dist
    from torch import nn

    import apogee.train.trainer  # noqa: F401  (the rank's imports: its resident baseline)
    from apogee.telemetry.metrics import memory_gib
    from apogee.train.cpu_cores import pin_cpu_rank
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    cores = len(os.sched_getaffinity(0))  # the host's, before this rank is pinned to its own
    torch.set_num_threads(pin_cpu_rank(rank, nproc))  # the engine's cores and threads for this rank
    res: dict = {}
    # 1. Host cost of one torch call and of one autograd node: a chain of 100 tiny multiplies.
    x = torch.randn(4, requires_grad=True)

    def chain():
        y = x
        for _ in range(100):
            y = y * 1.0001
        return y

    t_f = _best(chain, reps * 4)
    t_fb = _best(lambda: chain().sum().backward(), reps * 4)
    res["host_call_s"] = t_f / 100
    res["host_node_s"] = max(0.0, t_fb - t_f) / 100
    if nproc > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        # 2. A DTensor op (sharding propagation + wrap/unwrap), forward + backward, no communication.
        dx = DTensor.from_local(torch.randn(4), mesh["tp" if tp > 1 else "dp"], [Shard(0)]).requires_grad_()

        def dchain():
            y = dx
            for _ in range(20):
                y = y * 1.0001
            return y

        dist.barrier()
        res["dtensor_call_s"] = _best(lambda: dchain().sum().backward(), reps * 2) / 20
        # 3. One FSDP2 unit (hooks, copy-in/out, a tiny all-gather and reduce-scatter) forward + backward:
        # four units around tiny Linears plus the root, against the same modules unsharded.
        if dp > 1:
            torch.manual_seed(0)
            plain = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
            sharded = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
            for layer in sharded:
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(sharded, mesh=mesh["dp"])
            inp = torch.randn(4, 16)
            dist.barrier()
            t_plain = _best(lambda: plain(inp).sum().backward(), reps * 2)
            dist.barrier()
            t_sh = _best(lambda: sharded(inp).sum().backward(), reps * 2)
            res["fsdp_unit_s"] = max(0.0, t_sh - t_plain) / 5
        # 4. gloo all-gather on a group of the run's TP (else DP) size, all groups at once as in the run:
        # a small message gives the per-step latency, a 4 MiB one the bandwidth.
        group = mesh["tp" if tp > 1 else "dp"].get_group()
        n = dist.get_world_size(group)

        def ag(nbytes):
            src = torch.empty(nbytes // 4 // n)
            dst = torch.empty(src.numel() * n)
            dist.barrier()
            return _best(lambda: dist.all_gather_into_tensor(dst, src, group=group), reps * 2), dst.numel() * 4

        t_small, _ = ag(1024 * n)
        t_big, big = ag(4 * 2**20)
        res["lat_s"] = t_small / (n - 1)
        res["busbw_gbs"] = (n - 1) / n * big / max(1e-9, t_big - t_small) / 1e9
        # 5. Contention: each rank's GEMM rate while every rank runs GEMMs, against its rate in its turn (the
        # ranks on distinct cores, _in_turns; the others wait in a barrier): how much slower the node's
        # time-sharing makes the compute that the tables below price in turns (median over ranks of the
        # ratio). Each rate is counted inside a window well within the run, so that ranks leaving the
        # barrier or finishing apart do not count as overlap. Where one turn holds every rank, nothing is
        # time-shared and the tables were timed with all ranks running: 1, not a ratio of two equal
        # measurements (which read 0.94-1.07).
        if len(turns(nproc, cores)) == 1:
            res["contention"] = 1.0
        else:
            ca, cb = torch.randn(512, 256), torch.randn(256, 768)
            ca @ cb
            dist.barrier()
            together = _gemm_rate(ca, cb)
            in_turn = _in_turns(rank, nproc, cores, lambda: _gemm_rate(ca, cb))
            res["contention"] = in_turn / together
    # 6. The resident size: the runtime a rank carries before its model (imports, torch._dynamo, which
    # building any model on the meta device loads, gloo, the code pages of the step's ops), read after one
    # pass of the replica at near-zero size (head_dim 2, its tensors a few KiB); then the replica at the
    # run's parameter sizes.
    near_zero = dataclasses.replace(model_args, dim=2 * model_args.n_heads, ffn_hidden=4 * tp, vocab_size=8 * tp)
    _host_replica(sections, nproc, near_zero, None, 1)
    res["base_rss"] = memory_gib(torch.device("cpu")) * 2**30  # the engine's own CPU figure (VmHWM)
    res["host"] = _host_replica(sections, nproc, model_args, m, reps * 2, span)
    # 7.-9. The compute and memory traffic the cost model prices, per rank at its thread count, in turns
    # of ranks on distinct cores (_in_turns): the rate a rank gets while it holds its cores.
    # Where ranks time-share the cores, a minimum over repeats of all ranks at once would mix slices spent
    # waiting into a long op (attention) but not into a short one (a small GEMM); the model applies the
    # time-sharing once, as the contention above. Three times the repeats of the rest: with 7, a 2-thread
    # rank's attention read 6.2-7.9 ms over three calibrations, with 21 5.8-6.0 ms.
    creps = 3 * reps

    def compute_primitives() -> dict:
        got = {}
        # 7. Every GEMM shape the cost model prices for this layout, as the engine's autograd runs it
        # (gemm_roles: the operand layouts), its operands rotated through ``span`` bytes (_best_cold: the
        # rank's parameters, gradients and one micro-batch's activations).
        got["gemm_table"] = {key: statistics.mean(_best_cold(_gemm_role(role, key), creps, span)
                                                  for role in key_roles)
                             for key, key_roles in roles.items()}
        # Causal attention as apogee.models.llama calls it: q, k, v are [batch, seq, heads, head_dim] tensors
        # seen through transpose(1, 2), and the output's gradient comes back the same way from wo.
        leaf = lambda h: torch.randn(mb, seq, h, head_dim).requires_grad_()  # noqa: E731
        q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
        grad_out = torch.randn(mb, seq, heads, head_dim).transpose(1, 2)

        def attn():
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=heads != kv_heads)
            o.backward(grad_out)

        got["t_attn"] = _best(attn, creps)
        # 8. One block's memory-bound ops with the engine's own modules, forward + backward, at the rank's
        # shape: the two RMSNorms and residual adds (on seq/tp tokens under sequence parallel), rotary on q
        # and k, the SwiGLU product. The same ops on 2-token tensors are pure dispatch/autograd, which
        # host_call_s / host_node_s already price: subtracted.
        got["t_elem"] = _elem_block(elem, 3 * creps) - _elem_block((1, 2, 2) + tuple(elem[3:]), 3 * creps)
        # 9. Memory bandwidth: a copy of 64 MiB, well past the caches.
        xs, ys = torch.empty(16 * 2**20), torch.randn(16 * 2**20)
        got["copy_gbs"] = 2 * xs.numel() * 4 / _best(lambda: xs.copy_(ys), creps) / 1e9
        return got

    res.update(_in_turns(rank, nproc, cores, compute_primitives))
    out.put((rank, res))
    if nproc > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure_cpu(nproc: int, dp: int, tp: int, roles: dict, mb: int, seq: int, heads: tuple[int, int, int],
                elem: tuple, sections: dict, model_args, m, span: float, reps: int = 7) -> dict:
    """The primitives' costs with ``nproc`` ranks on this machine at once, each with the engine's thread
    count. ``heads``: (query heads, kv heads, head dim) per rank. Per primitive: the median over ranks
    of each rank's minimum over repeats. ``elem``: compute.elem_key of the run's block. ``sections``:
    the run's [parallel] section and its batch ([train] global_batch, micro_batch); ``model_args`` (apogee ModelArgs, vocabulary set) and ``m`` (its planner
    ModelShape): the model, for the host replica; ``span``: the bytes a GEMM's operands rotate through
    (_best_cold)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (nproc, dp, tp, roles, mb, heads[0], heads[1], seq, heads[2], tuple(elem), reps, port, sections,
            model_args, m, span)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, q)) for r in range(nproc)]
    for p in procs:
        p.start()
    res = [q.get(timeout=600)[1] for _ in procs]
    for p in procs:
        p.join()
    merged = {k: statistics.median(r[k] for r in res) for k in res[0] if k not in ("gemm_table", "host")}
    if "host" in res[0]:
        merged["host"] = {part: tuple(statistics.median(r["host"][part][i] for r in res) for i in range(2))
                          for part in res[0]["host"]}
    merged["gemm_table"] = {s: statistics.median(r["gemm_table"][s] for r in res) for s in res[0]["gemm_table"]}
    return merged


def cpu_from_measurement(meas: dict, m, mb: int, elem: tuple | None = None, host_key: tuple | None = None):
    """The `cpu` accelerator with its calibration replaced by the micro-benchmark's figures."""
    from apogee.planner.cluster import ACCELERATORS

    base = ACCELERATORS["cpu"]
    peak = base.peak("fp32")
    acc = dataclasses.replace(base, mem_bw_gbs=meas["copy_gbs"], reserved_gib=meas["base_rss"] / 2**30,
                              gemm_table=meas["gemm_table"], host_call_s=meas["host_call_s"],
                              host_node_s=meas["host_node_s"])
    if elem is not None and "t_elem" in meas:
        acc = dataclasses.replace(acc, elem_table={tuple(elem): max(0.0, meas["t_elem"])})
    if host_key is not None and "host" in meas:
        acc = dataclasses.replace(acc, host_table={host_key: meas["host"]})
    for key in ("dtensor_call_s", "fsdp_unit_s", "contention"):
        if key in meas:
            acc = dataclasses.replace(acc, **{key: meas[key]})
    if "lat_s" in meas:
        acc = dataclasses.replace(acc, intra_lat_us=meas["lat_s"] * 1e6, nvlink_busbw_gbs=meas["busbw_gbs"])
    # compute.py prices causal flash-style attention as 3.5 * (4 * tokens * seq * hidden) / 2 FLOPs.
    attn_flops = 3.5 * 4.0 * mb * m.seq_len * m.seq_len * m.hidden / 2
    acc = dataclasses.replace(acc, attn_eff=attn_flops / meas["t_attn"] / peak)
    return acc


class HeapSampler:
    """Samples this process's resident size (VmRSS) and glibc's free heap bytes (mallinfo2's fordblks: freed
    chunks the allocator keeps resident for reuse) every ``interval_s`` on a thread; ``live_peak`` is the
    highest resident size less those free bytes, the CPU counterpart of a GPU's peak allocated memory
    (what the caching allocator holds beyond it is not counted there either). Without glibc's mallinfo2
    (musl, glibc < 2.33) the free bytes read 0 and live_peak is the peak RSS."""

    def __init__(self, interval_s: float = 0.002):
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        try:
            self._mallinfo2 = ctypes.CDLL(None).mallinfo2
            self._mallinfo2.restype = MallInfo2
        except AttributeError:
            self._mallinfo2 = None
        self.interval_s, self.rss_peak, self.live_peak = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
        free = self._mallinfo2().fordblks if self._mallinfo2 is not None else 0
        self.rss_peak, self.live_peak = max(self.rss_peak, rss), max(self.live_peak, rss - free)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "HeapSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def sampled_rank(cfg, out: str) -> None:
    """apogee's rank entry under a HeapSampler; writes {"rss_peak", "live_peak"} (bytes) to out/heap-RANK.json."""
    from apogee.launch import run_rank

    with HeapSampler() as heap:
        run_rank(cfg)
    rank = os.environ.get("RANK", "0")
    Path(out, f"heap-{rank}.json").write_text(json.dumps({"rss_peak": heap.rss_peak, "live_peak": heap.live_peak}))


def engine_live_gib(flavor: str, nproc: int, parallel: dict, seq: int, gb: int, mbs: int, steps: int, d: Path) -> float:
    """Rank 0's peak resident size less glibc's free heap bytes (HeapSampler), in a run of its own so that
    the sampling thread does not disturb the timed one."""
    from apogee.launch import launch_ranks

    cfg = engine_config(flavor, parallel, seq, gb, mbs, steps, d)
    if nproc == 1:
        sampled_rank(cfg, str(d.parent))
    else:
        launch_ranks(sampled_rank, cfg, str(d.parent), nproc=nproc)
    return json.loads((d.parent / "heap-0.json").read_text())["live_peak"] / 2**30


def engine_config(flavor: str, parallel: dict, seq: int, gb: int, mbs: int, steps: int, d: Path):
    from apogee.config import load_config

    return load_config(None, {
        "run": {"dir": str(d), "log_interval": 1},
        "model": {"flavor": flavor},
        "train": {"steps": steps, "seq_len": seq, "global_batch": gb, "micro_batch": mbs},
        "parallel": parallel,
        "checkpoint": {"interval": 0, "resume": "never"},
        "eval": {"interval": 0},
    })


def run_engine(flavor: str, nproc: int, parallel: dict, seq: int, gb: int, mbs: int, steps: int, d: Path) -> dict:
    from apogee.launch import launch_local

    cfg = engine_config(flavor, parallel, seq, gb, mbs, steps, d)
    t0 = time.perf_counter()
    launch_local(cfg, nproc)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(d / "metrics.jsonl")]
    body = [r for r in recs if WARMUP_STEPS < r["step"] < steps]
    step_s = [gb * seq / r["tokens_per_s"] for r in body]
    return {"step_s": statistics.median(step_s), "step_s_min": min(step_s), "step_s_max": max(step_s),
            "mem_gib": max(r["mem_gib"] for r in body), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--gpu"]:  # the GPU counterpart has its own configs and flags
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from planner_vs_measured_gpu import main as gpu_main

        return gpu_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="", help="run only the configs whose name contains this text")
    args = ap.parse_args(argv)

    from apogee.config import validate
    from apogee.models.flavors import FLAVORS
    from apogee.planner.cluster import ACCELERATORS, Cluster
    from apogee.planner.compute import elem_key
    from apogee.planner.estimate import estimate
    from apogee.planner.export import engine_layout
    from apogee.planner.host import host_key
    from apogee.planner.memory import memory_per_gpu, wraps_in_fsdp
    from apogee.planner.spec import RunSpec, shape_from_args

    out = []
    for name, flavor, nproc, par, seq, gb, mbs in CONFIGS:
        if args.only not in name:
            continue
        fa = FLAVORS[flavor]
        m = shape_from_args(fa, flavor=flavor, seq_len=seq, vocab=256)  # byte tokenizer: 256 tokens
        # The planner's layout for the engine's config, as the planner maps one (export.engine_layout).
        cfg = engine_config(flavor, par, seq, gb, mbs, args.steps, Path("run"))
        lay = engine_layout(cfg, validate(cfg, nproc))
        tp, dp, pp, cp = lay.tp, lay.dp, lay.pp, lay.cp
        roles = gemm_roles(m, tp, cp, mbs)
        heads = (m.heads // tp, max(1, m.kv_heads // tp), m.head_dim)
        elem = elem_key(m, tp, cp, mbs, tp > 1)
        # What passes through a rank's caches between two runs of one GEMM: its parameters, gradients and
        # activations (the planner's count; the calibration does not change it).
        nominal = memory_per_gpu(m, lay, Cluster(accel=ACCELERATORS["cpu"], gpus=nproc, gpus_per_node=nproc),
                                 global_batch=gb, precision="fp32")
        span = nominal.params + nominal.grads + nominal.activations
        # The micro-benchmarks' collectives run over the ranks beside tp (pipeline and context ranks included).
        sections = {"parallel": par, "train": {"global_batch": gb, "micro_batch": mbs}}
        meas = measure_cpu(nproc, dp * pp * cp, tp, roles, mbs, seq, heads, elem, sections,
                           dataclasses.replace(fa, vocab_size=m.vocab), m, span)
        acc = cpu_from_measurement(meas, m, mbs, elem, host_key(m, lay, fsdp=wraps_in_fsdp(lay)))
        run = RunSpec(model=m, cluster=Cluster(accel=acc, gpus=nproc, gpus_per_node=nproc), fixed={},
                      global_batch=gb, precision="fp32")
        est = estimate(run, lay)
        with tempfile.TemporaryDirectory() as td:
            got = run_engine(flavor, nproc, par, seq, gb, mbs, args.steps, Path(td) / "run")
        with tempfile.TemporaryDirectory() as td:
            live_gib = engine_live_gib(flavor, nproc, par, seq, gb, mbs, LIVE_STEPS, Path(td) / "run")
        pred_mem = est.memory.total / 2**30
        gemm_s = sum(meas["gemm_table"].values())
        gemm_flops = sum(2 * a * b * c for a, b, c in meas["gemm_table"])
        out.append({
            "config": name, "ranks": nproc, "threads_per_rank": _threads(nproc), "layout": lay.short(),
            "calibration": {"gemm_shapes": len(roles), "gemm_gflops_mean": round(gemm_flops / gemm_s / 1e9, 1),
                            "attn_eff": round(acc.attn_eff, 4), "block_elem_ms": round(meas["t_elem"] * 1e3, 2), "mem_bw_gbs": round(acc.mem_bw_gbs, 2),
                            "host_call_us": round(acc.host_call_s * 1e6, 2), "host_node_us": round(acc.host_node_s * 1e6, 2),
                            "dtensor_call_us": round(acc.dtensor_call_s * 1e6, 1) if "dtensor_call_s" in meas else None,
                            "fsdp_unit_ms": round(acc.fsdp_unit_s * 1e3, 2) if "fsdp_unit_s" in meas else None,
                            "gloo_lat_us": round(acc.intra_lat_us, 1) if "lat_s" in meas else None,
                            "gloo_busbw_gbs": round(acc.nvlink_busbw_gbs, 2) if "lat_s" in meas else None,
                            "reserved_gib": round(acc.reserved_gib, 3),
                            "contention": round(acc.contention, 2) if "contention" in meas else None,
                            "host_ms": {part: [round(x * 1e3, 2) for x in v] for part, v in meas.get("host", {}).items()} or None},
            "pred_step_s": round(est.step_time_s, 4), "meas_step_min_s": round(got["step_s_min"], 4),
            "meas_step_median_s": round(got["step_s"], 4), "meas_step_max_s": round(got["step_s_max"], 4),
            "step_err_pct": round(100 * (est.step_time_s / got["step_s_min"] - 1), 1),
            "step_err_vs_median_pct": round(100 * (est.step_time_s / got["step_s"] - 1), 1),
            "pred_compute_s": round(est.compute_s, 4), "pred_comm_exposed_s": {k: round(v, 4) for k, v in est.comm_exposed_s.items()},
            "pred_mem_gib": round(pred_mem, 3), "meas_mem_gib": round(got["mem_gib"], 3),
            "mem_err_pct": round(100 * (pred_mem / got["mem_gib"] - 1), 1),
            "meas_live_gib": round(live_gib, 3), "live_err_pct": round(100 * (pred_mem / live_gib - 1), 1),
            "pred_breakdown_gib": {k: round(v, 3) for k, v in est.memory.gib().items()},
            "engine_wall_s": round(got["wall_s"], 1), "loadavg_1min": os.getloadavg()[0],
        })
        if not args.json:
            r = out[-1]
            print(f"{name:<24} {r['layout']:<28} calib: {json.dumps(r['calibration'])}")
            print(f"{'':<24} step: predicted {r['pred_step_s']:.3f} s, measured min {r['meas_step_min_s']:.3f} s "
                  f"(median {r['meas_step_median_s']:.3f}, max {r['meas_step_max_s']:.3f}) -> {r['step_err_pct']:+.1f}% "
                  f"({r['step_err_vs_median_pct']:+.1f}% vs median)   load {r['loadavg_1min']:.1f}")
            print(f"{'':<24} memory/rank: predicted {r['pred_mem_gib']:.3f} GiB; measured live (peak RSS less "
                  f"glibc's free heap) {r['meas_live_gib']:.3f} GiB -> {r['live_err_pct']:+.1f}%; peak RSS "
                  f"{r['meas_mem_gib']:.3f} GiB -> {r['mem_err_pct']:+.1f}%", flush=True)
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
