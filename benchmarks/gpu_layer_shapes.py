"""One GPT layer of each published H100 run, at its per-GPU shard, timed on this GPU against the planner.

    python benchmarks/gpu_layer_shapes.py [--csv PATH] [--mb 1,2] [--reps 10] [--out layers.json]   # on a GPU
    python benchmarks/gpu_layer_shapes.py --shrink                                                # any machine

The planner under-predicts the published Megatron-LM H100 rows more the larger the model (docs/planner.md,
"H100 rows"), and the NeMo GPT-3 175B pair runs 15% faster at micro-batch 2 than 1 where the planner
gives 5%. Isolated cuBLAS GEMMs of the rows' shapes (benchmarks/gemm_table.py) do not show that size
dependence. This times one whole layer in sequence, as a tensor-parallel rank runs it without the
communication, to see whether the layer as a whole does:

* ``matmul``: the layer's GEMMs and causal flash attention alone (fused QKV with bias, SDPA, output
  projection, fc1, fc2), forward + backward: what the planner prices as ``gemm_f + gemm_b + attn_f +
  attn_b`` (compute.layer_parts);
* ``layer``: the whole Megatron-style GPT block with sequence parallelism: LayerNorm, bias-dropout-add
  (p = 0.1) and the residual on the rank's s/tp tokens, the sequence all-gather before each
  column-parallel GEMM and the reduce-scatter after each row-parallel one replaced by their memory copies
  (repeat / sum over tp chunks), tanh GeLU. Eager PyTorch ops, not Megatron's fused kernels (more memory
  traffic than Megatron's), so only its trend across rows is comparable with the planner's
  fused count.

Shapes: every H100 row of the published runs (read as benchmarks/planner_accuracy.py reads it: GPT, tp
from the row, sequence parallel) and NeMo's GPT-3 175B (tp 4, seq 2048), each at the micro-batches
``--mb``. Parameters and gradients are bf16 (Megatron keeps fp32 main gradients: its weight-gradient
GEMMs accumulate into fp32, same FLOPs). Each figure is the median of ``--reps`` forward + backward
passes after 3 warm-up ones, CUDA events.

Printed per shape: measured ms, the planner's ms for the same work (h100-80gb built-in, its calibrated
in-stack ``gemm_eff``), their ratio, and that ratio over the first row's: a rising column means the
layer gets relatively faster with size than the planner's shape model says.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from planner_accuracy import DEFAULT_CSV, row_to_run  # noqa: E402

from apogee.planner.cluster import get_accelerator  # noqa: E402
from apogee.planner.compute import layer_parts  # noqa: E402
from apogee.planner.spec import ModelShape  # noqa: E402

# NeMo 24.12's GPT-3 175B rows (benchmarks/planner_heldout.py): tp 4, seq 2048, micro-batch 1 and 2.
GPT3_175B = ModelShape(layers=96, hidden=12288, heads=96, kv_heads=96, ffn_hidden=49152, vocab=50304,
                       seq_len=2048, mlp="gelu", attention="flash")
SHRUNK = ModelShape(layers=1, hidden=256, heads=4, kv_heads=4, ffn_hidden=1024, vocab=512, seq_len=128,
                    mlp="gelu", attention="flash")


def shapes(csv_path: Path, gpu: str) -> list[tuple[str, ModelShape, int]]:
    """(name, model, tp) of every published row on ``gpu``, then NeMo's GPT-3 175B."""
    out = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            run, _, _ = row_to_run(row)
            if run.cluster.accel.name == gpu:
                out.append((row["model"].split(" (")[0], run.model, run.fixed["tp"]))
    out.append(("NeMo GPT-3 175B", GPT3_175B, 4))
    return out


