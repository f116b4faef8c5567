"""Planner: memory formulas against hand-computed cases, time model pieces, search, CLI, config export."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pytest
from helpers import load_benchmark

from apogee.planner.cli import register
from apogee.planner.cluster import get_accelerator
from apogee.planner.errors import PlannerError
from apogee.planner.estimate import estimate
from apogee.planner.memory import activation_bytes_per_layer, zero_model_state_bytes
from apogee.planner.schedule import bubble_fraction
from apogee.planner.search import plan_layout, search
from apogee.planner.spec import Layout, ModelShape, RunSpec, run_from_dict

ROOT = Path(__file__).resolve().parents[2]


def _cli(*argv: str) -> int:
    ap = argparse.ArgumentParser(prog="apogee")
    register(ap.add_subparsers(required=True))
    args = ap.parse_args(list(argv))
    return args.func(args)


def gpt(L, h, a, v=51200, s=2048) -> ModelShape:
    return ModelShape(layers=L, hidden=h, heads=a, kv_heads=a, ffn_hidden=4 * h, vocab=v, seq_len=s,
                      mlp="gelu", attention="eager", tie_embeddings=True)


# -- memory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_7_5b_on_64(stage, gb):
    assert round(zero_model_state_bytes(7.5e9, 64, stage) / 1e9, 1) == gb


def test_fsdp_gradient_accumulation_holds_whole_fp32_gradients_until_the_reduce_scatter():
    """With parallel.grad_reduce = "step" apogee turns FSDP2's gradient sync off for all but the last
    micro-batch, and FSDP2 then keeps every unit's gradient unsharded in its fp32 reduce dtype: with more
    than one micro-batch the rank holds 4 bytes per parameter of its stages, whole; with one, the sharded
    gradient. Megatron's distributed optimizer keeps its own count. The two unsharded layers in flight
    are in FSDP2's param_dtype."""
    import dataclasses

    from apogee.planner.cluster import Cluster
    from apogee.planner.memory import memory_per_gpu, stage_params
    from apogee.planner.spec import shape_from_flavor

    m = shape_from_flavor("llama3-8b")
    cl = Cluster(accel=get_accelerator("h100-80gb"), gpus=8, gpus_per_node=8)
    lay = Layout(tp=1, dp=8, microbatch=1, zero=3, dp_overlap=False, grad_reduce="step")
    params = sum(stage_params(m, lay))
    one = memory_per_gpu(m, lay, cl, global_batch=8, precision="bf16")
    four = memory_per_gpu(m, lay, cl, global_batch=32, precision="bf16")
    assert four.grads == pytest.approx(4 * params)  # whole and fp32: 32 GB for Llama 3 8B on each rank
    assert one.grads == pytest.approx(2 * params / 8)  # sharded, bf16
    # parallel.grad_reduce = "micro_batch" (the engine's default) reduce-scatters every micro-batch: sharded.
    each = memory_per_gpu(m, dataclasses.replace(lay, grad_reduce="micro_batch"), cl, global_batch=32)
    assert each.grads == pytest.approx(one.grads)
    megatron = memory_per_gpu(m, lay, cl, global_batch=32, precision="bf16", stack="megatron")
    assert megatron.grads == pytest.approx(one.grads)
    fp32 = memory_per_gpu(m, lay, cl, global_batch=8, precision="fp32")
    per_layer = params / m.layers
    assert fp32.buffers - one.buffers == pytest.approx(2 * (4 - 2) * per_layer)


def test_gpt_param_count_is_narayanan_eq2():
    m = gpt(128, 25600, 160)
    L, h, v, s = 128, 25600, 51200, 2048
    eq2 = 12 * L * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * L * h))
    assert abs(m.num_params() - eq2) / eq2 < 1e-5  # only the final LayerNorm differs
    assert round(m.num_params() / 1e9, 1) == 1008.0


def test_llama_param_count_matches_flavor():
    from apogee.models.flavors import get_flavor
    from apogee.planner.spec import shape_from_flavor

    assert shape_from_flavor("llama3-8b").num_params() == get_flavor("llama3-8b").num_params()


