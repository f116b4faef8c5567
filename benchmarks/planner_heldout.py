"""Predict published runs the planner was never calibrated on (held out): H100s, and A100s under DeepSpeed.

    python benchmarks/planner_heldout.py [--json]

`benchmarks/planner_accuracy.py` checks the 19 Megatron-LM rows; the H100 calibration (`gemm_eff`)
comes from one of them. The rows here were never used to set anything. Every run is priced with
`stack = "megatron"` (fused kernels, the H100's in-stack `gemm_eff`, Megatron's activation memory),
its stated layout keys pinned and the rest searched; the shapes are given, not apogee flavors (a
flavor's plans are filtered by apogee's own validation, and these are other stacks' runs).

1. Meta's Llama 3 405B pre-training (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 4; the
   same figures on Balaji's SC'24 slides): 126 layers, hidden 16384, ffn 53248, 128 query / 8 kv heads,
   vocabulary 128256, 16M tokens per batch, bf16, FSDP-style sharding of optimizer state and gradients
   (`zero = 2`), interleaved 1F1B, and the paper's pipeline split (section 3.3.2: one layer fewer on the
   first and the last stage, the first chunk holding the embedding, the last the output and loss; 126 =
   128 - 2 layers), which is Megatron-LM's embedding- and loss-aware split (`pp_split =
   "embedding_loss"`), and its all-gather context parallelism (same section: K and V all-gathered, the
   communication exposed; `cp_comm = "all_gather"`). The virtual stages are not published: searched.
   Meta's stack is neither apogee nor Megatron-LM; Megatron's is the nearest documented one.

       GPUs    TP  CP  PP  DP  seq      TFLOP/s/GPU (BF16 MFU)
       8,192    8   1  16  64  8,192    430 (43%)
       16,384   8   1  16 128  8,192    400 (41%)
       16,384   8  16  16   8  131,072  380 (38%)

2. NVIDIA NeMo 24.12's pre-training table (docs.nvidia.com/nemo-framework/user-guide/24.12, "Performance
   Benchmarks"; NeMo trains with Megatron-Core): DGX-H100, FP8, the Llama and GPT-3 175B rows (its GPT-3
   5B/20B and Nemotron shapes are not stated there), with their GBS, MBS, sequence length, TP, PP, CP
   and VP (virtual stages); the distributed optimizer (`zero = 1`) with
   overlapped gradient reduction and TP communication as in the published H100 rows.

3. Megatron-Bridge's dense rows (docs.nvidia.com/nemo/megatron-bridge, "Performance", DGX-H100, containers
   25.11 and 26.02; Megatron-Core): FP8 (current scaling) Llama 3 8B, 70B and 3.1 405B at sequence 8192 with
   their GBS, MBS, TP, PP, CP and VP, the 8B under Megatron's FSDP (`zero = 3`), the others the distributed
   optimizer. Compared on tokens/s, as the next rows.

4. Mixture-of-experts runs on DGX-H100s (Megatron-Core; 8 GPUs a node, 8 x 400 Gb/s InfiniBand), Qwen3's
   shapes as Megatron-LM's MoE model zoo configures them (github.com/yanring/Megatron-MoE-ModelZoo,
   model_configs/benchmarking/Qwen3-*.yaml: heads of 128 (--kv-channels) on hidden 2048 / 4096, 4 KV
   groups, 128 experts, top 8, untied, vocabulary 151936, sequence 4096), experts unsplit
   (--expert-tensor-parallel-size 1, `expert_tp = 1`), folded over the tensor ranks where ep exceeds dp:
   - Megatron-Bridge's performance summary (docs.nvidia.com/nemo/megatron-bridge, "Performance", DGX-H100,
     containers 25.11 and 26.02): FP8, force-balanced routing, dropless; its GBS, MBS, TP, PP, VP and EP.
     The 235B rows' 94 layers in 32 chunks are the embedding- and loss-aware split (96 slots).
   - The model zoo's Qwen3 table (best_practice/Qwen3/readme.md, 256 H100s, BF16): step times for four
     layouts of the 235B with their recompute ("norm, act": Megatron's --recompute-modules layernorm
     moe_act, the planner's `selective` for a Llama block; its TP communication not overlapped: the
     config has no --tp-comm-overlap). The row with "1f1b overlap" (the all-to-all hidden behind another
     micro-batch) is left out: not modelled.
   Both count causal attention as half (tokens/s times that basis gives their TFLOP/s); the rows compare
   tokens per second, which needs no basis.

5. Megatron-DeepSpeed runs on A100 80GB (Megatron's tensor parallelism, DeepSpeed's pipeline engine and
   ZeRO-1), compared on seconds per iteration as published; bf16, full activation recomputation, priced as
   the 2021 Megatron stack of `planner_accuracy.py`'s A100 rows (materialised attention scores, tied
   embeddings, no sequence parallelism, no overlap of TP or gradient traffic) with DeepSpeed's schedule,
   non-interleaved 1F1B:
   - Megatron-Turing NLG 530B (Smith et al. 2022, arXiv 2201.11990, section 2.4): 105 layers, hidden 20480,
     128 heads, sequence 2048, global batch 1920, TP 8, PP 35 on 280 / 350 / 420 DGX A100 nodes (eight
     200 Gb/s HDR InfiniBand adapters each): 60.1 / 50.2 / 44.4 s an iteration (126 / 121 / 113 TFLOP/s,
     Narayanan's Eq. 3 with the recompute pass). The micro-batch is not stated: searched. Vocabulary
     50272 (GPT-2's, padded; from a third party's config, and the step moves by < 0.1% with it).
   - BLOOM 176B (github.com/bigscience-workshop/bigscience, train/tr11-176B-ml: README.md and
     tr11-176B-ml.slurm): 70 layers, hidden 14336, 112 heads, vocabulary 250880 (padded), sequence 2048,
     global batch 2048, micro-batch 2, TP 4, PP 12, DP 8 on 48 nodes of 8 A100 80GB; the README's log line
     "elapsed time per iteration (s): 104.70 ... TFLOPs: 149.77". Jean Zay's nodes have 4 Omni-Path links
     (README); at 100 Gb/s each (secondary summaries of the BLOOM paper) that is 6.25 GB/s a GPU.

Each row of 1 and 2 is printed twice: with the planner's own choices (its memory model decides recompute) and
with recompute pinned to none, fitting or not, which separates the time model from that choice. The
predictions are in the planner's model FLOPs (attention over the full s x s, as Megatron-LM counts
it). NeMo's table uses that basis (its tokens/s/GPU times these FLOPs per token give its TFLOP/s);
Meta's does not say, so the last column gives the error if causal attention is counted as half.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from apogee.planner.search import complete_layout  # noqa: E402
from apogee.planner.spec import run_from_dict, shape_from_flavor  # noqa: E402


def _flavor_shape(flavor: str, **override) -> dict:
    """A flavor's shape as explicit model keys (so its plans are not filtered by apogee's validation)."""
    shape = shape_from_flavor(flavor)
    return {**{k: getattr(shape, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab")},
            **override}


LLAMA3_405B = _flavor_shape("llama3-405b")
LLAMA3_70B = _flavor_shape("llama3-70b")
LLAMA3_8B = _flavor_shape("llama3-8b")
LLAMA2_70B = _flavor_shape("llama3-70b", vocab=32000)  # the same block; Llama 2's 32000-token vocabulary
LLAMA2_13B = {"layers": 40, "hidden": 5120, "heads": 40, "kv_heads": 40, "ffn_hidden": 13824, "vocab": 32000}
LLAMA2_7B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "ffn_hidden": 11008, "vocab": 32000}
# GPT-3 175B (Brown et al. 2020, Table 2.1), tied embeddings; the padded GPT-2 vocabulary is not stated (the
# predictions move by < 0.1% between 50304 and 51200).
GPT3_175B = {"layers": 96, "hidden": 12288, "heads": 96, "kv_heads": 96, "ffn_hidden": 49152, "vocab": 50304,
             "mlp": "gelu", "tie_embeddings": True}
META_TOKENS = 16 * 2**20  # "16M" tokens per batch
# Layout keys a source states for all its rows (see the module doc).
SOURCE_PINS = {"Meta": {"pp_split": "embedding_loss", "cp_comm": "all_gather"}}

# (source, model, shape, precision, gpus, global batch, micro-batch or None, seq, tp, pp, cp, vp or None,
#  zero, published model TFLOP/s per GPU)
ROWS = [
    ("Meta", "Llama 3 405B", LLAMA3_405B, "bf16", 8192, META_TOKENS // 8192, None, 8192, 8, 16, 1, None, 2, 430.0),
    ("Meta", "Llama 3 405B", LLAMA3_405B, "bf16", 16384, META_TOKENS // 8192, None, 8192, 8, 16, 1, None, 2, 400.0),
    ("Meta", "Llama 3 405B", LLAMA3_405B, "bf16", 16384, META_TOKENS // 131072, None, 131072, 8, 16, 16, None, 2,
     380.0),
    ("NeMo", "Llama 3 8B", LLAMA3_8B, "fp8", 8, 128, 1, 8192, 1, 1, 2, 1, 1, 711.0),
    ("NeMo", "Llama 3 70B", LLAMA3_70B, "fp8", 64, 128, 1, 8192, 4, 4, 2, 5, 1, 734.0),
    ("NeMo", "Llama 2 7B", LLAMA2_7B, "fp8", 8, 128, 1, 4096, 1, 1, 1, 1, 1, 780.0),
    ("NeMo", "Llama 2 13B", LLAMA2_13B, "fp8", 16, 128, 1, 4096, 1, 4, 1, 10, 1, 760.0),
    ("NeMo", "Llama 2 70B", LLAMA2_70B, "fp8", 64, 128, 1, 4096, 4, 4, 1, 20, 1, 768.0),
    ("NeMo", "GPT-3 175B", GPT3_175B, "fp8", 128, 256, 1, 2048, 4, 8, 1, 6, 1, 771.0),
    ("NeMo", "GPT-3 175B", GPT3_175B, "fp8", 512, 2048, 2, 2048, 4, 8, 1, 6, 1, 888.0),
]


# Qwen3 MoE shapes (the model zoo's configs; ffn_hidden is the dense MLP's, unused: every layer is MoE).
QWEN3_30B = {"layers": 48, "hidden": 2048, "heads": 32, "kv_heads": 4, "head_dim": 128, "ffn_hidden": 6144,
             "vocab": 151936, "experts": 128, "top_k": 8, "moe_ffn_hidden": 768}
QWEN3_235B = {"layers": 94, "hidden": 4096, "heads": 64, "kv_heads": 4, "head_dim": 128, "ffn_hidden": 12288,
              "vocab": 151936, "experts": 128, "top_k": 8, "moe_ffn_hidden": 1536}
FOLDED = {"expert_tp": 1}
SPLIT = {"pp_split": "embedding_loss"}
ZOO = {"expert_tp": 1, "tp_overlap": False}  # the zoo's Qwen3 configs have no --tp-comm-overlap
DEEPEP = {"ep_dispatch": "deepep"}
ZOO_STEP = 2048 * 4096 / 256  # tokens per GPU per step of its rows (GBS 2048, sequence 4096, 256 GPUs)

# (source, model, shape, precision, gpus, global batch, micro-batch, sequence, tp, pp, vp, zero, layout keys as
#  published, published tokens/s per GPU, published TFLOP/s per GPU, dispatcher as published)
CORE_ROWS = [
    ("Bridge 26.02", "Llama 3 70B", LLAMA3_70B, "fp8", 64, 256, 1, 8192, 4, 8, 5, 1, {}, 1621, 728, ""),
    ("Bridge 26.02", "Llama 3.1 405B", LLAMA3_405B, "fp8", 1024, 1536, 1, 8192, 8, 8, 8, 1, {"cp": 2}, 311, 784, ""),
    ("Bridge 25.11", "Llama 3 8B", LLAMA3_8B, "fp8", 8, 128, 1, 8192, 1, 1, None, 3, {}, 14451, 744, ""),
    ("Bridge 25.11", "Llama 3 70B", LLAMA3_70B, "fp8", 64, 128, 1, 8192, 4, 8, 5, 1, {}, 1602, 719, ""),
    ("Bridge 25.11", "Llama 3.1 405B", LLAMA3_405B, "fp8", 1024, 512, 1, 8192, 8, 8, 8, 1, {"cp": 2}, 292, 737, ""),
    ("Bridge 26.02", "Qwen3 30B-A3B", QWEN3_30B, "fp8", 16, 1024, 1, 4096, 1, 2, 12, 1, {"ep": 8, **FOLDED}, 5113,
     118, ""),
    ("Bridge 25.11", "Qwen3 30B-A3B", QWEN3_30B, "fp8", 16, 512, 2, 4096, 1, 2, 24, 1, {"ep": 8, **FOLDED}, 5275,
     121, ""),
    ("Bridge 26.02", "Qwen3 235B-A22B", QWEN3_235B, "fp8", 256, 8192, 1, 4096, 2, 8, 4, 1,
     {"ep": 32, **FOLDED, **SPLIT}, 1633, 242, ""),
    ("Bridge 25.11", "Qwen3 235B-A22B", QWEN3_235B, "fp8", 256, 2048, 1, 4096, 2, 8, 4, 1,
     {"ep": 32, **FOLDED, **SPLIT}, 1575, 233, ""),
    ("Zoo", "Qwen3 235B-A22B", QWEN3_235B, "bf16", 256, 2048, 1, 4096, 2, 8, 4, 1,
     {"ep": 32, "recompute": "selective", **ZOO, **DEEPEP, **SPLIT}, ZOO_STEP / 19.7, 245, "DeepEP"),
    ("Zoo", "Qwen3 235B-A22B", QWEN3_235B, "bf16", 256, 2048, 4, 4096, 2, 1, None, 3,
     {"ep": 8, "recompute": "full", **ZOO, **DEEPEP}, ZOO_STEP / 17.6, 276, "DeepEP"),
    ("Zoo", "Qwen3 235B-A22B", QWEN3_235B, "bf16", 256, 2048, 1, 4096, 2, 32, 3, 1,
     {"ep": 8, "recompute": "selective", **ZOO, **SPLIT}, ZOO_STEP / 24.2, 200, "all-to-all"),
    ("Zoo", "Qwen3 235B-A22B", QWEN3_235B, "bf16", 256, 2048, 1, 4096, 4, 8, 4, 1,
     {"ep": 8, "recompute": "none", **ZOO, **DEEPEP, **SPLIT}, ZOO_STEP / 29.0, 167, "DeepEP"),
]


# MT-NLG 530B and BLOOM 176B (module doc, 5). GPT blocks as Narayanan et al. 2021 ran them.
MT_NLG_530B = {"layers": 105, "hidden": 20480, "heads": 128, "kv_heads": 128, "ffn_hidden": 81920, "vocab": 50272,
               "mlp": "gelu", "tie_embeddings": True, "attention": "eager"}
BLOOM_176B = {"layers": 70, "hidden": 14336, "heads": 112, "kv_heads": 112, "ffn_hidden": 57344, "vocab": 250880,
              "mlp": "gelu", "tie_embeddings": True, "attention": "eager"}
MEGATRON_2021 = {"recompute": "full", "sequence_parallel": False, "dp_overlap": False, "tp_overlap": False,
                 "pp_schedule": "1f1b", "virtual_stages": 1}
OMNI_PATH = {"inter_gbs_per_gpu": 4 * 100 / 8 / 8}  # 4 x 100 Gb/s a node, over its 8 GPUs
# (source, model, shape, gpus, global batch, micro-batch or None, tp, pp, cluster keys, published s per iteration)
A100_ROWS = [
    ("MT-NLG", "530B", MT_NLG_530B, 2240, 1920, None, 8, 35, {}, 60.1),
    ("MT-NLG", "530B", MT_NLG_530B, 2800, 1920, None, 8, 35, {}, 50.2),
    ("MT-NLG", "530B", MT_NLG_530B, 3360, 1920, None, 8, 35, {}, 44.4),
    ("BLOOM", "176B", BLOOM_176B, 384, 2048, 2, 4, 12, OMNI_PATH, 104.70),
]


def predict(shape: dict, precision: str, gpus: int, gbs: int, mb: int | None, seq: int, tp: int, pp: int,
            cp: int, vp: int | None, zero: int, gpu: str = "h100-80gb", cluster: dict | None = None,
            **pinned) -> tuple:
    layout = {"tp": tp, "pp": pp, "cp": cp, "dp": gpus // (tp * pp * cp), "zero": zero, "dp_overlap": True,
              "tp_overlap": True}
    if mb is not None:
        layout["microbatch"] = mb
    if pp > 1:
        layout["pp_schedule"] = "interleaved-1f1b"
    if vp is not None and pp > 1:
        layout["virtual_stages"] = vp
    layout.update(pinned)
    run = run_from_dict({
        "model": {**shape, "seq_len": seq},
        "cluster": {"gpu": gpu, "gpus": gpus, "gpus_per_node": 8, **(cluster or {})},
        "layout": layout,
        "train": {"global_batch": gbs, "stack": "megatron", "precision": precision},
    })
    est = complete_layout(run)
    m = run.model
    tokens = run.global_batch * m.seq_len
    full = m.model_flops_per_token() * tokens / est.step_time_s / gpus / 1e12
    causal = (m.model_flops_per_token() - 1.5 * m.attn_flops_per_token()) * tokens / est.step_time_s / gpus / 1e12
    return est, full, causal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = []
    for source, model, shape, prec, gpus, gbs, mb, seq, tp, pp, cp, vp, zero, pub in ROWS:
        for pinned in ({}, {"recompute": "none"}):
            est, full, causal = predict(shape, prec, gpus, gbs, mb, seq, tp, pp, cp, vp, zero,
                                        **SOURCE_PINS.get(source, {}), **pinned)
            out.append({"source": source, "model": model, "precision": prec, "gpus": gpus, "seq_len": seq,
                        "recompute_pinned": bool(pinned), "layout": est.layout.short(), "published_tflops": pub,
                        "predicted_tflops": round(full, 1), "error_pct": round(100 * (full / pub - 1), 2),
                        "error_pct_causal_basis": round(100 * (causal / pub - 1), 2), "fits": est.fits,
                        "mem_gib": round(est.memory.total / 2**30, 1), "bubble": round(est.bubble_fraction, 3)})
    core = []
    for source, model, shape, prec, gpus, gbs, mb, seq, tp, pp, vp, zero, keys, pub_tok, pub_tflops, disp in CORE_ROWS:
        keys = dict(keys)
        est, _, causal = predict(shape, prec, gpus, gbs, mb, seq, tp, pp, keys.pop("cp", 1), vp, zero, **keys)
        tok = gbs * seq / est.step_time_s / gpus
        core.append({"source": source, "model": model, "moe": "experts" in shape, "precision": prec, "gpus": gpus,
                     "dispatcher": disp,
                    "layout": est.layout.short(), "published_tokens_per_s": round(pub_tok, 1),
                    "predicted_tokens_per_s": round(tok, 1), "error_pct": round(100 * (tok / pub_tok - 1), 2),
                    "published_tflops": pub_tflops, "predicted_tflops_causal": round(causal, 1),
                    "ep_exposed_s": round(est.comm_exposed_s.get("ep", 0.0), 2),
                    "step_s": round(est.step_time_s, 2), "fits": est.fits,
                    "mem_gib": round(est.memory.total / 2**30, 1)})
    a100 = []
    for source, model, shape, gpus, gbs, mb, tp, pp, cluster, pub_s in A100_ROWS:
        est, _, _ = predict(shape, "bf16", gpus, gbs, mb, 2048, tp, pp, 1, None, 1, gpu="a100-80gb",
                            cluster=cluster, **MEGATRON_2021)
        a100.append({"source": source, "model": model, "gpus": gpus, "layout": est.layout.short(),
                     "published_step_s": pub_s, "predicted_step_s": round(est.step_time_s, 2),
                     "error_pct": round(100 * (pub_s / est.step_time_s - 1), 2),
                     "bubble": round(est.bubble_fraction, 3),
                     "fits": est.fits, "mem_gib": round(est.memory.total / 2**30, 1)})
    if args.json:
        print(json.dumps(out + core + a100, indent=1))
        return 0
    w = f"<{max([56] + [len(r['layout']) + 2 for r in out])}"
    _print_table(out, [("source", "<7"), ("model", "<14"), ("precision", "<6", "prec"), ("gpus", ">6", "GPUs"),
                       ("seq_len", ">8", "seq"), "  ", ("layout", w, "layout (searched keys filled in)"),
                       ("published_tflops", ">6.0f", "pub"), ("predicted_tflops", ">8.1f", "pred"),
                       ("error_pct", ">+8.2f", "err%"), ("mem_gib", ">7.1f", "GiB"),
                       ("error_pct_causal_basis", ">+13.2f", "err% causal")])
    print("(each row twice: the planner's own choices, then recompute pinned to none whether or not it fits)")
    for source in ("Meta", "NeMo"):
        print(_error_summary(f"{source}, the planner's choices",
                             [r for r in out if r["source"] == source and not r["recompute_pinned"]]))
    print()
    w = f"<{max(len(r['layout']) for r in core) + 2}"
    _print_table([dict(r, dispatcher=r["dispatcher"] or "-") for r in core],
                 [("source", "<14"), ("model", "<17"), ("precision", "<6", "prec"), ("gpus", ">5", "GPUs"), "  ",
                  ("dispatcher", "<12"), ("layout", w), ("published_tokens_per_s", ">10.0f", "tok/s pub"),
                  ("predicted_tokens_per_s", ">8.0f", "pred"), ("error_pct", ">+8.2f", "err%"),
                  ("published_tflops", ">12.0f", "TFLOP/s pub"), ("predicted_tflops_causal", ">7.0f", "pred"),
                  ("ep_exposed_s", ">7.2f", "EP s"), ("mem_gib", ">7.1f", "GiB")])
    print("(tokens/s per GPU; TFLOP/s on the sources' basis, causal attention as half; EP s: the all-to-all exposed a "
          "step)")
    groups = {"Megatron-Bridge, dense": [r for r in core if not r["moe"]],
              "MoE, Qwen3 235B-A22B": [r for r in core if "235B" in r["model"]],
              "MoE, Qwen3 30B-A3B": [r for r in core if "30B" in r["model"]]}
    for name, rows in groups.items():
        print(_error_summary(name, rows))
    print()
    w = f"<{max(len(r['layout']) for r in a100) + 2}"
    _print_table(a100, [("source", "<8"), ("model", "<7"), ("gpus", ">6", "GPUs"), "  ",
                        ("layout", w, "layout (searched keys filled in)"), ("published_step_s", ">11.1f", "s/iter pub"),
                        ("predicted_step_s", ">8.1f", "pred"), ("error_pct", ">+17.2f", "err% (tokens/s)"),
                        ("bubble", ">8.3f"), ("mem_gib", ">7.1f", "GiB")])
    print(_error_summary("Megatron-DeepSpeed on A100s", a100))
    return 0


def _print_table(rows: list[dict], columns: list) -> None:
    """One header line and a line per row: each column is (key, format spec, title; the key when left out),
    a string is printed as it stands, and a row that does not fit says so at its end."""
    def line(cell) -> str:
        return "".join(c if isinstance(c, str) else cell(*c) for c in columns)

    def header(key, spec, title=None) -> str:  # a value's spec less its sign and precision: "<7", ">8"
        return f"{title or key:{spec.split('.')[0].replace('+', '')}}"

    print(line(header))
    for r in rows:
        print(line(lambda key, spec, title=None: f"{r[key]:{spec}}") + ("" if r["fits"] else "  (does not fit)"))


def _error_summary(name: str, rows: list[dict]) -> str:
    errs = [abs(r["error_pct"]) for r in rows]
    return f"{name}: mean abs error {sum(errs) / len(errs):.2f}%   max abs error {max(errs):.2f}%"


if __name__ == "__main__":
    raise SystemExit(main())
