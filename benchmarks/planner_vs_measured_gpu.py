"""The planner's predicted step time and memory against the engine training on one GPU.

    python benchmarks/planner_vs_measured_gpu.py --out gpu-runs.json [--steps 12] [--only NAME]   # on a GPU
    python benchmarks/planner_vs_measured_gpu.py --measured gpu-runs.json [--gemm-table gemm-h100.json]

1. On a machine with CUDA, the engine (``apogee.launch.launch_local``, one rank, in this process)
   trains each config below for ``--steps`` steps: one rank has no FSDP, so bf16 autocast over fp32
   weights and gradients, fused AdamW, the stdlib corpus byte-level with the flavor's own vocabulary
   (128256: the output layer is as large as in real use). metrics.jsonl gives tokens/s per step
   (log_interval 1); the first 3 steps (warm-up, compilation) and the last (evaluation) are skipped.
   Memory: the peak of ``torch.cuda.max_memory_allocated`` (what the engine logs as mem_gib) and of
   ``max_memory_reserved`` (the caching allocator's pool, with the engine's default
   ``run.expandable_segments``; ``--default-allocator`` turns it off), both reset per config; with ``--phases``
   they are reset at every phase mark (MemoryPhases), and ``peak_over_phases_gib`` is the run's peak.
   The causal SDPA forward + backward at each config's shape is timed too (``attn_fwd_bwd_s``).
   Energy, where nvidia-ml-py is installed: the engine's logged ``power_w`` / ``energy_j_per_token``
   (NVML's energy counter over each logging window, apogee.telemetry.energy), and before the configs the
   board's idle power and its power under back-to-back 8192^3 bf16 GEMMs (3 s each).
   The measurements are written to ``--out`` with the device name and torch version.
2. The planner predicts each (``--measured FILE`` anywhere, or right after measuring): the GPU's
   built-in accelerator (``--gpu``, default from the device name), one GPU, the same layout (tp = pp
   = dp = 1, micro-batch, recompute, bf16, train.compile), priced as ``stack = "apogee"`` (the eager
   block's counted traffic, cuBLAS at the accelerator's measured engine_gemm_eff), optionally with a
   measured GEMM table (benchmarks/gemm_table.py). Nothing is fitted to these runs.

Energy: the planner's energy per token (every accelerator at its TDP for the whole step, the ceiling
a power meter should stay under) against the engine's measured figure.

Target (issue 5): within 10% on step time and memory per rank. The engine on one GPU has no
communication, so this checks the compute and memory halves of the model on the planner's own
engine, next to the published Megatron-LM rows (benchmarks/planner_accuracy.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# name, flavor, model overrides, seq_len, global_batch, micro_batch, recompute, compile
CONFIGS = [
    ("llama-1b mb1", "llama-1b", {}, 2048, 2, 1, "none", False),  # the smallest GEMMs: the lowest utilisation
    ("llama-1b mb4", "llama-1b", {}, 2048, 8, 4, "none", False),
    ("llama-1b mb8 selective", "llama-1b", {}, 2048, 16, 8, "selective", False),
    ("llama-1b mb8 full", "llama-1b", {}, 2048, 16, 8, "full", False),
    # Llama-3-8B's layer (4096 wide, 14336 FFN, GQA 32/8) at 4 layers: the GEMM shapes of real runs.
    ("llama3-8b x4 layers mb2", "llama3-8b", {"n_layers": 4}, 4096, 4, 2, "none", False),
    ("llama-1b mb4 compiled", "llama-1b", {}, 2048, 8, 4, "none", True),  # last: compilation takes longest
]
WARMUP_STEPS = 3


def time_attention(mb: int, heads: int, kv_heads: int, seq: int, head_dim: int, reps: int = 10) -> float:
    """Median seconds of the engine's causal attention call (SDPA, bf16, GQA), forward + backward."""
    import torch
    import torch.nn.functional as F

    q = torch.randn(mb, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(mb, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    laps = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
        out.backward(torch.ones_like(out))
        end.record()
        end.synchronize()
        if i >= 3:
            laps.append(start.elapsed_time(end) / 1e3)
    return statistics.median(laps)


class MemoryPhases:
    """CUDA memory around each phase of a step, from global hooks (the engine is not touched): at the
    start of every backward (allocated = the weights, gradients and optimizer state plus what the
    forward and loss keep for backward; peak = the forward's and loss's peak), at its end (peak of
    the backward), and around the optimizer step. The peak counter is reset at each mark, so the
    run's overall peak is the largest phase peak."""

    def __init__(self):
        import torch

        self.marks: list[tuple[str, float, float]] = []
        self._backward = torch.autograd.backward
        self._hooks = []

    def mark(self, phase: str) -> None:
        import torch

        torch.cuda.synchronize()
        self.marks.append((phase, torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30))
        torch.cuda.reset_peak_memory_stats()

    def __enter__(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def backward(*args, **kwargs):
            self.mark("forward+loss")
            out = self._backward(*args, **kwargs)
            self.mark("backward")
            return out

        torch.autograd.backward = backward
        self._hooks = [register_optimizer_step_pre_hook(lambda *a: self.mark("before optimizer")),
                       register_optimizer_step_post_hook(lambda *a: self.mark("optimizer"))]
        return self

    def __exit__(self, *exc):
        import torch

        torch.autograd.backward = self._backward
        for h in self._hooks:
            h.remove()

    def step(self, n: int) -> list[tuple[str, float, float]]:
        """The marks of optimizer step ``n`` (1-based): from the end of step n-1's optimizer step."""
        ends = [i for i, (phase, _, _) in enumerate(self.marks) if phase == "optimizer"]
        return self.marks[ends[n - 2] + 1: ends[n - 1] + 1] if n <= len(ends) else []


def one_gpu_config(d: Path, cache: Path, flavor: str, overrides: dict, seq: int, gb: int, mb: int,
                   recompute: str = "none", compiled: bool = False, steps: int = 12, *, device: str = "cuda",
                   expandable: bool = True):
    """The engine's config for one of these runs (also gpu_step_profile.py's and gpu_host_dispatch.py's):
    one rank, metrics every step, no checkpoint, one evaluation batch at the end."""
    from apogee.config import load_config

    return load_config(None, {
        "run": {"dir": str(d), "log_interval": 1, "device": device, "expandable_segments": expandable},
        "model": {"flavor": flavor, **overrides},
        "data": {"cache_dir": str(cache)},
        "train": {"steps": steps, "seq_len": seq, "global_batch": gb, "micro_batch": mb, "compile": compiled},
        "parallel": {"dp_shard": 1, "tp": 1, "recompute": recompute},
        "checkpoint": {"interval": -1, "resume": "never"},  # no multi-GB write at the end
        "eval": {"interval": 0, "batches": 1},
    })


def measure(name, flavor, overrides, seq, gb, mb, recompute, compiled, steps: int, cache: Path, d: Path,
            phases: bool = False, expandable: bool = True) -> dict:
    import torch

    from apogee.launch import launch_local

    cfg = one_gpu_config(d, cache, flavor, overrides, seq, gb, mb, recompute, compiled, steps,
                         expandable=expandable)
    gc.collect()  # a config that failed (out of memory) leaves its tensors to the collector
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if phases:
        with MemoryPhases() as mp:
            launch_local(cfg, 1)
    else:
        launch_local(cfg, 1)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(d / "metrics.jsonl")]
    reserved = torch.cuda.max_memory_reserved() / 2**30
    a = cfg.model.args()
    t_attn = time_attention(mb, a.n_heads, a.n_kv_heads, seq, a.dim // a.n_heads)
    body = [r for r in recs if WARMUP_STEPS < r["step"] < steps]
    step_s = [gb * seq / r["tokens_per_s"] for r in body]
    extra = {}
    if body and all("power_w" in r for r in body):
        extra = {"power_w": [r["power_w"] for r in body], "energy_j_per_token": [r["energy_j_per_token"] for r in body]}
    if phases:  # the logged peak was reset at every mark: the largest phase peak is the run's
        extra.update(phases_step5=mp.step(5), peak_over_phases_gib=max(peak for _, _, peak in mp.marks))
    return {**extra, "config": name, "flavor": flavor, "overrides": overrides, "seq_len": seq, "global_batch": gb,
            "micro_batch": mb, "recompute": recompute, "compile": compiled,
            "step_s": step_s, "mfu_logged": [r.get("mfu") for r in body],
            "loss_first_last": [recs[0]["loss"], recs[-1]["loss"]],
            "mem_allocated_gib": max(r["mem_gib"] for r in body),
            "mem_reserved_gib": reserved, "attn_fwd_bwd_s": t_attn, "wall_s": wall}


def board_power(seconds: float = 3.0) -> dict:
    """The GPU's mean power idle and under back-to-back 8192^3 bf16 GEMMs (NVML's energy counter), or {}."""
    import torch

    from apogee.telemetry.energy import EnergyMeter

    meter = EnergyMeter.for_device(torch.device("cuda"))
    if meter is None:
        return {}
    try:
        return _board_power(meter, seconds)
    finally:
        meter.close()


def _board_power(meter, seconds: float) -> dict:
    import torch

    torch.cuda.synchronize()
    meter.lap()
    time.sleep(seconds)
    idle = meter.lap() / seconds
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):  # warm: clocks up, cuBLAS chose its kernel
        a @ a
    torch.cuda.synchronize()
    meter.lap()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        n += 20
    took = time.perf_counter() - t0
    return {"idle_w": idle, "gemm_w": meter.lap() / took, "gemm_tflops": n * 2 * 8192**3 / took / 1e12}


def planner_run(rec: dict, acc):
    """The planner's run and layout for one of these one-GPU records (this file's, gpu_host_dispatch.py's):
    its model, global batch, micro-batch, recompute and compile on one ``acc``, bf16, apogee's stack."""
    from apogee.models.flavors import FLAVORS
    from apogee.planner.cluster import Cluster
    from apogee.planner.spec import Layout, RunSpec, shape_from_args

    fa = dataclasses.replace(FLAVORS[rec["flavor"]], **rec.get("overrides", {}))
    run = RunSpec(model=shape_from_args(fa, flavor=rec["flavor"], seq_len=rec["seq_len"]),
                  cluster=Cluster(accel=acc, gpus=1, gpus_per_node=1), fixed={}, global_batch=rec["global_batch"],
                  precision="bf16")
    lay = Layout(microbatch=rec["micro_batch"], recompute=rec.get("recompute", "none"), zero=3, dp_overlap=False,
                 compile=rec.get("compile", False))
    return run, lay


def predict(rec: dict, gpu: str, gemm_table: Path | None, engine: bool) -> dict:
    """The planner's estimate for one measured config. ``engine``: calibrate like the CPU device is
    (benchmarks/planner_vs_measured.py), by this machine's own micro-benchmarks: the GEMM table's
    absolute times (the engine's matmuls are these cuBLAS calls) and the attention call timed above;
    otherwise the built-in accelerator."""
    from apogee.planner.cluster import ACCELERATORS, load_gemm_shape_table
    from apogee.planner.estimate import estimate

    acc = ACCELERATORS[gpu]
    if gemm_table is not None:
        table = load_gemm_shape_table(gemm_table, gpu)
        acc = dataclasses.replace(acc, **({"gemm_table": table} if engine else {"gemm_shape_table": table}))
    if engine:
        # compute.py prices causal flash attention as 3.5 * (4 * tokens * seq * hidden) / 2 FLOPs per layer.
        m = planner_run(rec, acc)[0].model
        attn_flops = 3.5 * 4.0 * rec["micro_batch"] * m.seq_len * m.seq_len * m.hidden / 2
        acc = dataclasses.replace(acc, attn_eff=attn_flops / rec["attn_fwd_bwd_s"] / acc.peak("bf16"))
    est = estimate(*planner_run(rec, acc))
    step_min, step_med = min(rec["step_s"]), statistics.median(rec["step_s"])
    mem = est.memory.total / 2**30
    energy = {}
    if "energy_j_per_token" in rec:
        # Means, not medians: each window's energy is a difference of counter readings, so one window's
        # error is its neighbour's with the sign turned, and the mean over equal-token windows is the
        # whole run's energy over its tokens. Single windows of a step or two scatter by +-40%.
        meas_j = statistics.fmean(rec["energy_j_per_token"])
        energy = {"pred_j_per_token": est.energy_j_per_token, "meas_j_per_token": meas_j,
                  "meas_power_w": statistics.fmean(rec["power_w"]),
                  "energy_err_pct": 100 * (est.energy_j_per_token / meas_j - 1)}
    return {**energy, "pred_step_s": est.step_time_s, "meas_step_min_s": step_min, "meas_step_median_s": step_med,
            "step_err_pct": 100 * (est.step_time_s / step_med - 1),
            "pred_mem_gib": mem, "pred_breakdown_gib": est.memory.gib(),
            "mem_err_vs_reserved_pct": 100 * (mem / rec["mem_reserved_gib"] - 1),
            "mem_err_vs_allocated_pct": 100 * (mem / rec["mem_allocated_gib"] - 1),
            "pred_mfu": est.mfu, "meas_mfu": statistics.median(x for x in rec["mfu_logged"] if x is not None)
            if any(x is not None for x in rec["mfu_logged"]) else None}


def gpu_name_to_accelerator(device: str) -> str:
    d = device.lower()
    for key, name in (("h200", "h200"), ("h100", "h100-80gb"), ("a100", "a100-80gb"), ("b200", "b200")):
        if key in d:
            return name
    raise SystemExit(f"no built-in accelerator for device {device!r}; pass --gpu")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default="", help="run only the configs whose name contains one of these texts "
                    "(comma-separated)")
    ap.add_argument("--phases", action="store_true", help="record memory at each phase of a step (MemoryPhases)")
    ap.add_argument("--default-allocator", action="store_true", help="run.expandable_segments = false (torch's "
                    "allocator as configured; once set in a process, expandable segments stay on: run this alone)")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements here (JSON)")
    ap.add_argument("--measured", type=Path, default=None, help="predict for these measurements instead of measuring")
    ap.add_argument("--gpu", default="", help="the planner's accelerator (default: from the device name)")
    ap.add_argument("--gemm-table", type=Path, default=None, help="a benchmarks/gemm_table.py file for that GPU")
    args = ap.parse_args(argv)

    if args.measured is not None:
        data = json.loads(args.measured.read_text())
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: measure on a GPU machine, or pass --measured FILE")
        data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "expandable_segments": not args.default_allocator, "board": board_power(), "runs": []}
        print(json.dumps(data["board"]), flush=True)
        with tempfile.TemporaryDirectory() as td:
            for i, cfg in enumerate(CONFIGS):
                if not any(part in cfg[0] for part in args.only.split(",")):
                    continue
                try:
                    rec = measure(*cfg, steps=args.steps, cache=Path(td) / "cache", d=Path(td) / f"run{i}",
                                  phases=args.phases, expandable=not args.default_allocator)
                except Exception as exc:  # one config's failure (out of memory, a compile error) is a figure too
                    rec = {"config": cfg[0], "error": f"{type(exc).__name__}: {exc}"[:2000]}
                data["runs"].append(rec)
                print(json.dumps(rec), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(data, indent=1))
    gpu = args.gpu or gpu_name_to_accelerator(data["device"])
    allocator = {True: ", expandable segments", False: ", default allocator"}.get(data.get("expandable_segments"), "")
    print(f"{data['device']} (torch {data['torch']}{allocator}) as the planner's {gpu}"
          + (f", GEMM table {args.gemm_table}" if args.gemm_table else ""))
    if data.get("board"):
        from apogee.planner.cluster import ACCELERATORS

        b = data["board"]
        print(f"board power: idle {b['idle_w']:.0f} W, 8192^3 bf16 GEMMs {b['gemm_w']:.0f} W at "
              f"{b['gemm_tflops']:.0f} TFLOP/s; the planner's {gpu} draws {ACCELERATORS[gpu].power_w:.0f} W (TDP)")
    for rec in data["runs"]:
        if "error" in rec:
            print(f"{rec['config']:<26} failed: {rec['error'][:300]}")
            continue
        print(f"{rec['config']:<26} measured: step median {statistics.median(rec['step_s']):.3f} s "
              f"(min {min(rec['step_s']):.3f}), memory reserved {rec['mem_reserved_gib']:.2f} GiB, "
              f"allocated {rec['mem_allocated_gib']:.2f} GiB, loss {rec['loss_first_last'][0]:.2f} -> "
              f"{rec['loss_first_last'][1]:.2f}")
        for engine in (False, True):
            if engine and args.gemm_table is None:
                continue
            p = predict(rec, gpu, args.gemm_table, engine)
            meas_mfu = f"{100 * p['meas_mfu']:.1f}%" if p["meas_mfu"] is not None else "n/a"
            label = "engine-calibrated" if engine else f"built-in {gpu}"
            print(f"  {label:<24} step {p['pred_step_s']:.3f} s -> {p['step_err_pct']:+.1f}% vs median   "
                  f"MFU predicted {100 * p['pred_mfu']:.1f}%, measured {meas_mfu}   memory {p['pred_mem_gib']:.2f} GiB "
                  f"-> {p['mem_err_vs_reserved_pct']:+.1f}% vs reserved, {p['mem_err_vs_allocated_pct']:+.1f}% vs "
                  f"allocated   (" + ", ".join(f"{k} {v:.2f}" for k, v in p["pred_breakdown_gib"].items()) + ")")
            if "energy_err_pct" in p:
                print(f"  {'':<24} energy {p['pred_j_per_token']:.4f} J/token at TDP -> {p['energy_err_pct']:+.1f}% vs "
                      f"measured {p['meas_j_per_token']:.4f} J/token ({p['meas_power_w']:.0f} W)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
