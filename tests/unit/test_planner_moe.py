"""Mixture-of-experts in the planner: heads wider than hidden / heads (model.head_dim), experts split fewer
ways than the rest of the block and folded over the tensor ranks (layout.expert_tp), the all-to-all as
each GPU's NIC carries it, and each expert's state over its own replicas. Hand-computed figures."""

from __future__ import annotations

import dataclasses

import pytest

from apogee.planner import comms, run_from_dict
from apogee.planner.cluster import Cluster, get_accelerator
from apogee.planner.compute import layer_parts
from apogee.planner.errors import PlannerError
from apogee.planner.estimate import check_layout, estimate
from apogee.planner.memory import stage_memory, stage_params
from apogee.planner.placement import describe
from apogee.planner.search import _expert_values, complete_layout
from apogee.planner.spec import Layout, ModelShape, model_from_dict

# Qwen3-235B-A22B as Megatron-LM's MoE model zoo configures it (model_configs/benchmarking/Qwen3-235B-A22B.yaml:
# --num-layers 94, --hidden-size 4096, --num-attention-heads 64, --kv-channels 128, --num-query-groups 4,
# --num-experts 128, --moe-router-topk 8, --moe-ffn-hidden-size 1536, vocabulary 151936, untied).
QWEN3_235B = dict(layers=94, hidden=4096, heads=64, kv_heads=4, head_dim=128, ffn_hidden=12288, vocab=151936,
                  experts=128, top_k=8, moe_ffn_hidden=1536, seq_len=4096)
H100 = get_accelerator("h100-80gb")


def test_heads_wider_than_hidden_over_heads():
    m = ModelShape(**QWEN3_235B)
    assert (m.head_dim, m.q_dim, m.kv_dim) == (128, 8192, 512)
    h = 4096
    assert m.attn_params() == 2 * h * 8192 + 2 * h * 512  # wq and wo are 4096 x 8192
    # Forward FLOPs a token: attention projections, 8 routed experts and the router, the output layer.
    per_layer = 2 * (2 * h * 8192 + 2 * h * 512) + 8 * 2 * 3 * h * 1536 + 2 * h * 128
    assert m.matmul_flops_per_token() == 94 * per_layer + 2 * h * 151936
    assert m.attn_flops_per_token() == 4 * 94 * 4096 * 8192  # QK^T and AV over the 8192-wide queries
    # The published basis: Megatron-Bridge's DGX-H100 FP8 row, 1633 tokens/s/GPU at 242 TFLOP/s/GPU, and the
    # model zoo's BF16 row, 2048 x 4096 tokens in 19.7 s on 256 GPUs at 245, count causal attention as half.
    causal = m.model_flops_per_token() - 1.5 * m.attn_flops_per_token()
    assert 1633 * causal / 1e12 == pytest.approx(242, rel=0.01)
    assert 2048 * 4096 / 19.7 / 256 * causal / 1e12 == pytest.approx(245, rel=0.01)
    # A flavor's heads are hidden / heads wide, also when the overrides change them; unset, a shape needs it.
    assert model_from_dict({"flavor": "llama3-8b", "hidden": 2048, "seq_len": 512}).head_dim == 64
    assert model_from_dict({"flavor": "llama3-8b", "hidden": 2048, "head_dim": 128, "seq_len": 512}).q_dim == 4096
    with pytest.raises(PlannerError, match="model.head_dim"):
        ModelShape(layers=2, hidden=100, heads=3, kv_heads=1, ffn_hidden=64, vocab=8, seq_len=8)


def test_wider_heads_price_wider_attention():
    narrow = dict(QWEN3_235B, heads=32)  # half the heads of 128, on the same hidden
    wide, base = (layer_parts(ModelShape(**d), 2, 1, 1, 1, True, "none", H100, "bf16") for d in (QWEN3_235B, narrow))
    assert wide.attn_f == pytest.approx(2 * base.attn_f, rel=1e-9)  # scores and AV over twice the width
    assert wide.gemm_f > base.gemm_f


