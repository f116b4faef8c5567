"""Elastic shrink, the parts that need no process group: the re-plan rule for a smaller world, the
exclusion decision every rank takes from the gathered table, and the config key."""

from __future__ import annotations

from pathlib import Path

import pytest

from apogee.config import ConfigError, load_config
from apogee.resilience.elastic import Elastic, Shrink
from apogee.resilience.replan import fit_world, replan

TINY = {"model": {"flavor": "tiny", "n_kv_heads": 4, "tie_embeddings": "false"},
        "train": {"global_batch": 8, "micro_batch": 2, "seq_len": 32}}


def cfg_with(parallel, **sections):
    return load_config(None, {**TINY, "parallel": parallel, **sections})


@pytest.mark.parametrize("parallel, world, want", [
    # Data parallelism absorbs the shrink; tp / cp / pp (the model's cut) stay.
    ({"dp_shard": 2, "tp": 2}, 2, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 2}),
    ({"dp_shard": 4, "tp": 1}, 2, {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 1}),
    ({"dp_replicate": 2, "dp_shard": 2, "tp": 2}, 4, {"pp": 1, "dp_replicate": 2, "dp_shard": 1, "cp": 1, "tp": 2}),
    ({"pp": 2, "dp_shard": 2, "tp": 1, "pp_microbatches": 2}, 2, {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}),
    ({"dp_shard": 2, "cp": 2, "tp": 1}, 2, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 1}),
    # A model-parallel degree larger than the world: the fewest halvings (tp 4 -> 2, not 1).
    ({"dp_shard": 1, "tp": 4}, 2, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 2}),
    # dp_replicate no longer divides: it goes before any model-parallel degree does.
    ({"dp_replicate": 4, "dp_shard": 1, "tp": 2}, 4, {"pp": 1, "dp_replicate": 2, "dp_shard": 1, "cp": 1, "tp": 2}),
])
def test_replan_keeps_the_model_cut(parallel, world, want):
    cfg = cfg_with(parallel)
    new_cfg, layout = replan(cfg, world)
    assert layout.degrees() == want
    assert new_cfg.train == cfg.train  # same global batch, micro-batch, seed: the same data order
    assert layout.pp_microbatches == (parallel.get("pp_microbatches", 0) if layout.dp == cfg.parallel.dp else 0)


def test_replan_with_no_fitting_layout_names_the_keys():
    # 3 ranks: tp=3 does not divide the 4 heads, dp=3 not the global batch of 8, cp=3 not seq_len 32,
    # and pp=3 under interleaved-1f1b needs 6 stages of the 4 layers.
    cfg = load_config(None, {**TINY, "parallel": {"dp_shard": 2, "tp": 2, "pp_schedule": "interleaved-1f1b"}})
    with pytest.raises(ConfigError, match=r"no parallel layout fits the elastic world of 3 ranks.*parallel\.\*"):
        replan(cfg, 3)
    assert replan(cfg_with({"dp_shard": 2, "tp": 2}), 3)[1].pp == 3  # untied: 3 pipeline stages fit


def test_fit_world_replans_only_elastic_jobs_and_drops_gone_ranks_faults():
    cfg = cfg_with({"dp_shard": 2, "tp": 2}, resilience={"inject": ["slow:rank=3,factor=3", "kill:rank=1,step=4"]})
    same, layout = fit_world(cfg, 4, elastic=Elastic(1, 2))
    assert same is cfg and layout.degrees()["dp_shard"] == 2  # it fits: nothing re-planned
    with pytest.raises(ConfigError, match="world size is 2"):
        fit_world(cfg, 2, elastic=Elastic(2, 2))  # a fixed-size job keeps the configured layout's error
    events, lines = [], []
    excluded = ({"rank": 3, "node": 1},)
    new_cfg, layout = fit_world(cfg, 2, elastic=Elastic(1, 2, excluded), log=lines.append,
                                events=lambda kind, **f: events.append((kind, f)))
    assert layout.degrees() == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 2}
    assert new_cfg.resilience.inject == ("kill:rank=1,step=4",)  # rank 3 is gone with its node
    [(kind, fields)] = events
    assert kind == "replanned" and fields["after"]["tp"] == 2 and fields["excluded"] == [{"rank": 3, "node": 1}]
    assert fields["global_batch"] == 8 and fields["dropped_faults"] == ["slow:rank=3,factor=3"]
    assert len(lines) == 1 and "re-planned as tp2" in lines[0]

    # Node 0 (ranks 0, 1) left: its drills leave with it, though ranks 0 and 1 exist again (new processes).
    gone = Elastic(1, 2, ({"rank": 1, "node": 0, "ranks": [0, 1]},))
    cfg = cfg_with({"dp_shard": 2, "tp": 2}, resilience={"inject": ["slow:rank=1,factor=3", "nan:step=9"]})
    new_cfg, _ = fit_world(cfg, 2, elastic=gone, log=lines.append)
    assert new_cfg.resilience.inject == ("nan:step=9",)
    # The ranks inject from the original list (its positions name the fire-once markers), skipping them.
    from apogee.resilience.faults import FaultInjector

    injector = FaultInjector(cfg.resilience.inject, rank=1, run_dir=Path("/nonexistent"), skip_ranks=gone.gone_ranks)
    assert [(f.index, f.kind) for f in injector.faults] == [(1, "nan")]


