"""Context parallelism's traffic as each stack runs it: apogee's engine all-gathers K and V before
attention and reduce-scatters their gradients, on the critical path (apogee.parallel.context), as Llama 3
trained; Megatron-LM's default is a ring of K/V exchanges behind attention (layout.cp_comm)."""

from __future__ import annotations

import pytest

from apogee.planner import comms, run_from_dict
from apogee.planner.errors import PlannerError
from apogee.planner.estimate import estimate
from apogee.planner.spec import Layout


def _run(stack: str, **layout):
    return run_from_dict({"model": {"flavor": "llama3-8b", "seq_len": 8192},
                          "cluster": {"gpu": "h100-80gb", "gpus": 16, "gpus_per_node": 8}, "layout": layout,
                          "train": {"global_batch": 32, "stack": stack}})


def test_all_gather_context_parallelism_by_hand():
    # llama3-8b (32 layers, 8 kv heads of 128) at seq 8192 on cp 4 x dp 4: a rank holds 2048 tokens a
    # micro-batch; each block gathers its K and V (2048 x 1024 bf16 each) from 4 ranks in a node, and
    # reduce-scatters their gradients: 2 passes of 2 collectives, 8 micro-batches a step, all exposed.
    lay = Layout(dp=4, cp=4, microbatch=1, zero=3)
    run = _run("apogee")
    est = estimate(run, lay)
    link = comms.axis_link(lay, "cp", run.cluster)
    assert not link.crosses_nodes
    one = comms.all_gather(2048 * 1024 * 2 * 4, 4, link)  # one of K, V gathered: 4 x the local bytes
    want = 8 * 32 * 2 * 2 * one
    assert est.comm_s["cp"] == pytest.approx(want, rel=1e-12)
    assert est.comm_exposed_s["cp"] == est.comm_s["cp"]
    # Full recompute gathers again in the recomputed forward.
    full = estimate(run, Layout(dp=4, cp=4, microbatch=1, zero=3, recompute="full"))
    assert full.comm_s["cp"] == pytest.approx(want * 3 / 2, rel=1e-12)


def test_megatron_ring_hides_behind_attention_unless_told_all_gather():
    lay = Layout(dp=4, cp=4, microbatch=1, zero=1)
    ring = estimate(_run("megatron"), lay)
    assert 0 < ring.comm_s["cp"] and ring.comm_exposed_s["cp"] < ring.comm_s["cp"]
    gathered = estimate(_run("megatron"), Layout(dp=4, cp=4, microbatch=1, zero=1, cp_comm="all_gather"))
    apogee = estimate(_run("apogee"), Layout(dp=4, cp=4, microbatch=1, zero=3))
    assert gathered.comm_s["cp"] == pytest.approx(apogee.comm_s["cp"], rel=1e-12)
    assert gathered.comm_exposed_s["cp"] == gathered.comm_s["cp"]
    with pytest.raises(PlannerError, match="layout.cp_comm=p2p"):
        estimate(_run("apogee"), Layout(dp=4, cp=4, microbatch=1, zero=3, cp_comm="p2p"))
    with pytest.raises(PlannerError, match="layout.cp_comm must be one of"):
        _run("megatron", cp_comm="ring")