def test_expert_tp_folds_the_expert_groups_over_the_tensor_ranks():
    m = ModelShape(**QWEN3_235B)
    cluster = Cluster(accel=H100, gpus=256, gpus_per_node=8)
    folded = Layout(tp=2, pp=8, dp=16, ep=32, expert_tp=1, virtual_stages=4, pp_schedule="interleaved-1f1b",
                    sequence_parallel=True, zero=1, pp_split="embedding_loss")
    assert check_layout(m, folded, cluster, 2048, "megatron") is None
    assert (folded.etp, folded.expert_dp) == (1, 1)  # 32 expert ranks out of a stage's 32: one copy each
    unfolded = dataclasses.replace(folded, expert_tp=0)
    why = check_layout(m, unfolded, cluster, 2048, "megatron")
    assert "layout.ep=32 must divide dp*cp=16" in why and "layout.expert_tp" in why
    assert "must divide tp*dp*cp = 32" in check_layout(m, dataclasses.replace(folded, ep=64), cluster, 2048,
                                                        "megatron")
    assert "moe_ffn_hidden" in check_layout(m, dataclasses.replace(folded, ep=2, expert_tp=16), cluster, 2048,
                                            "megatron")
    # Each rank holds experts / ep whole experts (12 layers on the first stage: 3 chunks of 4 slots less the
    # embedding's), where split tp ways it held half as many twice as wide: the same bytes.
    _, experts = stage_params(m, folded, "first", "megatron")
    layers = 2 + 3 * 3  # chunks 0, 8, 16 and 24 of 3 slots; the first one's first slot is the embedding's
    assert experts == layers * 128 * 3 * 4096 * 1536 / 32
    assert "etp1" in folded.short()


def test_folding_keeps_each_ranks_expert_flops():
    m = ModelShape(**QWEN3_235B)
    tp2 = layer_parts(m, 2, 1, 8, 1, True, "none", H100, "bf16", moe=True)
    folded = layer_parts(m, 2, 1, 8, 1, True, "none", H100, "bf16", moe=True, etp=1)
    # Split 2 ways, 16 experts of 2048 rows each at half width; folded, 16 experts of 1024 rows at full width:
    # the same FLOPs, priced by the same GEMM model (within its shape effects).
    assert folded.gemm_f == pytest.approx(tp2.gemm_f, rel=0.05) and folded.gemm_f != tp2.gemm_f
    assert tp2 == layer_parts(m, 2, 1, 8, 1, True, "none", H100, "bf16", moe=True, etp=2)  # unset is tp


def test_all_to_all_leaves_through_each_gpus_nic():
    cluster = Cluster(accel=H100, gpus=256, gpus_per_node=8)
    nbytes = 134e6
    # 32 ranks, consecutive: 8 share the node, 24 shares of 32 leave through the rank's own 45 GB/s NIC.
    assert comms.all_to_all(nbytes, 32, 1, cluster) == pytest.approx(24 / 32 * nbytes / 45e9 + 20e-6)
    # 8 ranks two apart: 4 in the node; within a node alone, NVLink at 360 GB/s.
    assert comms.all_to_all(nbytes, 8, 2, cluster) == pytest.approx(4 / 8 * nbytes / 45e9 + 20e-6)
    assert comms.all_to_all(nbytes, 8, 1, cluster) == pytest.approx(7 / 8 * nbytes / 360e9 + 10e-6)
    assert comms.all_to_all(nbytes, 1, 1, cluster) == 0.0
    assert comms.members_per_node(32, 1, 8) == 8 and comms.members_per_node(4, 16, 8) == 1


def test_deepep_sends_a_token_once_per_node_and_rank():
    cluster = Cluster(accel=H100, gpus=256, gpus_per_node=8)
    b = 16e6  # a rank's tokens, one copy each
    # Plain: 8 copies, each to its expert's rank; the same as an all-to-all of the 8 copies.
    assert comms.expert_dispatch(b, 128, 8, 32, 1, cluster) == comms.all_to_all(8 * b, 32, 1, cluster)
    # DeepEP over 4 nodes of 32 experts: another node is hit unless all 8 experts are among the other 96.
    miss = 1.0
    for i in range(8):
        miss *= (96 - i) / (128 - i)
    assert comms.expert_dispatch(b, 128, 8, 32, 1, cluster, deduplicated=True) == pytest.approx(
        3 * (1 - miss) * b / 45e9 + 20e-6)  # 2.73 node copies on the NIC where the plain one sends 6
    # Within one node, once per other rank holding any of the token's experts (16 each).
    miss = 1.0
    for i in range(8):
        miss *= (112 - i) / (128 - i)
    assert comms.expert_dispatch(b, 128, 8, 8, 1, cluster, deduplicated=True) == pytest.approx(
        7 * (1 - miss) * b / 360e9 + 10e-6)
    assert "deepep" in Layout(ep=8, ep_dispatch="deepep").short()
    with pytest.raises(PlannerError, match="layout.ep_dispatch"):
        _run(ep_dispatch="nccl")