def _shrink(tmp_path, elastic, *, world=4, replans=lambda w: None):
    events, lines = [], []
    s = Shrink(tmp_path, enabled=True, elastic=elastic, rank=0, world=world, replans=replans,
               events=lambda kind, **f: events.append((kind, f)), log=lines.append)
    return s, events, lines


def test_shrink_decision(tmp_path):
    found = [{"rank": 3, "step": 6, "vs_peers": 2.5}]
    s, events, _ = _shrink(tmp_path, Elastic(1, 2))
    s.consider(6, found, nodes=[0, 0, 1, 1])
    assert s.pending["rank"] == 3 and s.pending["node"] == 1
    assert (s.pending["world_after"], s.pending["nodes_after"], s.pending["ranks"]) == (2, 1, [2, 3])
    assert events == []
    record = s.leave(6, tmp_path / "step-6")
    assert record["self_node"] == 0 and events[0][0] == "exclusion" and events[0][1]["node"] == 1

    # The only node, the job's minimum, a fixed-size job, no layout: one line, one event, no exclusion.
    for nodes, elastic, replans, reason in (([0, 0, 0, 0], Elastic(1, 2), None, "only node"),
                                            ([0, 0, 1, 1], Elastic(2, 3), None, "below the job's minimum of 2"),
                                            ([0, 0, 1, 1], None, None, "not an elastic"),
                                            ([0, 0, 1, 1], Elastic(1, 2), "no fit", "no layout fits the 2 remaining")):
        s, events, lines = _shrink(tmp_path, elastic, replans=lambda w, r=replans: r)
        s.consider(6, found, nodes)
        s.consider(7, found, nodes)  # reported once per node
        assert s.pending is None and len(lines) == 1 and reason in lines[0], lines
        assert [k for k, _ in events] == ["exclusion_skipped"] and events[0][1]["rank"] == 3

    s, events, _ = _shrink(tmp_path, Elastic(1, 2))
    s.enabled = False  # resilience.exclude_stragglers = false: report only
    s.consider(6, found, nodes=[0, 0, 1, 1])
    assert s.pending is None and events == []


def test_exclude_stragglers_is_accepted():
    cfg = load_config(None, {"resilience": {"exclude_stragglers": True}})
    assert cfg.resilience.exclude_stragglers is True


def test_peer_medians_equal_the_naive_median():
    """Every rank now scores every rank each step: the one-sort peer medians must be exactly the
    per-rank medians of the others (the exclusion decision depends on them bit for bit)."""
    import random
    import statistics

    from apogee.resilience.stragglers import peer_medians

    rng = random.Random(0)
    for n in range(2, 20):
        for _ in range(50):
            times = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]
            assert peer_medians(times) == [statistics.median(times[:r] + times[r + 1:]) for r in range(n)]


def test_replan_passes_over_layouts_the_planner_predicts_out_of_memory():
    """A shrink of an FSDP job raises each rank's share of the model state. With the planner's memory
    model against the device's (resilience.replan.capacity_check), the nearest layout that would not fit is
    passed over for the next that does; with none that fits, the shrink is refused (its reason named)."""
    from apogee.planner.export import engine_memory_gib
    from apogee.resilience.replan import capacity_check, replan_problem

    cfg = load_config(None, {"model": {"flavor": "llama3-8b"}, "parallel": {"dp_shard": 8, "tp": 1},
                             "train": {"global_batch": 32, "micro_batch": 1, "seq_len": 4096}})
    need = {world: engine_memory_gib(cfg, replan(cfg, world)[1], vocab=128256, bf16=True) for world in (8, 4)}
    assert need[4] > need[8]  # half the shards: twice the state a rank holds
    capacity = (need[4] + need[8]) / 2  # the shrunk dp_shard = 4 would not fit, the full job does
    fits = capacity_check(capacity)
    assert fits(cfg, replan(cfg, 8)[1]) is None
    _, layout = replan(cfg, 4, fits=fits)
    assert layout.dp_shard * layout.dp_replicate < 4 and layout.tp * layout.pp * layout.cp > 1  # model cut instead
    assert engine_memory_gib(cfg, layout, vocab=128256, bf16=True) <= capacity
    # With no layout of 2 ranks that fits, the shrink is refused, and the reason is the memory model's.
    assert "planner's memory model" in replan_problem(cfg, 2, capacity_check(need[8] / 3))
    assert replan_problem(cfg, 2) is None  # without the check the shrink would go ahead
    # At the restart after an exclusion, a layout that fills dp_shard (valid at any world) is checked too:
    # the same layout the shrink decision approved, not the one it passed over.
    filled = cfg.replace(parallel={"dp_shard": -1})
    excluded = Elastic(1, 2, ({"rank": 7, "node": 1, "ranks": [4, 5, 6, 7]},))
    _, restarted = fit_world(filled, 4, elastic=excluded, log=lambda line: None, fits=fits)
    assert restarted.degrees() == layout.degrees()
    _, unchecked = fit_world(filled, 4, elastic=Elastic(1, 2), fits=fits)  # no exclusion: the job's own choice
    assert unchecked.dp_shard == 4