def test_korthikanti_table2_activations():
    m = gpt(1, 4096, 32)
    s, b, h, a = 2048, 1, 4096, 32
    sbh = s * b * h
    t = 8
    act = lambda **k: activation_bytes_per_layer(m, Layout(**k), micro_tokens=s * b)
    assert act() == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert act(tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert act(tp=t, sequence_parallel=True) == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
    assert act(tp=t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert act(tp=t, sequence_parallel=True, recompute="selective") == pytest.approx(34 * sbh / t)
    assert act(tp=t, recompute="full") == pytest.approx(2 * sbh)


# -- time model -----------------------------------------------------------------------------------
def test_bubble_fractions_narayanan():
    assert bubble_fraction("1f1b", 8, 1, 64) == pytest.approx(7 / 64)
    assert bubble_fraction("gpipe", 8, 1, 64) == pytest.approx(7 / 64)
    assert bubble_fraction("interleaved-1f1b", 8, 4, 64) == pytest.approx(7 / 256)
    assert bubble_fraction("1f1b", 1, 1, 64) == 0.0


def _run(flavor="llama3-8b", gpu="h100-80gb", gpus=64, gb=256, **layout) -> RunSpec:
    return run_from_dict({"model": {"flavor": flavor}, "cluster": {"gpu": gpu, "gpus": gpus},
                          "layout": layout, "train": {"global_batch": gb}})


def test_interleaving_and_recompute_move_step_time_the_right_way():
    base = dict(tp=8, pp=4, dp=2, microbatch=1, sequence_parallel=True, zero=3)
    run = _run("llama3-70b", gpus=64, gb=64, **base)
    plain = estimate(run, Layout(**base, pp_schedule="1f1b"))
    inter = estimate(run, Layout(**base, pp_schedule="interleaved-1f1b", virtual_stages=4))
    full = estimate(run, Layout(**base, pp_schedule="1f1b", recompute="full"))
    assert inter.step_time_s < plain.step_time_s
    assert plain.bubble_fraction == pytest.approx(3 / 32)
    assert full.step_time_s > plain.step_time_s
    assert full.memory.activations < plain.memory.activations
    assert full.hardware_tflops_per_gpu > full.model_tflops_per_gpu  # recompute counted as hardware FLOPs
    # MFU basis: model FLOPs / peak
    assert plain.mfu == pytest.approx(plain.model_tflops_per_gpu / 989.0)


def test_stack_and_compile_price_the_software_that_runs():
    """stack = "apogee" prices the engine's eager block (more memory-bound time than the fused count)
    unless layout.compile; stack = "megatron" the fused count at the calibrated in-stack GEMM efficiency;
    compile reaches the engine config; a bad stack is one line naming the key."""
    from apogee.planner.export import layout_to_config

    lay = dict(tp=1, pp=1, dp=8, microbatch=2, zero=3)
    eager = estimate(_run("llama-1b", gpus=8, gb=16, **lay), Layout(**lay))
    compiled = estimate(_run("llama-1b", gpus=8, gb=16, **lay, compile=True), Layout(**lay, compile=True))
    assert compiled.step_time_s < eager.step_time_s
    mega_run = run_from_dict({"model": {"flavor": "llama-1b"}, "cluster": {"gpu": "h100-80gb", "gpus": 8},
                              "layout": lay, "train": {"global_batch": 16, "stack": "megatron"}})
    mega = estimate(mega_run, Layout(**lay))
    # Both fused, but Megatron's in-stack GEMM efficiency (0.516) is below cuBLAS's measured 0.695.
    assert mega.step_time_s > compiled.step_time_s
    assert "compiled" in Layout(**lay, compile=True).short()
    assert layout_to_config(mega_run, Layout(**lay, compile=True))["train"]["compile"] is True
    assert "compile" not in layout_to_config(mega_run, Layout(**lay))["train"]
    with pytest.raises(PlannerError, match="train.stack"):
        run_from_dict({"model": {"flavor": "llama-1b"}, "cluster": {"gpu": "h100-80gb", "gpus": 8},
                       "train": {"stack": "nemo"}})
    with pytest.raises(PlannerError, match="layout.compile"):
        _run("llama-1b", gpus=8, compile="yes")


def test_megatron_llama_block_memory_by_hand():
    """stack = "megatron" prices a Llama block as Megatron-LM keeps it (Korthikanti's accounting with
    RMSNorm, GQA flash attention and SwiGLU): llama3-405b, tp 8, seq 8192, one sequence, bf16."""
    from apogee.planner.memory import megatron_llama_activation_bytes
    from apogee.planner.spec import shape_from_flavor

    m = shape_from_flavor("llama3-405b")
    sbh = 8192 * 16384
    sharded = 2 + 4 * 8 / 128 + 2 + 4 * 128 / 16384 + 6 * 53248 / 16384  # q, k/v, out, fp32 lse, SwiGLU
    sp = Layout(tp=8, sequence_parallel=True)
    assert megatron_llama_activation_bytes(m, sp, micro_tokens=8192) == pytest.approx(sbh * (8 + sharded) / 8)
    no_sp = megatron_llama_activation_bytes(m, Layout(tp=8), micro_tokens=8192)
    assert no_sp == pytest.approx(sbh * (8 + sharded / 8))
    assert megatron_llama_activation_bytes(m, Layout(tp=8, sequence_parallel=True, recompute="full"),
                                           micro_tokens=8192) == pytest.approx(2 * sbh / 8)
    # apogee's own block keeps the gathered norm outputs under SP: over twice Megatron's.
    lay = Layout(tp=8, pp=16, dp=64, microbatch=1, virtual_stages=7, pp_schedule="interleaved-1f1b",
                 sequence_parallel=True, zero=2)
    run = {"model": {"flavor": "llama3-405b"}, "cluster": {"gpu": "h100-80gb", "gpus": 8192},
           "train": {"global_batch": 2048}}
    mega = estimate(run_from_dict({**run, "train": {"global_batch": 2048, "stack": "megatron"}}), lay).memory
    own = estimate(run_from_dict(run), lay).memory
    assert 2 * mega.activations < own.activations
    # Megatron's ZeRO-2 keeps whole bf16 weights; apogee's zero 2 keeps the same gathered ones beside its
    # fp32 shards (counted as 2 bytes over the 64 data ranks here, the other 2 with the optimizer).
    assert own.params == pytest.approx(mega.params * (1 + 1 / 64), rel=1e-12)


def test_young_daly_interval():
    run = _run(gpus=64)
    e = estimate(run, Layout(tp=1, pp=1, dp=64, microbatch=1, zero=3))
    delta = 14.0 * run.model.num_params() / (run.cluster.checkpoint_write_gbs * 1e9)
    mtbf = run.cluster.node_mtbf_hours * 3600 / 8
    assert e.checkpoint_write_s == pytest.approx(delta)
    assert e.checkpoint_interval_s == pytest.approx(math.sqrt(2 * delta * mtbf) - delta)
    assert 0.9 < e.goodput < 1.0


def test_energy_per_token_is_the_cluster_at_tdp_over_the_tokens():
    lay = Layout(tp=1, pp=1, dp=64, microbatch=1, zero=3)
    e = estimate(_run(gpus=64), lay)
    tokens = 256 * 8192  # llama3-8b: global batch 256 x seq 8192
    assert e.power_kw == pytest.approx(64 * 0.700)  # h100-80gb: 700 W TDP, no node power, PUE 1
    assert e.energy_j_per_token == pytest.approx(64 * 700 * e.step_time_s / tokens)
    assert e.energy_j_per_useful_token == pytest.approx(e.energy_j_per_token / e.goodput)
    # 8 nodes of 4.6 kW besides their GPUs (a DGX H100's 10.2 kW less 8 x 700 W), in a PUE 1.2 hall
    run = run_from_dict({"model": {"flavor": "llama3-8b"}, "train": {"global_batch": 256},
                         "cluster": {"gpu": "h100-80gb", "gpus": 64, "node_power_w": 4600, "pue": 1.2}})
    facility = estimate(run, lay)
    assert facility.step_time_s == e.step_time_s
    assert facility.power_kw == pytest.approx((64 * 0.700 + 8 * 4.6) * 1.2)
    assert facility.energy_j_per_token == pytest.approx(e.energy_j_per_token * facility.power_kw / e.power_kw)
    for bad, key in (({"pue": 0.9}, "cluster.pue"), ({"node_power_w": -1}, "cluster.node_power_w")):
        with pytest.raises(PlannerError, match=key):
            run_from_dict({"model": {"flavor": "llama3-8b"}, "cluster": {"gpu": "h100-80gb", "gpus": 64, **bad}})


# -- search ---------------------------------------------------------------------------------------
def test_search_1t_on_3072_finds_a_fitting_layout():
    run = run_from_dict({"model": {"flavor": "dense-1t"}, "cluster": {"gpu": "a100-80gb", "gpus": 3072}})
    res = search(run, top=5)
    assert res.ranked and all(e.fits for e in res.ranked)
    best = res.ranked[0]
    assert best.layout.world == 3072 and best.memory.total <= 80 * 2**30
    assert best.layout.pp > 1 and best.layout.tp > 1  # 1T does not fit without model parallelism
    assert [e.step_time_s for e in res.ranked] == sorted(e.step_time_s for e in res.ranked)


def test_pinned_keys_are_respected_and_unfit_is_reported():
    e = plan_layout(_run(gpus=64, tp=2, pp=2))
    assert (e.layout.tp, e.layout.pp, e.layout.dp) == (2, 2, 16)
    with pytest.raises(PlannerError, match="no layout fits"):
        plan_layout(_run("llama3-405b", gpus=8, gb=8))


def test_bad_inputs_name_the_key():
    with pytest.raises(PlannerError, match="cluster.gpu"):
        _run(gpu="tpu-v9")
    with pytest.raises(PlannerError, match="layout.recompute"):
        _run(recompute="sometimes")
    with pytest.raises(PlannerError, match="model.flavor"):
        _run(flavor="nope")
    with pytest.raises(PlannerError, match=r"layout tp\*pp\*dp\*cp = 192"):
        estimate(_run(gpus=64), Layout(tp=3, dp=64))
    with pytest.raises(PlannerError, match="layout.tp=3 must divide model.heads"):
        estimate(_run(gpus=192), Layout(tp=3, dp=64))
    # A search with no valid candidate says why: the batch the data ranks cannot split, or a pinned dp.
    with pytest.raises(PlannerError, match=r"train.global_batch=64 is not divisible by dp=3"):
        plan_layout(_run(gpus=3, gb=64, tp=1, pp=1, cp=1))
    with pytest.raises(PlannerError, match=r"layout.dp=3 but cluster.gpus / \(tp x pp x cp\) = 16"):
        plan_layout(_run(gpus=16, dp=3, tp=1, pp=1, cp=1))


# -- CLI ------------------------------------------------------------------------------------------
def test_simulate_json_keys(capsys):
    assert _cli("simulate", "--flavor", "llama3-8b", "--gpus", "64", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("step_time_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu",
              "memory_gib_per_gpu", "fits", "checkpoint_interval_s", "goodput", "power_kw", "energy_j_per_token",
              "energy_j_per_useful_token"):
        assert k in out
    assert out["fits"] and 0 < out["mfu"] < 1
    assert set(out["memory_gib_per_gpu"]) >= {"params", "grads", "optimizer", "activations", "buffers"}


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "run.toml"
    bad.write_text('[model]\nflavor = "llama3-8b"\n[cluster]\ngpu = "h100-80gb"\ngpus = 64\n[layout]\nzero = 7\n')
    assert _cli("plan", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layout.zero" in err
    assert _cli("plan", str(tmp_path / "missing.toml")) == 2


def test_plan_prints_table_and_writes_config(tmp_path, capsys):
    out = tmp_path / "cfg.toml"
    assert _cli("plan", "--flavor", "llama3-8b", "--gpus", "16", "--top", "3", "--write-config", str(out)) == 0
    text = capsys.readouterr().out
    assert "placement:" in text and "why #1" in text
    import tomllib

    cfg = tomllib.loads(out.read_text())
    p = cfg["parallel"]
    assert cfg["model"]["flavor"] == "llama3-8b"
    assert p["dp_replicate"] * p["dp_shard"] * p["tp"] * p["pp"] * p["cp"] == 16
    assert p.get("recompute", "none") in ("none", "selective", "full") and isinstance(p["sequence_parallel"], bool)
    assert cfg["train"]["global_batch"] % cfg["train"]["micro_batch"] == 0


@pytest.mark.parametrize("flavor,gpus,gb", [("debug", 4, 16), ("tiny", 8, 32)])
def test_written_configs_load_in_the_engine(tmp_path, flavor, gpus, gb):
    """The search never proposes a layout the engine's validation rejects: every top plan, written
    with --write-config, loads with apogee.config.load_config."""
    from apogee.config import load_config
    from apogee.planner.export import write_config

    run = run_from_dict({"model": {"flavor": flavor, "seq_len": 256}, "cluster": {"gpu": "cpu", "gpus": gpus},
                         "train": {"global_batch": gb}})
    res = search(run, top=8)
    assert res.ranked
    for i, e in enumerate(res.ranked):
        cfg = load_config(write_config(run, e.layout, tmp_path / f"{i}.toml"))
        assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp) == (e.layout.tp, e.layout.pp, e.layout.cp)
        assert cfg.train.micro_batch == e.layout.microbatch
        sharded, replicas = e.layout.zero >= 2, e.layout.dp_replicate
        assert (cfg.parallel.dp_shard, cfg.parallel.dp_replicate) == (
            (e.layout.dp // replicas, replicas) if sharded else (1, e.layout.dp))


def test_engine_rejections_are_filtered_not_hidden():
    from apogee.planner.export import engine_rejection

    run = run_from_dict({"model": {"flavor": "llama-1b", "seq_len": 256}, "cluster": {"gpu": "cpu", "gpus": 4},
                         "train": {"global_batch": 16}})
    # llama-1b ties its embeddings, which the engine's V-shaped pipeline schedules do not support.
    assert "tie" in engine_rejection(run, Layout(tp=1, dp=2, pp=2, microbatch=4, zero=3, pp_schedule="zbv", virtual_stages=2))
    assert engine_rejection(run, Layout(tp=1, dp=2, pp=2, microbatch=4, zero=3)) is None
    assert engine_rejection(run, Layout(tp=2, dp=2, microbatch=4, zero=3, sequence_parallel=True)) is None
    ranked = search(run, top=8).ranked
    assert ranked and all(engine_rejection(run, e.layout) is None for e in ranked)


# -- accuracy -------------------------------------------------------------------------------------
def test_published_runs_accuracy(capsys):
    mod = load_benchmark("planner_accuracy")
    if not mod.DEFAULT_CSV.exists():
        pytest.skip(f"{mod.DEFAULT_CSV} not present")
    assert mod.main(["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["rows"] == 19
    assert summary["mae_pct_a100-80gb"] <= 5.0
    # The target (MAE <= 5%, max <= 10%), met since the stack speed applies to every kernel
    # (docs/planner.md: all 3.15% / 7.85%, H100 3.58%).
    assert summary["mae_pct"] <= 5.0 and summary["max_abs_pct"] <= 10.0
    assert summary["mae_pct_h100-80gb"] <= 5.0


def test_heldout_published_runs(capsys):
    """Published H100 and A100 runs never used for calibration (benchmarks/planner_heldout.py; in-repo data, so
    never skipped). Recorded figures (docs/planner.md, "Held out"), guarding against regressions. Meta's
    Llama 3 405B with its published pipeline split (Megatron's embedding- and loss-aware split): no
    recompute fits and is chosen, +5.8% and +6.7% on the 8K rows; the 128K one, with its all-gather context
    parallelism, +16.4% (a known miss).
    NeMo 24.12's FP8 rows: all seven within 6%."""
    mod = load_benchmark("planner_heldout")
    assert mod.main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    core = [r for r in rows if "predicted_tokens_per_s" in r]
    a100 = [r for r in rows if "published_step_s" in r]
    rows = [r for r in rows if "predicted_tokens_per_s" not in r and "published_step_s" not in r]
    meta = [r for r in rows if r["source"] == "Meta"]
    nemo = [r for r in rows if r["source"] == "NeMo" and not r["recompute_pinned"]]
    assert len(meta) == 6 and len(nemo) == 7
    assert all(r["layout"].startswith("tp8 pp16") and "split:embedding_loss" in r["layout"] for r in meta)
    chosen = meta[0::2]
    assert all("rc:none" in r["layout"] and r["fits"] for r in chosen)  # the split leaves room for it
    assert all(4.0 <= r["error_pct"] <= 8.0 for r in chosen[:2])  # 8K: +5.8%, +6.7%
    assert 14.0 <= chosen[2]["error_pct"] <= 19.0  # 128K, cp16: +16.4%, attention 57% of the FLOPs
    assert all(r["fits"] and abs(r["error_pct"]) <= 6.0 for r in nemo)
    assert sum(abs(r["error_pct"]) for r in nemo) / len(nemo) <= 4.5
    # GPT-3 175B: micro-batch 2 (512 GPUs) above micro-batch 1 (128 GPUs), as published (by 5% of the 15%).
    gpt3 = nemo[5:]
    assert gpt3[1]["predicted_tflops"] > 1.04 * gpt3[0]["predicted_tflops"]
    _check_heldout_core(core)
    # Megatron-DeepSpeed on A100s, per iteration: the planner runs fast, MT-NLG 530B by +14.1 / +15.5 /
    # +18.9% (280 / 350 / 420 nodes, a near-constant 7.0-7.5 s an iteration short) and BLOOM 176B by +7.0%.
    assert [r["model"] for r in a100] == ["530B"] * 3 + ["176B"] and all(r["fits"] for r in a100)
    assert all("1f1b rc:full z1" in r["layout"] and "mb1" in r["layout"] for r in a100[:3])  # mb searched
    assert [round(r["bubble"], 3) for r in a100[:3]] == [0.142, 0.177, 0.212]  # (35 - 1) / 240, 192, 160
    assert 12.0 <= a100[0]["error_pct"] <= 16.0 and 17.0 <= a100[2]["error_pct"] <= 21.0
    assert 5.0 <= a100[3]["error_pct"] <= 9.0
    assert all(6.5 <= r["published_step_s"] - r["predicted_step_s"] <= 8.0 for r in a100[:3])


def _check_heldout_core(core: list[dict]) -> None:
    """Megatron-Core runs on H100s compared on tokens/s per GPU (docs/planner.md, "Held out: mixture of experts"):
    Megatron-Bridge's dense FP8 Llama rows, its FP8 Qwen3 MoE rows and the MoE model zoo's BF16 table. Known
    misses are pinned as such."""
    assert len(core) == 13 and all(r["fits"] for r in core)
    dense, moe = [r for r in core if not r["moe"]], [r for r in core if r["moe"]]
    # Bridge's Llama 3 70B (26.02, 25.11), 3.1 405B (26.02, 25.11) and 8B under FSDP: -4.9, +3.3, -9.9, -4.8, +5.3%.
    err = [r["error_pct"] for r in dense]
    assert all(abs(e) <= 10.0 for e in err) and sum(map(abs, err)) / len(err) <= 6.0
    assert -6.0 <= err[0] <= -3.5 and 2.0 <= err[1] <= 4.5 and -10.0 <= err[2] <= -8.5
    for r in core:  # the sources' basis (causal attention as half) reproduces their TFLOP/s from their tokens/s
        assert r["predicted_tflops_causal"] / r["predicted_tokens_per_s"] == pytest.approx(
            r["published_tflops"] / r["published_tokens_per_s"], rel=0.015)
    err = [r["error_pct"] for r in moe]
    assert all("etp1" in r["layout"] for r in moe[2:])  # experts whole, folded over the tensor ranks
    assert all(-10.0 <= e <= -5.0 for e in err[2:4])  # Bridge's 235B, EP 32 across 4 nodes: -9.2, -6.8%
    # The zoo's: DeepEP across 4 nodes -6.3% (-29.7% pricing every copy on the NIC), FSDP -8.7%, its
    # all-to-all within a node +6.0%, DeepEP within a node +10.7%.
    assert -8.0 <= err[4] <= -4.0 and -10.0 <= err[5] <= -7.0 and 4.0 <= err[6] <= 8.0 and 9.0 <= err[7] <= 12.5
    assert "deepep" in moe[4]["layout"] and "deepep" not in moe[6]["layout"]
    # A known miss: Qwen3 30B-A3B's small dropless experts run 2.5x slower than their device work (+161, +152%).
    assert all(140.0 <= e <= 170.0 for e in err[:2])


def test_gpu_layer_shapes_covers_each_h100_row_at_its_shard(tmp_path, capsys):
    """benchmarks/gpu_layer_shapes.py: every published H100 row at its own tp, then NeMo's GPT-3 175B at
    tp 4; its predictions are the planner's layer_parts and its FLOPs Megatron's per-layer count (the
    --shrink dry run on CPU, no timing asserted)."""
    from apogee.planner.compute import layer_parts

    mod = load_benchmark("gpu_layer_shapes")
    if mod.DEFAULT_CSV.exists():
        got = [(name, m.hidden, tp) for name, m, tp in mod.shapes(mod.DEFAULT_CSV, "h100-80gb")]
        assert got[0] == ("GPT 1.7B", 2048, 1) and got[-2] == ("GPT 462B", 18432, 8)
        assert got[-1] == ("NeMo GPT-3 175B", 12288, 4) and len(got) == 10
    out = tmp_path / "layers.json"
    assert mod.main(["--shrink", "--reps", "1", "--mb", "1,2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["mb"] for r in rows] == [1, 2]
    for r in rows:
        parts = layer_parts(mod.SHRUNK, 2, 1, 1, r["mb"], True, "none", get_accelerator("h100-80gb"), "bf16")
        assert r["pred_layer_s"] == pytest.approx(parts.forward + parts.backward)
        assert r["pred_matmul_s"] == pytest.approx(parts.gemm_f + parts.gemm_b + parts.attn_f + parts.attn_b)
    # Megatron's model FLOPs of one layer, forward + backward, at f = 4h: 72 b s h^2 (1 + s / 6h) / tp.
    h, s_, tokens = mod.GPT3_175B.hidden, mod.GPT3_175B.seq_len, 2 * mod.GPT3_175B.seq_len
    assert mod.model_flops(mod.GPT3_175B, 4, 2) == pytest.approx(72 * tokens * h * h * (1 + s_ / (6 * h)) / 4)


def test_published_rows_embedding_tying_matches_their_parameter_counts():
    """The benchmark reads Narayanan 2021's models as tied and the README's H100 models as untied:
    each row's published (rounded) parameter count must be nearer to that reading than to the other,
    and within 3.5% of it."""
    mod = load_benchmark("planner_accuracy")
    if not mod.DEFAULT_CSV.exists():
        pytest.skip(f"{mod.DEFAULT_CSV} not present")
    import csv
    import dataclasses

    for row in csv.DictReader(open(mod.DEFAULT_CSV)):
        run, _, _ = mod.row_to_run(row)
        pub = float(row["params_b"]) * 1e9
        other = dataclasses.replace(run.model, tie_embeddings=not run.model.tie_embeddings)
        assert abs(run.model.num_params() - pub) / pub < 0.035, row["model"]
        assert abs(run.model.num_params() - pub) < abs(other.num_params() - pub), row["model"]


# -- memory-bound work and per-accelerator calibration ----------------------------------------------
def test_elementwise_bytes_hand_count():
    from apogee.planner.compute import elementwise_bytes

    h = 2048
    m = gpt(24, h, 16, v=131072, s=4096)
    m = ModelShape(**{**m.__dict__, "attention": "flash"})
    f, b = elementwise_bytes(m, 1, 1, 1, False)
    s = 4096
    # GPT block, tp=1 (compute.py's table): forward 22h + 4f, backward 38h + 6f + 2(h + 2h); f = 4h.
    assert f == pytest.approx(s * (22 * h + 16 * h))
    assert b == pytest.approx(s * (38 * h + 24 * h + 6 * h))
    # Sequence parallel splits the replicated region; the sharded region is 1/tp either way.
    f4, _ = elementwise_bytes(m, 4, 1, 1, True)
    assert f4 == pytest.approx(f / 4)


def test_hopper_variants_share_the_h100_stack_calibration():

    ref = get_accelerator("h100-80gb").gemm_eff
    assert ref < 0.6  # the training stack's figure, not the raw 8192^3 matmul (0.807)
    for name in ("h100-96gb", "h200", "h800"):
        assert get_accelerator(name).gemm_eff == ref


def test_host_op_counts_match_the_engine_model():
    """planner/host.py prices the engine's Llama block by its op counts: re-count them from the model
    (forward torch calls under a TorchFunctionMode, backward autograd nodes by walking the graph) for
    one and two blocks, so a change to apogee.models.llama cannot leave the planner's counts stale."""
    import dataclasses

    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from apogee.models.flavors import FLAVORS
    from apogee.models.llama import Transformer
    from apogee.planner import host

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for layers in (1, 2):
        model = Transformer(dataclasses.replace(FLAVORS["tiny"], n_layers=layers).with_vocab(64))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        x = torch.randint(0, 64, (1, 16))
        mode = Count()
        with mode:
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten(0, 1))
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and node not in seen:
                seen.add(node)
                todo.extend(f for f, _ in node.next_functions)
        counts.append((mode.calls, len(seen)))
    (c1, n1), (c2, n2) = counts
    assert (c2 - c1, n2 - n1) == (host.BLOCK_CALLS, host.BLOCK_NODES)
    assert (c1 - host.BLOCK_CALLS, n1 - host.BLOCK_NODES) == (host.HEAD_CALLS, host.HEAD_NODES)


def test_cpu_measured_block_elementwise_and_contention_replace_the_formulas():
    """A measured elem_table entry (one block's norms, rotary, SwiGLU product, residuals, forward +
    backward) replaces the byte-count price of those ops, split 1:2 between forward and backward, at
    its own shape only; a measured contention replaces the cores formula for multi-rank nodes only."""
    import dataclasses

    from apogee.planner.compute import elem_key, layer_times
    from apogee.planner.host import oversubscription
    from apogee.planner.spec import shape_from_args
    from apogee.models.flavors import FLAVORS

    cpu = get_accelerator("cpu")
    m = shape_from_args(FLAVORS["debug"], flavor="debug", seq_len=256, vocab=256)
    key = elem_key(m, 1, 1, 4, False)
    assert key == (4, 256, 256, 256, 8, 4, 32, 768)
    assert elem_key(m, 2, 1, 4, True) == (4, 128, 256, 256, 4, 2, 32, 384)  # norms on seq/tp tokens
    measured = dataclasses.replace(cpu, elem_table={key: 0.012})
    f0, b0 = layer_times(m, 1, 1, 1, 4, False, "none", cpu, "fp32")
    f1, b1 = layer_times(m, 1, 1, 1, 4, False, "none", measured, "fp32")
    from apogee.planner.compute import elementwise_bytes, hbm_bytes_per_s
    ef, eb = elementwise_bytes(m, 1, 1, 4, False)
    bw = hbm_bytes_per_s(cpu)
    assert f1 - f0 == pytest.approx(0.004 - 2 * ef / bw)
    assert b1 - b0 == pytest.approx(0.008 - 2 * eb / bw)
    # Another shape (micro-batch 2) keeps the byte model.
    assert layer_times(m, 1, 1, 1, 2, False, "none", measured, "fp32") == layer_times(m, 1, 1, 1, 2, False, "none", cpu, "fp32")
    assert oversubscription(cpu, 4) == 2.0 and oversubscription(cpu, 2) == 1.0  # 2 cores: x2 for 4 ranks
    contended = dataclasses.replace(cpu, contention=1.6)
    assert oversubscription(contended, 2) == 1.6 and oversubscription(contended, 1) == 1.0


def test_ranks_sharing_cores_charge_contention_to_the_pipelines_work_not_its_bubble():
    """On a host-bound node whose ranks share the cores (measured contention 2), a pipeline rank waiting
    in the bubble leaves its core to the others: the step is the larger of the schedule at the
    uncontended rate and the node's whole work at the contended rate over its ranks. pp=2 with two
    micro-batches: 3 units of work uncontended, 2 x 2 contended per rank -> 4/3 of the uncontended
    step, not 2x; without a pipeline every rank computes all the time and contention stays 2x."""
    import dataclasses

    from apogee.models.flavors import FLAVORS
    from apogee.planner.cluster import Cluster
    from apogee.planner.spec import shape_from_args

    m = shape_from_args(FLAVORS["debug"], flavor="debug", seq_len=2048, vocab=256)
    cpu = get_accelerator("cpu")

    def step(contention, lay, gpus):
        acc = dataclasses.replace(cpu, contention=contention)
        run = RunSpec(model=m, cluster=Cluster(accel=acc, gpus=gpus, gpus_per_node=gpus), fixed={},
                      global_batch=2, precision="fp32")
        return estimate(run, lay).step_time_s

    pipe = Layout(pp=2, microbatch=1, zero=0, dp_overlap=False, pp_schedule="1f1b")
    assert step(2.0, pipe, 2) / step(1.0, pipe, 2) == pytest.approx(4 / 3, rel=0.03)
    flat = Layout(dp=2, microbatch=1, zero=0, dp_overlap=False)
    assert step(2.0, flat, 2) / step(1.0, flat, 2) == pytest.approx(2.0, rel=0.03)


def test_cpu_measured_host_replica_replaces_the_count_model():
    """A measured host table entry (benchmarks/planner_vs_measured.py's replica of the layout at the
    run's parameter sizes and a few tokens) replaces the count model for its layout and model only: each
    micro-batch pays layers x per-block + rest on top of the shared compute, the step's gradient
    reduction is the measured sync part, the optimizer step the measured clipping/AdamW time (no byte
    model beside it), and TP traffic keeps only its bandwidth term (its latency is in the measurement)."""
    import dataclasses

    from apogee.models.flavors import FLAVORS
    from apogee.planner.cluster import Cluster
    from apogee.planner.host import host_key
    from apogee.planner.spec import shape_from_args

    cpu = dataclasses.replace(get_accelerator("cpu"), contention=1.5)
    m = shape_from_args(FLAVORS["tiny"], flavor="tiny", seq_len=128, vocab=256)
    lay = Layout(tp=2, dp=2, microbatch=4, zero=3, sequence_parallel=True, dp_overlap=False, grad_reduce="step")
    n_micro, layers = 16 // (2 * 4), m.layers

    def est(table, model=m):
        acc = dataclasses.replace(cpu, host_table=table)
        run = RunSpec(model=model, cluster=Cluster(accel=acc, gpus=4, gpus_per_node=4), fixed={}, global_batch=16,
                      precision="fp32")
        return estimate(run, lay)

    key = host_key(m, lay, fsdp=True)
    base = {"micro_batch": (0.010, 0.004), "sync": (0.005, 0.001), "step": (0.001, 0.002)}
    a = est({key: base})
    b = est({key: {**base, "micro_batch": (0.012, 0.004)}})
    c = est({key: {**base, "step": (0.003, 0.002)}})
    d = est({key: {**base, "sync": (0.006, 0.003)}})
    assert b.step_time_s - a.step_time_s == pytest.approx(n_micro * layers * 0.002)
    assert c.step_time_s - a.step_time_s == pytest.approx(layers * 0.002)
    assert d.step_time_s - a.step_time_s == pytest.approx(layers * 0.001 + 0.002)
    assert a.comm_exposed_s["dp"] == pytest.approx(layers * 0.005 + 0.001)
    # Reducing every micro-batch (the engine's default): each micro-batch pays the measured sync part.
    lay = dataclasses.replace(lay, grad_reduce="micro_batch")  # est() reads lay when called
    each = est({key: base})
    assert each.comm_exposed_s["dp"] == pytest.approx(n_micro * (layers * 0.005 + 0.001))
    # With HSDP the measured sync also holds the replicas' all-reduce, which only the last micro-batch
    # runs: the others pay the sync less the all-reduce's priced cost (bytes, and a latency per unit).
    from apogee.planner import comms
    from apogee.planner.memory import stage_params

    hsdp = dataclasses.replace(lay, tp=1, dp=4, dp_replicate=2, sequence_parallel=False)
    cluster = Cluster(accel=dataclasses.replace(cpu, host_table={host_key(m, hsdp, fsdp=True): base}), gpus=4,
                      gpus_per_node=4)
    got = estimate(RunSpec(model=m, cluster=cluster, fixed={}, global_batch=32, precision="fp32"), hsdp)
    link = comms.axis_link(hsdp, "dp", cluster, size=2, stride=2)
    all_reduce = (comms.all_reduce(4 * sum(stage_params(m, hsdp)) / 2, 2, link)
                  + layers * 2 * link.latency)
    sync = layers * 0.005 + 0.001
    assert 0 < all_reduce < sync
    assert got.comm_exposed_s["dp"] == pytest.approx(sync + (sync - all_reduce))  # 2 micro-batches a rank
    lay = dataclasses.replace(lay, grad_reduce="step")
    # The optimizer step is the measurement (plus the loss-mean all-reduce), with no byte model beside it.
    zero_step = est({key: {**base, "step": (0.0, 0.0)}})
    assert a.step_time_s - zero_step.step_time_s == pytest.approx(layers * 0.001 + 0.002)
    # The collectives' latency is in the measurement: TP traffic is bytes over bandwidth only.
    counted = est(None)
    assert a.comm_s["tp"] < counted.comm_s["tp"]
    tokens_bytes = 4 * 128 * m.hidden * 4  # one micro-batch's fp32 activations
    per_all_reduce = 2 * (2 - 1) / 2 * tokens_bytes / (cpu.nvlink_busbw_gbs * 1e9)
    assert a.comm_s["tp"] == pytest.approx(n_micro * (layers * 4 + 2) * per_all_reduce)
    # Another layout (no sequence parallelism) or another model (wider) is not in the table: the count
    # model, as without one.
    other = Layout(tp=2, dp=2, microbatch=4, zero=3, sequence_parallel=False, dp_overlap=False)
    run = lambda acc, model=m: RunSpec(model=model, cluster=Cluster(accel=acc, gpus=4, gpus_per_node=4),  # noqa: E731
                                       fixed={}, global_batch=16, precision="fp32")
    with_table = dataclasses.replace(cpu, host_table={key: {part: (1.0, 1.0) for part in base}})
    assert estimate(run(with_table), other).step_time_s == pytest.approx(estimate(run(cpu), other).step_time_s)
    wider = dataclasses.replace(m, hidden=2 * m.hidden)
    assert (estimate(run(with_table, wider), lay).step_time_s
            == pytest.approx(estimate(run(cpu, wider), lay).step_time_s))


def test_gpu_gemm_shape_table_keeps_the_level_and_takes_the_shape_ratios(tmp_path):
    """A measured GEMM table (benchmarks/gemm_table.py) sets only the shape dependence: a listed shape
    costs its measured time scaled so that the reference shape lands on the calibrated gemm_eff;
    unlisted shapes and other precisions keep the shape model; a bad file is one clear line."""
    import dataclasses

    from apogee.planner.cluster import load_gemm_shape_table
    from apogee.planner.compute import GEMM_REF_SHAPE, gemm_time

    h100 = get_accelerator("h100-80gb")
    peak = h100.peak("bf16")
    ref, shape = GEMM_REF_SHAPE, (4096, 6144, 2048)
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"accelerator": "h100-80gb", "dtype": "bf16", "device": "NVIDIA H100",
                                "entries": [[*ref, 1.5e-3], [*shape, 0.2e-3]]}))
    acc = dataclasses.replace(h100, gemm_shape_table=load_gemm_shape_table(path, "h100-80gb"))
    t_ref = 2.0 * math.prod(ref) / (peak * h100.gemm_eff)
    assert gemm_time(*ref, acc, peak) == pytest.approx(t_ref)
    assert gemm_time(*shape, acc, peak) == pytest.approx(0.2e-3 / 1.5e-3 * t_ref)
    assert gemm_time(*shape, acc, peak, batch=3) == pytest.approx(3 * 0.2e-3 / 1.5e-3 * t_ref)
    other = (4096, 4096, 2048)
    assert gemm_time(*other, acc, peak) == gemm_time(*other, h100, peak)
    assert gemm_time(*shape, acc, peak, elem_bytes=1) == gemm_time(*shape, h100, peak, elem_bytes=1)
    # A run description names it next to its accelerator (relative to the description's directory).
    run = run_from_dict({"model": {"flavor": "llama3-8b"}, "cluster": {"gpu": "h100-80gb", "gpus": 8,
                         "gemm_table": "h100.json"}}, base_dir=tmp_path)
    assert run.cluster.accel.gemm_shape_table == {ref: 1.5e-3, shape: 0.2e-3}
    with pytest.raises(PlannerError, match="measured for 'h100-80gb', not 'a100-80gb'"):
        load_gemm_shape_table(path, "a100-80gb")
    path.write_text(json.dumps({"accelerator": "h100-80gb", "dtype": "bf16", "entries": [[*shape, 0.2e-3]]}))
    with pytest.raises(PlannerError, match="lacks the reference shape"):
        load_gemm_shape_table(path, "h100-80gb")
    with pytest.raises(PlannerError, match="not readable"):
        load_gemm_shape_table(tmp_path / "missing.json", "h100-80gb")


def test_the_stack_speed_slows_attention_and_memory_bound_work_as_gemm_eff_slows_gemms():
    """One speed for every kernel of a stack: a Megatron-style run's attention and memory-bound ops cost
    their isolated time / (gemm_eff / engine_gemm_eff), as its GEMMs do through gemm_eff; apogee's own
    stack (gemm_eff = engine_gemm_eff) and accelerators without a kernel-level GEMM figure run at 1."""
    import dataclasses

    from apogee.planner.compute import layer_parts
    from apogee.planner.estimate import _engine_accelerator

    h100 = get_accelerator("h100-80gb")
    speed = h100.gemm_eff / h100.engine_gemm_eff
    assert h100.stack_speed == pytest.approx(speed) and 0.7 < speed < 0.8
    alone = _engine_accelerator(h100)
    assert alone.stack_speed == 1.0 and get_accelerator("a100-80gb").stack_speed == 1.0
    m = ModelShape(layers=4, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=32000, seq_len=4096)
    stack, kernels = (layer_parts(m, 2, 1, 1, 2, True, "none", acc, "bf16") for acc in (h100, alone))
    for part in ("attn_f", "attn_b", "elem_f", "elem_b"):
        assert getattr(stack, part) == pytest.approx(getattr(kernels, part) / speed, rel=1e-12)
    assert stack.gemm_f > kernels.gemm_f and stack.recompute == kernels.recompute == 0.0
    # Changing the kernel-level figure alone moves attention and memory-bound work, not the GEMMs.
    faster = dataclasses.replace(h100, engine_gemm_eff=h100.gemm_eff)
    other = layer_parts(m, 2, 1, 1, 2, True, "none", faster, "bf16")
    assert other.gemm_f == stack.gemm_f and other.attn_f == pytest.approx(kernels.attn_f)


def test_h100_engine_runs_memory_and_step(capsys):
    """The H100 measurements of the engine kept in benchmarks/results (planner_vs_measured_gpu.py, stop 18's
    run: expandable segments, NVML energy read on the meter's thread, one foreach norm in the clipping): the
    predicted allocations (total less the 2.5 GiB reserve) equal each run's peak allocated memory within 1%;
    every run's step time is within issue 5's 10% with the built-in figures (-1.1..+2.5% against the median
    step) but micro-batch 1's, at -10.5%: the host's dispatch floor brings it there from -13.7% (see the
    host-dispatch test below). Energy per token at TDP is a ceiling: never below the measured figure by more
    than the meter's noise, and within 10% of it where the GPU is busy (measured 600 W or more: +0.2..+6.1%);
    micro-batch 1 draws 509 W, and TDP prices it 21% high."""
    mod = load_benchmark("planner_vs_measured_gpu")
    dispatch = load_benchmark("gpu_host_dispatch")
    data = json.loads((ROOT / "benchmarks" / "results" / "h100-engine-runs.json").read_text())
    assert len(data["runs"]) == 6 and sum(r["compile"] for r in data["runs"]) == 1
    assert 50 < data["board"]["idle_w"] < data["board"]["gemm_w"] <= 1.01 * get_accelerator("h100-80gb").power_w
    for rec in data["runs"]:
        p = mod.predict(rec, "h100-80gb", None, engine=False)
        reserve = p["pred_breakdown_gib"]["buffers"]
        assert p["pred_mem_gib"] - reserve == pytest.approx(rec["mem_allocated_gib"], rel=0.01), rec["config"]
        assert p["energy_err_pct"] >= -2.0, rec["config"]
        if p["meas_power_w"] >= 600:
            assert p["energy_err_pct"] <= 10.0, rec["config"]
        if rec["micro_batch"] > 1:
            assert abs(p["step_err_pct"]) <= 10.0, rec["config"]
    mb1 = next(r for r in data["runs"] if r["micro_batch"] == 1)
    assert -11.0 < mod.predict(mb1, "h100-80gb", None, engine=False)["step_err_pct"] < -10.0
    device_only = dispatch.planner_step(mb1, host=False).step_time_s
    assert device_only / statistics.median(mb1["step_s"]) - 1 < -0.13
    assert mod.main(["--measured", str(ROOT / "benchmarks" / "results" / "h100-engine-runs.json")]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b x4 layers mb2" in out and "board power: idle 116 W" in out


def test_h100_step_profile_is_the_predicted_device_time():
    """benchmarks/results/h100-step-profile.json (gpu_step_profile.py, CUDA kernels alone, one step of each
    config after warm-up; micro-batch 1 profiled again in stop 18 after the clipping's change, the others
    from stop 17): the planner's step (built-in figures) is within 5% of the summed kernel time in every
    profiled config, so what the cost model prices is the device's work. Micro-batch 1's wall step
    (0.148-0.150 s) is 15 ms above its 133 ms of kernels: the GPU idles on the host, of which the planner's
    dispatch floor holds 5 ms."""
    mod = load_benchmark("planner_vs_measured_gpu")
    runs = {r["config"]: r for r in json.loads((ROOT / "benchmarks" / "results" / "h100-engine-runs.json")
                                                 .read_text())["runs"]}
    profiled = json.loads((ROOT / "benchmarks" / "results" / "h100-step-profile.json").read_text())
    assert {r["config"] for r in profiled} == {"llama-1b mb1", "llama-1b mb4", "llama3-8b x4 layers mb2",
                                               "llama-1b mb4 compiled"}
    for prof in profiled:
        pred = mod.predict(runs[prof["config"]], "h100-80gb", None, engine=False)["pred_step_s"]
        assert pred == pytest.approx(prof["kernel_s"], rel=0.05), prof["config"]
        assert prof["by_category_s"]["optimizer"] > 0.02  # fused AdamW's 25-42 ms is in it
    mb1 = runs["llama-1b mb1"]
    assert min(mb1["step_s"]) - next(r["kernel_s"] for r in profiled if r["config"] == "llama-1b mb1") > 0.01


def test_h100_host_dispatch_floors_the_step_at_a_few_tokens():
    """benchmarks/results/h100-host-dispatch.json (gpu_host_dispatch.py, stop 18): with NVML's counter read on
    the meter's thread, the host-only rest of each step is under 6 ms (5-25 ms in stop 17, two reads a step).
    At 32 tokens llama-1b's kernels are tiny: the planner's step, floored by the host's dispatch at
    H100_HOST_DISPATCH_S, is within 10% of the measured minimum (-7.6%), where the device's work alone is
    half of it. The held-out 4-layer Llama 3 8B at 32 tokens is device-bound (its 1.9B parameters' casts and
    accumulation) and within 5% either way, and its forward's dispatch, counted at the same cost, within 15%
    of the measured (5.0 against 5.7 ms)."""
    mod = load_benchmark("gpu_host_dispatch")
    runs = {r["config"]: r for r in json.loads((ROOT / "benchmarks" / "results" / "h100-host-dispatch.json")
                                                 .read_text())["runs"]}
    for r in runs.values():
        rest = r["step"]["min"] - r["forward_backward"]["min"] - r["optimizer_step"]["min"]
        assert 0.0 < rest < 0.006, r["config"]
    small = runs["llama-1b seq32 mb1"]
    est, device_only = mod.planner_step(small), mod.planner_step(small, host=False)
    assert est.step_time_s == pytest.approx(small["step"]["min"], rel=0.10)
    assert device_only.step_time_s < 0.55 * small["step"]["min"] and est.host_wait_s > 0.05
    held_out = runs["llama3-8b x4 layers seq32 mb1"]
    assert mod.planner_step(held_out).step_time_s == pytest.approx(held_out["step"]["min"], rel=0.05)
    for r in (small, held_out):
        assert mod.planner_dispatch(r)[0] == pytest.approx(r["forward_host"]["min"], rel=0.15), r["config"]


def test_gpu_host_dispatch_floors_each_phase_of_the_eager_step_only():
    """apogee's eager micro-batch on a GPU: each phase takes max(device, host dispatch), the host's being
    the engine's counted calls (forward) and autograd nodes (backward) at the accelerator's host costs, so
    a model whose kernels take nothing runs at the host's pace, and a large one is untouched. Compiled
    blocks, the Megatron stack, and accelerators without measured host costs get no floor."""
    import dataclasses

    from apogee.models.flavors import FLAVORS
    from apogee.planner import host
    from apogee.planner.cluster import Cluster
    from apogee.planner.spec import shape_from_args

    h100 = get_accelerator("h100-80gb")
    assert host.gpu_dispatch_s(Layout(), h100, 16, head=True) == pytest.approx(
        ((16 * host.BLOCK_CALLS + host.HEAD_CALLS) * h100.host_call_s,
         (16 * host.BLOCK_NODES + host.HEAD_NODES) * h100.host_node_s))
    f, b = host.gpu_dispatch_s(Layout(recompute="full"), h100, 4, head=False)
    assert b == pytest.approx(4 * (host.BLOCK_NODES * h100.host_node_s + host.BLOCK_CALLS * h100.host_call_s))
    assert host.gpu_dispatch_s(Layout(), get_accelerator("cpu"), 4, head=True) == (0.0, 0.0)

    def est(seq, gb, acc=h100, stack="apogee", **lay):
        m = shape_from_args(FLAVORS["llama-1b"], flavor="llama-1b", seq_len=seq)
        run = RunSpec(model=m, cluster=Cluster(accel=acc, gpus=1, gpus_per_node=1), fixed={}, global_batch=gb,
                      precision="bf16", stack=stack)
        return estimate(run, Layout(microbatch=1, zero=3, dp_overlap=False, **lay))

    tiny = est(8, 4)
    hf, hb = host.gpu_dispatch_s(Layout(), h100, 16, head=True)
    # Four micro-batches of 8 tokens: the device's work (mostly the parameter-sized casts) is shorter than the
    # host's dispatch, which the step cannot beat; the floor adds exactly what the device waits.
    unmeasured = dataclasses.replace(h100, host_call_s=0.0, host_node_s=0.0)
    device_only = est(8, 4, unmeasured)
    assert tiny.step_time_s - device_only.step_time_s == pytest.approx(tiny.host_wait_s)
    assert tiny.host_wait_s > 0.5 * 4 * (hf + hb)
    assert tiny.step_time_s > 4 * (hf + hb)
    assert est(8192, 4).host_wait_s == 0.0  # 8K tokens a micro-batch: the device leads
    assert est(8, 4, compile=True).host_wait_s == 0.0
    assert est(8, 4, stack="megatron").host_wait_s == 0.0
    assert tiny.to_json()["host_wait_s"] == tiny.host_wait_s