def _run(**layout):
    return run_from_dict({"model": QWEN3_235B, "cluster": {"gpu": "h100-80gb", "gpus": 256, "gpus_per_node": 8},
                          "layout": layout, "train": {"global_batch": 2048, "stack": "megatron"}})


def test_expert_dispatch_and_state_follow_the_fold():
    base = dict(tp=2, pp=8, dp=16, ep=8, virtual_stages=4, pp_schedule="interleaved-1f1b", sequence_parallel=True,
                zero=1, pp_split="embedding_loss", microbatch=1, recompute="none")
    run = _run(**base)
    in_node = estimate(run, Layout(**base, expert_tp=1))
    across = estimate(run, Layout(**{**base, "ep": 32}, expert_tp=1))
    # Dispatch and combine, forward and backward, of each rank's 2048 tokens x 8 copies x 4096 x 2 bytes,
    # on the first pipeline rank's 11 layers, for each of its 128 micro-batches.
    disp = 4096 / 2 * 8 * 4096 * 2
    per_mb = 4 * comms.all_to_all(disp, 32, 1, run.cluster)
    assert across.comm_s["ep"] == pytest.approx(128 * 11 * per_mb, rel=1e-9)
    assert across.comm_s["ep"] > 4 * in_node.comm_s["ep"]  # 3/4 of it on the NIC instead of NVLink
    # The distributed optimizer shards an expert's state over its replicas: 4 of them at ep 8, 1 at ep 32.
    cluster = run.cluster
    for lay, replicas in ((Layout(**base, expert_tp=1), 4), (Layout(**{**base, "ep": 32}, expert_tp=1), 1)):
        nonexpert, experts = stage_params(run.model, lay, "first", "megatron")
        mem = stage_memory(run.model, lay, cluster, global_batch=2048, stack="megatron")
        assert lay.expert_dp == replicas
        assert mem.optimizer == pytest.approx(12 * (nonexpert / 16 + experts / replicas), rel=1e-9)
    assert any("ep groups of 32" in line and "8 in a node" in line for line in describe(across.layout, cluster))


def test_the_search_folds_experts_where_ep_exceeds_the_data_ranks():
    # ep 8 on tp 2 x dp 4: only whole experts folded over the tensor ranks fit the expert group.
    run = run_from_dict({"model": QWEN3_235B, "cluster": {"gpu": "h100-80gb", "gpus": 64, "gpus_per_node": 8},
                         "layout": {"tp": 2, "pp": 8, "ep": 8, "pp_split": "embedding_loss", "recompute": "full"},
                         "train": {"global_batch": 64, "stack": "megatron"}})
    best = complete_layout(run)
    assert (best.layout.dp, best.layout.ep, best.layout.etp) == (4, 8, 1)
    assert _expert_values([1, 2, 4], 2, 4, 1, None) == [(1, 0), (2, 0), (2, 1), (4, 0), (4, 1)]
    assert _expert_values([8], 2, 4, 1, None) == [(8, 1)]  # ep 8 needs the fold
    assert _expert_values([8], 2, 4, 1, 2) == []  # pinned unfolded: no room
    bad = run_from_dict({"model": QWEN3_235B, "cluster": {"gpu": "h100-80gb", "gpus": 64, "gpus_per_node": 8},
                         "layout": {"tp": 2, "pp": 8, "ep": 8, "expert_tp": 2},
                         "train": {"global_batch": 64, "stack": "megatron"}})
    with pytest.raises(PlannerError, match=r"layout.ep x layout.expert_tp must divide tp\*dp\*cp = 8"):
        complete_layout(bad)


def test_apogee_refuses_experts_in_one_line():
    # apogee's engine has no MoE layers, so its stack prices none; Megatron's does.
    with pytest.raises(PlannerError, match=r'^model.experts=128: .* train.stack = "megatron"'):
        run_from_dict({"model": QWEN3_235B, "cluster": {"gpu": "h100-80gb", "gpus": 256},
                       "train": {"global_batch": 256}})
