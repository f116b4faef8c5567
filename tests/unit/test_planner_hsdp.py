"""HSDP in the planner (layout.dp_replicate): replicas of FSDP2 shards, as apogee's engine runs them with
parallel.dp_replicate x dp_shard. Memory and traffic against hand-computed figures, the layouts it refuses,
the search and the export to the engine."""

from __future__ import annotations

import dataclasses

import pytest

from apogee.config import load_config, validate
from apogee.planner import comms, run_from_dict, search
from apogee.planner.cluster import GIB, Cluster, get_accelerator
from apogee.planner.estimate import GRAD_REDUCE_BYTES, check_layout, estimate, fsdp_gathers_per_step
from apogee.planner.export import engine_layout, engine_memory_gib, layout_to_config, write_config
from apogee.planner.memory import stage_memory, stage_params
from apogee.planner.spec import Layout, shape_from_flavor


def _run(gpus: int = 16, inter_gbs: float | None = None, **layout):
    cluster = {"gpu": "h100-80gb", "gpus": gpus, "gpus_per_node": 8}
    if inter_gbs is not None:
        cluster["inter_gbs_per_gpu"] = inter_gbs
    return run_from_dict({"model": {"flavor": "llama3-8b", "seq_len": 2048}, "cluster": cluster, "layout": layout,
                          "train": {"global_batch": 64}})


@pytest.mark.parametrize("zero", [2, 3])
def test_a_rank_holds_one_replicas_shard(zero):
    # llama3-8b, 16 data ranks as 2 replicas of 8 shards: FSDP2's 16 bytes a parameter over 8, not 16.
    m = shape_from_flavor("llama3-8b", seq_len=2048)
    cluster = Cluster(accel=get_accelerator("h100-80gb"), gpus=16, gpus_per_node=8)
    hsdp = Layout(dp=16, dp_replicate=2, microbatch=1, zero=zero)
    assert hsdp.shard_group == 8
    got = stage_memory(m, hsdp, cluster, global_batch=64)
    psi = sum(stage_params(m, hsdp))
    assert (got.grads, got.optimizer) == pytest.approx((2 * psi / 8, 12 * psi / 8), rel=1e-12)
    assert got.params == pytest.approx(2 * psi / 8 + (2 * psi if zero == 2 else 0), rel=1e-12)
    # The same as one replica alone (FSDP over 8 with the replica's share of the batch: 4 micro-batches).
    alone = stage_memory(m, Layout(dp=8, microbatch=1, zero=zero), cluster, global_batch=32)
    assert got == alone


def test_traffic_by_hand():
    # 2 nodes of 8: the shard groups are the nodes (NVLink); each rank all-reduces its gradient shard with
    # its peer in the other node once a step, on its own NIC.
    run = _run()
    lay = Layout(dp=16, dp_replicate=2, microbatch=1, zero=3)
    psi = sum(stage_params(run.model, lay))
    nvlink = comms.axis_link(lay, "dp", run.cluster, size=8, stride=1)
    across = comms.axis_link(lay, "dp", run.cluster, size=2, stride=8)
    assert not nvlink.crosses_nodes and across.crosses_nodes
    assert across.busbw == run.cluster.inter_bw  # one GPU per node in a replica group
    n_micro = 64 // 16
    want = (fsdp_gathers_per_step(lay, n_micro) * comms.all_gather(2 * psi, 8, nvlink)
            + n_micro * comms.reduce_scatter(GRAD_REDUCE_BYTES * psi, 8, nvlink)
            + comms.all_reduce(GRAD_REDUCE_BYTES * psi / 8, 2, across))
    assert estimate(run, lay).comm_s["dp"] == pytest.approx(want, rel=1e-12)


def test_replicas_win_where_the_network_is_slow_and_the_gathers_are_exposed():
    # llama3-8b at zero 3 on 64 GPUs, one micro-batch each, 3 GB/s per GPU between nodes: gathering every
    # block's weights over the nodes costs more than one all-reduce of a shard; at 50 GB/s it does not.
    pinned = dict(tp=1, pp=1, cp=1, zero=3)
    slow = search(_run(64, inter_gbs=3.0, **pinned), top=1).ranked[0].layout
    assert (slow.dp_replicate, slow.shard_group) == (8, 8)  # a node per shard group
    fast = search(_run(64, inter_gbs=50.0, **pinned), top=1).ranked[0].layout
    assert fast.dp_replicate == 1
    # Pinned, the replica count is taken as given.
    assert {e.layout.dp_replicate for e in search(_run(64, dp_replicate=4, **pinned), top=0).ranked} == {4}


def test_refused_layouts_name_the_setting():
    m = shape_from_flavor("llama3-8b", seq_len=2048)
    cluster = Cluster(accel=get_accelerator("h100-80gb"), gpus=16, gpus_per_node=8)
    cases = {
        "zero 2 or 3": Layout(dp=16, dp_replicate=2, zero=0),
        "must divide layout.dp": Layout(dp=16, dp_replicate=3, zero=3),
        "that is layout.zero=0": Layout(dp=16, dp_replicate=16, zero=3),
    }
    for reason, lay in cases.items():
        why = check_layout(m, lay, cluster, 64)
        assert why and "layout.dp_replicate" in why and reason in why, why
    assert "apogee's" in check_layout(m, Layout(dp=16, dp_replicate=2, zero=3), cluster, 64, stack="megatron")
    # Replicas over context-parallel shards alone are HSDP too (the engine shards over dp_shard x cp).
    assert check_layout(m, Layout(dp=8, cp=2, dp_replicate=8, zero=3), cluster, 64) is None
    # HSDP is apogee's, and apogee's engine has no experts: an MoE model is refused before its layout.
    moe = dataclasses.replace(m, experts=8, top_k=2, moe_ffn_hidden=2048)
    assert "no mixture-of-experts" in check_layout(moe, Layout(dp=16, ep=2, dp_replicate=2, zero=3), cluster, 64)
    assert check_layout(moe, Layout(dp=16, ep=2, zero=3), cluster, 64, stack="megatron") is None


@pytest.mark.parametrize("layout,replicate,shard", [
    (dict(dp=16, dp_replicate=2, zero=3), 2, 8),
    (dict(dp=16, dp_replicate=4, zero=2), 4, 4),
    (dict(dp=8, cp=2, dp_replicate=8, zero=3), 8, 1),
])
def test_export_runs_hsdp_on_the_engine_and_maps_back(tmp_path, layout, replicate, shard):
    run = _run()
    lay = Layout(microbatch=1, dp_overlap=False, **layout)
    p = layout_to_config(run, lay)["parallel"]
    assert (p["dp_replicate"], p["dp_shard"]) == (replicate, shard)
    cfg = load_config(write_config(run, lay, tmp_path / "planned.toml"))
    parallel = validate(cfg, lay.world)
    assert engine_layout(cfg, parallel) == lay
    assert engine_memory_gib(cfg, parallel, vocab=run.model.vocab, bf16=True) == pytest.approx(
        estimate(run, lay).memory.total / GIB, rel=1e-12)
