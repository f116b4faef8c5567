"""The planner's predicted step time and memory per rank against real CPU training runs of the engine.

    python benchmarks/planner_vs_measured.py [--steps 12] [--json]

1. Micro-benchmark (the `cpu` device's calibration, on this machine): ``nproc`` worker processes run at
   once, each with the thread count the engine gives a rank (cores // local ranks), and time
   - a fp32 matmul of the run's largest GEMM shape (tokens x ffn x dim)  -> gemm_eff,
   - causal scaled_dot_product_attention forward + backward at the run's shape -> attn_eff,
   - a large tensor copy -> mem_bw_gbs (the memory-bound ops' bandwidth),
   - the resident size after importing the engine -> reserved_gib (runtime memory no tensor holds).
   These replace the nominal figures of the `cpu` accelerator (apogee.planner.cluster); nothing is
   fitted to the runs below.
2. The engine trains each config for ``--steps`` steps (apogee.launch.launch_local, gloo ranks);
   metrics.jsonl gives tokens/s per step (log_interval 1) and rank 0's peak RSS (mem_gib). The first
   3 steps (warm-up) and the last (it evaluates and checkpoints) are skipped; the step time is the
   median over the rest, because other work on a shared machine makes single steps noisy.
3. The planner predicts the same layout (tp, dp = dp_shard with FSDP = ZeRO 3, micro-batch, fp32).

Target (issue 5): within 10% on step time and memory per rank.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    ("debug 1 rank", "debug", 1, {"dp_shard": 1, "tp": 1}, 256, 16, 4),
]
WARMUP_STEPS = 3


def _threads(nproc: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // nproc)  # what apogee.train.trainer does


def _worker(args: tuple) -> dict:
    nproc, M, N, K, mb, heads, kv_heads, seq, head_dim, reps = args
    import torch

    import apogee.train.trainer  # noqa: F401  (the rank's imports: its resident baseline)

    # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork + exec.
    base_rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    torch.set_num_threads(_threads(nproc))
    a, b = torch.randn(M, K), torch.randn(K, N)

    def best(fn, n):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_mm = best(lambda: a @ b, reps)
    q = torch.randn(mb, heads, seq, head_dim, requires_grad=True)
    k = torch.randn(mb, kv_heads, seq, head_dim, requires_grad=True)
    v = torch.randn(mb, kv_heads, seq, head_dim, requires_grad=True)

    def attn():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
        o.sum().backward()

    t_attn = best(attn, reps)
    x, y = torch.empty(16 * 2**20), torch.randn(16 * 2**20)  # 64 MiB each, well past the caches
    t_copy = best(lambda: x.copy_(y), reps)
    return {"t_mm": t_mm, "t_attn": t_attn, "copy_gbs": 2 * x.numel() * 4 / t_copy / 1e9, "base_rss": base_rss}


def measure_cpu(nproc: int, shape, mb: int, seq: int, heads: tuple[int, int, int], reps: int = 7) -> dict:
    """Per-rank rates with ``nproc`` ranks sharing this machine, as the engine's ranks do.
    ``heads``: (query heads, kv heads, head dim) per rank."""
    M, N, K = shape
    args = (nproc, M, N, K, mb, heads[0], heads[1], seq, heads[2], reps)
    # One fresh process per rank (maxtasksperchild=1, chunksize=1), all running at once.
    with mp.get_context("spawn").Pool(nproc, maxtasksperchild=1) as pool:
        res = pool.map(_worker, [args] * nproc, chunksize=1)
    return {k: statistics.median(r[k] for r in res) for k in res[0]}


def cpu_from_measurement(meas: dict, m, shape, mb: int):
    """The `cpu` accelerator with its calibration replaced by the micro-benchmark's figures."""
    from apogee.planner.cluster import ACCELERATORS
    from apogee.planner.compute import gemm_efficiency

    base = ACCELERATORS["cpu"]
    peak = base.peak("fp32")
    M, N, K = shape
    acc = dataclasses.replace(base, mem_bw_gbs=meas["copy_gbs"], reserved_gib=meas["base_rss"] / 2**30)
    measured_eff = 2.0 * M * N * K / meas["t_mm"] / peak
    # gemm_eff is stated at the reference shape; scale it so this shape lands on what was measured.
    unit = gemm_efficiency(M, N, K, dataclasses.replace(acc, gemm_eff=1.0), "fp32")
    acc = dataclasses.replace(acc, gemm_eff=measured_eff / unit)
    # compute.py prices causal flash-style attention as 3.5 * (4 * tokens * seq * hidden) / 2 FLOPs.
    attn_flops = 3.5 * 4.0 * mb * m.seq_len * m.seq_len * m.hidden / 2
    acc = dataclasses.replace(acc, attn_eff=attn_flops / meas["t_attn"] / peak)
    return acc, measured_eff


