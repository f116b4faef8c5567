"""Where one training step of the engine spends its GPU time, by kind of kernel.

    python benchmarks/gpu_step_profile.py [--only "llama-1b mb4"] [--steps 6] [--out profile.json]

Trains each config of benchmarks/planner_vs_measured_gpu.py (one GPU, the same settings) and profiles
one step after warm-up with torch.profiler (``--profile-step``, default 5), stepping the profiler from
an optimizer-step hook (the engine is not touched). Every device kernel of that step is put in one
category by its name: GEMM (cuBLAS / CUTLASS), attention (flash / memory-efficient SDPA kernels),
loss (softmax, log-softmax, NLL: the cross-entropy over the vocabulary), optimizer (multi-tensor
AdamW), copy/cast (dtype conversions and copies: autocast's casts, .float(), .contiguous()),
reduction, and other elementwise. The table gives milliseconds per category and its share of the
summed kernel time, next to the step's wall time (kernel time below it: the GPU idles on the host).

Why: the planner prices GEMMs and attention from measurements (benchmarks/gemm_table.py and the SDPA
timing of planner_vs_measured_gpu.py) and the elementwise rest from a per-op memory-bound model; on the
H100 the eager engine took ~45 ms more per llama-1b micro-batch than GEMMs + attention + that model
(docs/planner.md, "The H100 session"). This splits that remainder so it can be modelled from what it is.

On a machine without CUDA it profiles CPU ops instead (a dry run of this script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from planner_vs_measured_gpu import CONFIGS, one_gpu_config  # noqa: E402

# First match wins: the order matters (a flash kernel's name may contain "gemm"-like words).
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient_attention", re.I)),
    ("loss", re.compile(r"softmax|nll_loss|cross_entropy", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach|fused_adam", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|aten::mm|aten::addmm|aten::bmm", re.I)),
    ("copy/cast", re.compile(r"copy|cast|convert|_to_copy", re.I)),
    ("reduction", re.compile(r"reduce|sum|norm|mean", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other elementwise"


def kernel_times(prof, cuda: bool) -> dict[str, float]:
    """Seconds per kernel name in the profiled step (device kernels on CUDA, CPU ops otherwise)."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if cuda:
            # Device events only: torch >= 2.11 also gives each CPU op the device time of the kernels it
            # launched (self_device_time_total), which would count every kernel twice.
            if str(getattr(evt, "device_type", "")).endswith("CUDA"):
                out[evt.key] += getattr(evt, "self_device_time_total", 0.0) / 1e6
        elif evt.key.startswith("aten::"):
            out[evt.key] += evt.self_cpu_time_total / 1e6
    return {k: v for k, v in out.items() if v > 0}


def profile_config(cfg_row, steps: int, profile_step: int, cache: Path, run_dir: Path) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from apogee.launch import launch_local

    name, flavor, overrides, seq, gb, mb, recompute, compiled = cfg_row
    cuda = torch.cuda.is_available()
    cfg = one_gpu_config(run_dir, cache, flavor, overrides, seq, gb, mb, recompute, compiled, steps,
                         device="cuda" if cuda else "cpu")
    # On CUDA the device's kernels alone: recording every CPU op as well slows the host ~3x (llama-1b mb1:
    # 0.46 s a step against 0.17 s), which hides a step whose GPU waits on the host.
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    # Steps 1..profile_step-1 are skipped or warm up the profiler; step profile_step is recorded.
    with profile(activities=activities, schedule=schedule(wait=max(0, profile_step - 2), warmup=1, active=1, repeat=1)) as prof:
        hook = register_optimizer_step_post_hook(lambda *a: prof.step())
        try:
            launch_local(cfg, 1)
        finally:
            hook.remove()
    times = kernel_times(prof, cuda)
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    wall = next(gb * seq / r["tokens_per_s"] for r in recs if r["step"] == profile_step)
    by_cat: dict[str, float] = defaultdict(float)
    for kernel, t in times.items():
        by_cat[category(kernel)] += t
    top = sorted(times.items(), key=lambda kv: -kv[1])[:15]
    return {"config": name, "device": torch.cuda.get_device_name() if cuda else "cpu", "step_wall_s": wall,
            "kernel_s": sum(times.values()), "by_category_s": dict(by_cat),
            "top_kernels": [[k, category(k), t] for k, t in top]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="llama-1b mb4", help="configs whose name contains one of these (comma-separated)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--profile-step", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--shrink", action="store_true", help="dry run: a 2-layer, 256-wide, seq 128 model (any machine)")
    args = ap.parse_args(argv)
    if not 2 <= args.profile_step < args.steps:
        raise SystemExit("--profile-step must be at least 2 and below --steps (the last step evaluates)")
    rows = [c for c in CONFIGS if any(part in c[0] for part in args.only.split(","))]
    if args.shrink:
        small = {"n_layers": 2, "dim": 256, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 512, "vocab_size": 4096}
        rows = [(n, f, {**o, **small}, 128, 4, 2, r, c) for n, f, o, s, g, m, r, c in rows]
    results = []
    with tempfile.TemporaryDirectory() as td:
        for i, row in enumerate(rows):
            r = profile_config(row, args.steps, args.profile_step, Path(td) / "cache", Path(td) / f"run{i}")
            results.append(r)
            print(f"\n{r['config']} on {r['device']}: step {r['step_wall_s'] * 1e3:.1f} ms wall, "
                  f"{r['kernel_s'] * 1e3:.1f} ms of kernels")
            for cat, t in sorted(r["by_category_s"].items(), key=lambda kv: -kv[1]):
                print(f"  {cat:<18} {t * 1e3:8.1f} ms  {100 * t / r['kernel_s']:5.1f}%")
            print("  top kernels:")
            for k, cat, t in r["top_kernels"]:
                print(f"    {t * 1e3:8.2f} ms  {cat:<17} {k[:110]}")
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
