"""The planner's zero levels for apogee are the ones its engine runs (0, 2, 3), exported as the engine's
[parallel] settings and priced as FSDP2 holds them; Megatron-LM's stack keeps ZeRO 1."""

from __future__ import annotations

import dataclasses

import pytest

from apogee.config import load_config
from apogee.planner import run_from_dict, search
from apogee.planner.cluster import GIB, Cluster, get_accelerator
from apogee.planner.errors import PlannerError
from apogee.planner.estimate import check_layout, estimate, fsdp_gathers_per_step
from apogee.planner.export import engine_rejection, layout_to_config, write_config
from apogee.planner.memory import activation_bytes_per_layer, stage_layer_counts, stage_memory, stage_params
from apogee.planner.search import complete_layout, plan_layout
from apogee.planner.spec import Layout, shape_from_flavor

H100 = Cluster(accel=get_accelerator("h100-80gb"), gpus=8, gpus_per_node=8)


def _run(stack: str = "apogee", gpus: int = 8, **layout):
    return run_from_dict({"model": {"flavor": "llama3-8b", "seq_len": 2048},
                          "cluster": {"gpu": "h100-80gb", "gpus": gpus}, "layout": layout,
                          "train": {"global_batch": 64, "stack": stack}})


def test_zero_1_is_megatrons_not_apogees():
    m = shape_from_flavor("llama3-8b")
    lay = Layout(dp=8, microbatch=1, zero=1)
    assert "no ZeRO-1" in check_layout(m, lay, H100, 64)
    assert check_layout(m, lay, H100, 64, stack="megatron") is None
    with pytest.raises(PlannerError, match="train.stack"):
        estimate(_run(), lay)
    assert estimate(_run("megatron"), lay).fits
    # Pinned in a run description, the search finds nothing valid and says why.
    for complete in (complete_layout, plan_layout):
        with pytest.raises(PlannerError, match="no ZeRO-1"):
            complete(_run(zero=1, dp=8))
    # Replication with context parallelism would still shard over cp in the engine.
    assert "cp" in check_layout(m, Layout(dp=4, cp=2, microbatch=1, zero=0), H100, 64)


def test_search_offers_apogee_only_what_its_engine_runs():
    apogee = {e.layout.zero for e in search(_run(), top=0).ranked}
    assert apogee and apogee <= {0, 2, 3}
    megatron = {e.layout.zero for e in search(_run("megatron", tp=1, pp=1), top=0).ranked}
    assert megatron and megatron <= {1, 2, 3}


@pytest.mark.parametrize("zero,replicate,shard,reshard", [(0, 8, 1, "default"), (2, 1, 8, "never"),
                                                          (3, 1, 8, "default")])
def test_export_maps_each_zero_level_to_the_engine(tmp_path, zero, replicate, shard, reshard):
    run = _run()
    lay = Layout(dp=8, microbatch=1, zero=zero)
    assert engine_rejection(run, lay) is None
    p = load_config(write_config(run, lay, tmp_path / "planned.toml")).parallel
    assert (p.dp_replicate, p.dp_shard, p.reshard_after_forward) == (replicate, shard, reshard)
    # Nothing to split over: the same engine config at every level (no FSDP, no reshard key).
    one = layout_to_config(run, Layout(tp=8, microbatch=1, zero=zero))["parallel"]
    assert (one["dp_replicate"], one["dp_shard"], "reshard_after_forward" in one) == (1, 1, False)


@pytest.mark.parametrize("grad_reduce", ["micro_batch", "step"])
@pytest.mark.parametrize("n_micro", [1, 4])
def test_model_state_by_hand_per_zero_level(n_micro, grad_reduce):
    # llama3-8b on 8 data ranks, bf16: FSDP2's 16 bytes a parameter over 8 (zero 2, 3), or whole (zero 0);
    # zero 2 adds the whole gathered bf16 weights; zero 3 and 0 have two gathered blocks in flight.
    m = shape_from_flavor("llama3-8b", seq_len=2048)
    psi = sum(stage_params(m, Layout(dp=8)))
    per_block_gathered = 2 * 2 * psi / m.layers
    # Several micro-batches reduced once a step (or at zero 0, where nothing is sharded): the accumulated
    # gradients are whole, in fp32. Reduced every micro-batch they stay sharded.
    whole = n_micro > 1
    grads = {0: 4 * psi if whole else 2 * psi,
             2: 4 * psi if whole and grad_reduce == "step" else 2 * psi / 8,
             3: 4 * psi if whole and grad_reduce == "step" else 2 * psi / 8}
    hand = {
        0: (2 * psi, 12 * psi, 2.5 * GIB + per_block_gathered),
        2: (2 * psi / 8 + 2 * psi, 12 * psi / 8, 2.5 * GIB),
        3: (2 * psi / 8, 12 * psi / 8, 2.5 * GIB + per_block_gathered),
    }
    for zero, (params, opt, buffers) in hand.items():
        got = stage_memory(m, Layout(dp=8, microbatch=1, zero=zero, grad_reduce=grad_reduce), H100,
                           global_batch=8 * n_micro)
        assert (got.params, got.grads, got.optimizer, got.buffers) == pytest.approx(
            (params, grads[zero], opt, buffers), rel=1e-12), zero