def run_engine(flavor: str, nproc: int, parallel: dict, seq: int, gb: int, mbs: int, steps: int, d: Path) -> dict:
    from apogee.config import load_config
    from apogee.launch import launch_local

    cfg = load_config(None, {
        "run": {"dir": str(d), "log_interval": 1},
        "model": {"flavor": flavor},
        "train": {"steps": steps, "seq_len": seq, "global_batch": gb, "micro_batch": mbs},
        "parallel": parallel,
        "checkpoint": {"interval": 0, "resume": "never"},
        "eval": {"interval": 0},
    })
    t0 = time.perf_counter()
    launch_local(cfg, nproc)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(d / "metrics.jsonl")]
    body = [r for r in recs if WARMUP_STEPS < r["step"] < steps]
    step_s = [gb * seq / r["tokens_per_s"] for r in body]
    return {"step_s": statistics.median(step_s), "step_s_min": min(step_s), "step_s_max": max(step_s),
            "mem_gib": max(r["mem_gib"] for r in body), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from apogee.models.flavors import FLAVORS
    from apogee.planner.cluster import Cluster
    from apogee.planner.estimate import estimate
    from apogee.planner.spec import Layout, RunSpec, shape_from_args

    out = []
    for name, flavor, nproc, par, seq, gb, mbs in CONFIGS:
        fa = FLAVORS[flavor]
        m = shape_from_args(fa, flavor=flavor, seq_len=seq, vocab=256)  # byte tokenizer: 256 tokens
        tp, dp = par["tp"], par["dp_shard"]
        shape = (mbs * seq, m.ffn_hidden // tp, m.hidden)  # the largest GEMM of a layer (MLP up)
        heads = (m.heads // tp, max(1, m.kv_heads // tp), m.head_dim)
        meas = measure_cpu(nproc, shape, mbs, seq, heads)
        acc, eff = cpu_from_measurement(meas, m, shape, mbs)
        run = RunSpec(model=m, cluster=Cluster(accel=acc, gpus=nproc, gpus_per_node=nproc), fixed={},
                      global_batch=gb, precision="fp32")
        lay = Layout(tp=tp, dp=dp, microbatch=mbs, zero=3, sequence_parallel=tp > 1, dp_overlap=False)
        est = estimate(run, lay)
        with tempfile.TemporaryDirectory() as td:
            got = run_engine(flavor, nproc, par, seq, gb, mbs, args.steps, Path(td) / "run")
        pred_mem = est.memory.total / 2**30
        out.append({
            "config": name, "ranks": nproc, "threads_per_rank": _threads(nproc), "layout": lay.short(),
            "calibration": {"gemm_shape": shape, "gemm_gflops": round(eff * acc.peak("fp32") / 1e9, 2),
                            "gemm_eff": round(acc.gemm_eff, 4), "attn_eff": round(acc.attn_eff, 4),
                            "mem_bw_gbs": round(acc.mem_bw_gbs, 2), "reserved_gib": round(acc.reserved_gib, 3)},
            "pred_step_s": round(est.step_time_s, 4), "meas_step_s": round(got["step_s"], 4),
            "meas_step_range_s": [round(got["step_s_min"], 4), round(got["step_s_max"], 4)],
            "step_err_pct": round(100 * (est.step_time_s / got["step_s"] - 1), 1),
            "pred_mem_gib": round(pred_mem, 3), "meas_mem_gib": round(got["mem_gib"], 3),
            "mem_err_pct": round(100 * (pred_mem / got["mem_gib"] - 1), 1),
            "pred_breakdown_gib": {k: round(v, 3) for k, v in est.memory.gib().items()},
            "engine_wall_s": round(got["wall_s"], 1),
        })
        if not args.json:
            r = out[-1]
            c = r["calibration"]
            print(f"{name:<24} {r['layout']:<28} calib: gemm {c['gemm_gflops']} GFLOP/s at {c['gemm_shape']}, "
                  f"attn_eff {c['attn_eff']}, mem {c['mem_bw_gbs']} GB/s, runtime {c['reserved_gib']} GiB")
            print(f"{'':<24} step: predicted {r['pred_step_s']:.3f} s, measured {r['meas_step_s']:.3f} s "
                  f"(range {r['meas_step_range_s'][0]:.3f}-{r['meas_step_range_s'][1]:.3f}) -> {r['step_err_pct']:+.1f}%   "
                  f"memory/rank: predicted {r['pred_mem_gib']:.3f} GiB, measured {r['meas_mem_gib']:.3f} GiB "
                  f"-> {r['mem_err_pct']:+.1f}%", flush=True)
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