def gpt_layer(m: ModelShape, tp: int, mb: int, device: str, dtype, *, matmul_only: bool):
    """A closure running one forward + backward of the layer's per-rank shard, and its inputs."""
    import torch
    import torch.nn.functional as F

    h, heads, d, f = m.hidden, m.heads // tp, m.head_dim, m.ffn_hidden // tp
    s = m.seq_len

    def param(*shape):
        return (torch.randn(*shape, device=device, dtype=dtype) * 0.02).requires_grad_()

    w_qkv, b_qkv = param(3 * heads * d, h), param(3 * heads * d)
    w_o, b_o = param(h, heads * d), param(h)
    w_1, b_1 = param(f, h), param(f)
    w_2, b_2 = param(h, f), param(h)
    ln = [(torch.ones(h, device=device, dtype=dtype, requires_grad=True),
           torch.zeros(h, device=device, dtype=dtype, requires_grad=True)) for _ in range(2)]
    params = [w_qkv, b_qkv, w_o, b_o, w_1, b_1, w_2, b_2] + [t for pair in ln for t in pair]

    def attention(a):  # a: [mb * s, h] -> [mb * s, heads * d]
        qkv = F.linear(a, w_qkv, b_qkv).view(mb, s, 3, heads, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return ctx.transpose(1, 2).reshape(mb * s, heads * d)

    def gather(x):  # the sequence all-gather's output: tp copies of the rank's s/tp tokens
        return x.repeat(tp, 1) if tp > 1 else x

    def scatter(x):  # the reduce-scatter's local sum over the tp chunks
        return x.view(tp, -1, h).sum(0) if tp > 1 else x

    if matmul_only:
        x = torch.randn(mb * s, h, device=device, dtype=dtype, requires_grad=True)

        def step():
            y = F.linear(attention(x), w_o)
            out = F.linear(F.linear(y, w_1, b_1), w_2)
            out.backward(torch.ones_like(out))
    else:
        x = torch.randn(mb * s // tp, h, device=device, dtype=dtype, requires_grad=True)

        def step():
            a = gather(F.layer_norm(x, (h,), *ln[0]))
            x2 = x + F.dropout(scatter(F.linear(attention(a), w_o)) + b_o, 0.1)
            u = F.gelu(F.linear(gather(F.layer_norm(x2, (h,), *ln[1])), w_1, b_1), approximate="tanh")
            out = x2 + F.dropout(scatter(F.linear(u, w_2)) + b_2, 0.1)
            out.backward(torch.ones_like(out))
    return step, params + [x]


def time_layer(m: ModelShape, tp: int, mb: int, device: str, reps: int, *, matmul_only: bool) -> float:
    """Median seconds of one forward + backward."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    step, tensors = gpt_layer(m, tp, mb, device, dtype, matmul_only=matmul_only)
    laps = []
    for i in range(reps + 3):
        for t in tensors:
            t.grad = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            lap = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            step()
            lap = time.perf_counter() - t0
        if i >= 3:
            laps.append(lap)
    del step, tensors
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(laps)


def model_flops(m: ModelShape, tp: int, mb: int) -> float:
    """Forward + backward FLOPs of the shard, Megatron's model basis (full s x s attention square)."""
    tokens = mb * m.seq_len
    gemm = 2 * tokens * (3 * m.hidden * m.hidden + m.hidden * m.hidden + 2 * m.hidden * m.ffn_hidden) / tp
    attn = 4 * tokens * m.seq_len * m.hidden / tp
    return 3 * (gemm + attn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--gpu", default="h100-80gb", help="the planner accelerator (and whose published rows)")
    ap.add_argument("--mb", default="1,2", help="micro-batches, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    ap.add_argument("--shrink", action="store_true", help="dry run: one 256-wide shape on the CPU")
    a = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.shrink else "cpu"
    if device == "cpu" and not a.shrink:
        raise SystemExit("gpu_layer_shapes.py needs CUDA (or --shrink for a CPU dry run)")
    acc = get_accelerator(a.gpu)
    if a.shrink:
        todo = [("shrunk", SHRUNK, 2)]
    else:
        if not a.csv.exists():
            raise SystemExit(f"--csv: {a.csv} not found (the published runs, ../shared/planner/published-runs.csv)")
        todo = shapes(a.csv, a.gpu)
    mbs = [int(x) for x in a.mb.split(",")]
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{dev_name}, torch {torch.__version__}; planner accelerator {a.gpu} (gemm_eff {acc.gemm_eff}, "
          f"attn_eff {acc.attn_eff}); median of {a.reps} forward+backward passes")
    print(f"{'shape':<18}{'h':>6}{'tp':>3}{'mb':>3}  {'matmul ms':>9} {'pred':>7} {'ratio':>6} {'/first':>6}   "
          f"{'layer ms':>9} {'pred':>7} {'ratio':>6} {'/first':>6}  {'TFLOP/s':>7}")
    results, first = [], None
    for name, m, tp in todo:
        for mb in mbs:
            parts = layer_parts(m, tp, 1, 1, mb, True, "none", acc, "bf16")
            pred_mm = parts.gemm_f + parts.gemm_b + parts.attn_f + parts.attn_b
            pred_layer = parts.forward + parts.backward
            mm = time_layer(m, tp, mb, device, a.reps, matmul_only=True)
            layer = time_layer(m, tp, mb, device, a.reps, matmul_only=False)
            r_mm, r_layer = mm / pred_mm, layer / pred_layer
            first = first or (r_mm, r_layer)
            tflops = model_flops(m, tp, mb) / layer / 1e12
            print(f"{name:<18}{m.hidden:>6}{tp:>3}{mb:>3}  {mm * 1e3:>9.3f} {pred_mm * 1e3:>7.3f} {r_mm:>6.3f} "
                  f"{r_mm / first[0]:>6.3f}   {layer * 1e3:>9.3f} {pred_layer * 1e3:>7.3f} {r_layer:>6.3f} "
                  f"{r_layer / first[1]:>6.3f}  {tflops:>7.1f}", flush=True)
            results.append({"shape": name, "hidden": m.hidden, "heads": m.heads, "ffn_hidden": m.ffn_hidden,
                            "seq_len": m.seq_len, "tp": tp, "mb": mb, "matmul_s": mm, "layer_s": layer,
                            "pred_matmul_s": pred_mm, "pred_layer_s": pred_layer, "parts": parts._asdict()})
    print("ratio = measured / planner; /first = that ratio over the first shape's (below 1: relatively faster "
          "than the planner's shape model); TFLOP/s = the layer's model FLOPs (full attention square) / layer ms")
    if a.out:
        a.out.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "accelerator": a.gpu,
                                     "reps": a.reps, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