def test_pipeline_keeps_the_stages_gathered_weights_less_a_freed_micro_batch():
    # Under a pipeline schedule torch keeps each block's gathered weights after its backward, and the next
    # forward frees them again: at the peak the stage's weights are all gathered and one micro-batch of
    # activations fewer is held, so the gathered weights beyond the two blocks in flight add only what
    # exceeds that micro-batch's activations. Short sequences (weights dominate) and long ones (they do not).
    for seq, extra_expected in ((256, True), (8192, False)):
        m = shape_from_flavor("llama3-8b", seq_len=seq)
        lay = Layout(dp=2, pp=2, microbatch=1, zero=3)
        first = stage_memory(m, lay, H100, global_batch=16, stage="first")
        psi = sum(stage_params(m, lay, "first"))
        layers = stage_layer_counts(m, lay)[0]
        weights, in_flight = 2 * psi, 2 * 2 * psi / layers
        one_micro = activation_bytes_per_layer(m, lay, micro_tokens=seq) * layers
        extra = max(0.0, weights - in_flight - one_micro)
        assert (extra > 0) == extra_expected
        assert first.params == pytest.approx(2 * psi / 2 + extra, rel=1e-12)
        assert first.buffers == pytest.approx(2.5 * GIB + in_flight, rel=1e-12)
        # Zero 2 keeps them all, from each forward: no micro-batch is freed first.
        kept = stage_memory(m, dataclasses.replace(lay, zero=2), H100, global_batch=16, stage="first")
        assert kept.params == pytest.approx(2 * psi / 2 + weights, rel=1e-12)


def test_gathers_per_step():
    assert [fsdp_gathers_per_step(Layout(dp=2, zero=z), 4) for z in (0, 2, 3)] == [0, 4, 8]
    # Under a pipeline torch keeps the weights gathered after each backward until the step's last:
    # zero 3 gathers for every backward and for the forwards in flight before the first; zero 2 once.
    assert fsdp_gathers_per_step(Layout(dp=2, pp=4, zero=3), 8) == 8 + 4
    assert fsdp_gathers_per_step(Layout(dp=2, pp=4, zero=2), 8) == 1


def test_zero_levels_trade_memory_for_communication():
    lays = {z: Layout(dp=8, microbatch=1, zero=z) for z in (0, 2, 3)}
    est = {z: estimate(_run(), lay) for z, lay in lays.items()}
    mem = {z: e.memory.total for z, e in est.items()}
    assert mem[3] < mem[2] < mem[0]
    assert est[2].comm_s["dp"] < est[3].comm_s["dp"]


def test_grad_reduce_trades_gradient_memory_for_reductions(tmp_path):
    from apogee.planner import comms
    from apogee.planner.estimate import GRAD_REDUCE_BYTES

    run = _run()  # 64 sequences on 8 data ranks, one a micro-batch: 8 micro-batches a step
    each = estimate(run, Layout(dp=8, microbatch=1, zero=3))
    once = estimate(run, Layout(dp=8, microbatch=1, zero=3, grad_reduce="step"))
    psi = sum(stage_params(run.model, each.layout))
    assert once.memory.grads == pytest.approx(4 * psi) and each.memory.grads == pytest.approx(2 * psi / 8)
    link = comms.axis_link(each.layout, "dp", run.cluster, size=8, stride=1)
    reduction = comms.reduce_scatter(GRAD_REDUCE_BYTES * psi, 8, link)
    assert each.comm_s["dp"] - once.comm_s["dp"] == pytest.approx(7 * reduction, rel=1e-9)
    # The search weighs both; the engine gets "step" written out, its default left implicit.
    assert {e.layout.grad_reduce for e in search(run, top=0).ranked if e.layout.zero >= 2} == {"micro_batch", "step"}
    assert "grad_reduce" not in layout_to_config(run, each.layout)["parallel"]
    assert load_config(write_config(run, once.layout, tmp_path / "once.toml")).parallel.grad_reduce == "step"
    # Under a pipeline torch reduces once a step whatever the setting: whole gradients either way.
    piped = [stage_memory(run.model, Layout(dp=4, pp=2, microbatch=1, zero=3, grad_reduce=g), H100, global_batch=64)
             for g in ("micro_batch", "step")]
    assert piped[0] == piped[1]


@pytest.mark.parametrize("layout", [
    dict(dp=8, zero=3), dict(dp=8, zero=2), dict(dp=8, zero=0), dict(dp=8, zero=3, grad_reduce="step"),
    dict(tp=2, dp=4, zero=3, sequence_parallel=True, recompute="selective"),
    dict(pp=2, dp=4, zero=3, pp_schedule="interleaved-1f1b", virtual_stages=2),
])
def test_an_exported_config_maps_back_to_its_layout(tmp_path, layout):
    """export.engine_layout inverts layout_to_config, so the planner can price an engine config (the
    orchestrator's re-plan asks it whether a layout fits the device)."""
    from apogee.config import validate
    from apogee.planner.export import engine_layout, engine_memory_gib

    run = _run()
    lay = Layout(microbatch=1, dp_overlap=False, **layout)
    cfg = load_config(write_config(run, lay, tmp_path / "planned.toml"))
    parallel = validate(cfg, lay.world)
    assert engine_layout(cfg, parallel) == lay
    want = estimate(run, lay).memory.total / GIB
    assert engine_memory_gib(cfg, parallel, vocab=run.model.vocab, bf16=True) == pytest.approx(want, rel=1e-12)
