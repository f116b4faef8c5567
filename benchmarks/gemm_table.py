"""Time every GEMM the planner prices for the published runs on one accelerator, for its shape table.

    python benchmarks/gemm_table.py [--gpu h100-80gb] [--csv PATH] [--out gemm-h100.json] [--reps 20]
                                    [--engine-configs]
    python benchmarks/planner_accuracy.py --gemm-table gemm-h100.json

The planner prices a GPU GEMM from one calibration per accelerator (`gemm_eff`, the in-stack efficiency
of an 8192^3 GEMM, compute.GEMM_REF_SHAPE) and a shape model (waves, K prologue, roofline). On the H100
rows of the published runs the rows imply an efficiency that rises with GEMM size faster than that
model (docs/planner.md, "H100 rows"). This measures the shape dependence instead: for every row on
``--gpu`` (read as benchmarks/planner_accuracy.py reads it) and every micro-batch the planner's search
may choose there, the forward, input-gradient and weight-gradient shapes of a layer and the output
layer (compute.gemm_shapes), plus the reference shape; each is timed alone as one bf16
[M,K] x [K,N] matmul (CUDA events, median of ``--reps`` after warm-up). The planner keeps the level
(gemm_eff) and takes only the ratios to the reference shape (cluster.Accelerator.gemm_shape_table).

Writes JSON: {"accelerator", "dtype": "bf16", "device", "torch", "entries": [[M, N, K, seconds], ...]}.
Needs a GPU of that kind (about 700 shapes, 1-3 minutes on an H100); ``--limit`` times only the
smallest shapes (a smoke test on any machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planner_accuracy import DEFAULT_CSV, row_to_run  # noqa: E402

from apogee.planner.compute import GEMM_REF_SHAPE, gemm_shapes  # noqa: E402
from apogee.planner.search import MAX_MICROBATCH, _divisors  # noqa: E402


def shapes_for_rows(rows: list[dict], gpu: str) -> set[tuple[int, int, int]]:
    """Every (M, N, K) the search may price for the rows on ``gpu``: each micro-batch it considers."""
    out = {GEMM_REF_SHAPE}
    for row in rows:
        run, _, _ = row_to_run(row)
        if run.cluster.accel.name != gpu:
            continue
        tp, dp = run.fixed["tp"], run.fixed["dp"]
        per_rank = run.global_batch // dp
        for mb in (d for d in _divisors(per_rank) if d <= MAX_MICROBATCH):
            out |= gemm_shapes(run.model, tp, 1, mb)
    return out


def shapes_for_engine_configs() -> set[tuple[int, int, int]]:
    """Every (M, N, K) the planner prices for benchmarks/planner_vs_measured_gpu.py's one-GPU configs."""
    import dataclasses

    from planner_vs_measured_gpu import CONFIGS

    from apogee.models.flavors import FLAVORS
    from apogee.planner.spec import shape_from_args

    out = set()
    for _, flavor, overrides, seq, _, mb, _, _ in CONFIGS:
        m = shape_from_args(dataclasses.replace(FLAVORS[flavor], **overrides), flavor=flavor, seq_len=seq)
        out |= gemm_shapes(m, 1, 1, mb)
    return out


def time_gemm(M: int, N: int, K: int, device, dtype, reps: int) -> float:
    """Median seconds of one [M,K] x [K,N] matmul after warm-up."""
    import torch

    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    laps = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            laps.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            laps.append(time.perf_counter() - t0)
    return statistics.median(laps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="h100-80gb", help="the accelerator (planner name) whose published rows to cover")
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--out", type=Path, default=Path("gemm-table.json"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=0, help="time only the N smallest shapes (smoke test)")
    ap.add_argument("--engine-configs", action="store_true",
                    help="also the shapes of benchmarks/planner_vs_measured_gpu.py's configs (the engine on one GPU)")
    args = ap.parse_args(argv)

    import torch

    shapes = shapes_for_rows(list(csv.DictReader(open(args.csv))), args.gpu)
    if args.engine_configs:
        shapes |= shapes_for_engine_configs()
    shapes = sorted(shapes, key=lambda s: s[0] * s[1] * s[2])
    if args.limit:
        shapes = shapes[: args.limit]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16
    print(f"{len(shapes)} shapes for the {args.gpu} rows on {name} (torch {torch.__version__}), bf16", flush=True)
    entries = []
    t0 = time.perf_counter()
    for i, (M, N, K) in enumerate(shapes):
        t = time_gemm(M, N, K, device, dtype, args.reps)
        entries.append([M, N, K, t])
        if (M, N, K) == GEMM_REF_SHAPE or i % 50 == 0:
            print(f"  {M:>6} x {N:>6} x {K:>6}: {t * 1e3:8.3f} ms, {2 * M * N * K / t / 1e12:6.1f} TFLOP/s", flush=True)
    args.out.write_text(json.dumps({"accelerator": args.gpu, "dtype": "bf16", "device": name,
                                    "torch": torch.__version__, "entries": entries}))
    print(f"wrote {args.out} ({len(entries)} shapes, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
