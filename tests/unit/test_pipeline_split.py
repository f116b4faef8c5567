"""Pipeline stages by layer: balanced splits, torch's stage placements, and config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from apogee.config import ConfigError, load_config, validate
from apogee.models.flavors import get_flavor
from apogee.models.llama import Transformer
from apogee.parallel.pipeline import SCHEDULES, available_schedules, split_layers, split_model, stage_ids, stage_owner


def test_split_layers_even_and_balanced():
    tiny = get_flavor("tiny").with_vocab(256)
    assert split_layers(tiny, 2, 32) == [range(0, 2), range(2, 4)]
    assert split_layers(tiny, 4, 32) == [range(i, i + 1) for i in range(4)]
    # llama-1b: the output projection (128256 x 2048) costs about 4 layers, so the last stage holds fewer.
    big = get_flavor("llama-1b")
    counts = [len(r) for r in split_layers(big, 4, 2048)]
    assert sum(counts) == big.n_layers and min(counts) >= 1
    assert counts[-1] < counts[0]
    # Without a head to account for (vocab 0), layers spread evenly, extra ones to the early stages.
    assert [len(r) for r in split_layers(dataclasses.replace(tiny, n_layers=6, vocab_size=0), 4, 32)] == [2, 2, 1, 1]


@pytest.mark.parametrize("style,per_rank", [("single", 1), ("loop", 2), ("loop", 3), ("v", 2)])
def test_stage_placement_covers_every_stage_once(style, per_rank):
    pp = 4
    placed = {s: r for r in range(pp) for s in stage_ids(r, pp, per_rank, style)}
    assert sorted(placed) == list(range(pp * per_rank))
    assert all(stage_owner(s, pp, style) == r for s, r in placed.items())
    if style == "v":
        assert placed[0] == placed[2 * pp - 1] == 0  # V shape: first and last stage on rank 0
    if style == "loop":
        assert stage_ids(1, pp, per_rank, style) == [1 + i * pp for i in range(per_rank)]


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "zbv"])
def test_split_model_partitions_parameters_under_full_names(schedule):
    args = get_flavor("tiny").with_vocab(256)
    with torch.device("meta"):
        full = {n for n, _ in Transformer(args).named_parameters()}
    seen = []
    for pp_rank in range(2):
        with torch.device("meta"):
            model = Transformer(args)
        per_rank = 1 if schedule == "1f1b" else 2
        union, stages = split_model(model, pp_rank=pp_rank, pp=2, schedule=schedule, per_rank=per_rank, seq_len=32)
        names = {n for n, _ in union.named_parameters()}
        assert names <= full
        # The stages share the union's parameters: together exactly the union, each once.
        stage_params = [id(p) for _, m in stages for p in m.parameters()]
        assert sorted(stage_params) == sorted(id(p) for p in union.parameters())
        seen.extend(names)
    assert sorted(seen) == sorted(full)  # every parameter on exactly one pp rank


def _cfg(**parallel):
    return load_config(None, {"model": {"flavor": "tiny"}, "parallel": {"dp_shard": 1, **parallel},
                              "train": {"global_batch": 8, "micro_batch": 2, "seq_len": 32}})


@pytest.mark.parametrize("parallel,message", [
    ({"pp": 2, "pp_schedule": "wavefront"}, "parallel.pp_schedule must be one of"),
    ({"pp": 2, "pp_schedule": "1f1b", "pp_stages_per_rank": 2}, "parallel.pp_stages_per_rank=1"),
    ({"pp": 2, "pp_schedule": "interleaved-1f1b", "pp_stages_per_rank": 1}, "parallel.pp_stages_per_rank >= 2"),
    ({"pp": 2, "pp_schedule": "interleaved-1f1b", "pp_stages_per_rank": 3}, "model.n_layers=4 cannot fill"),
    ({"pp": 8, "pp_schedule": "gpipe"}, "model.n_layers=4 cannot fill"),
    ({"pp": 4, "pp_schedule": "1f1b", "pp_microbatches": 8}, r"parallel.pp_microbatches=8 x train.micro_batch=2"),
    ({"pp": 4, "dp_shard": 2, "pp_schedule": "1f1b"}, r"needs the number of micro-batches \(2,"),
    ({"pp": 2, "dp_shard": 2, "pp_schedule": "zbv"}, "at least the 4 stages"),
    ({"pp": 2, "recompute": "some"}, "parallel.recompute must be"),
])
def test_pipeline_config_rejections_name_the_key(parallel, message):
    with pytest.raises(ConfigError, match=message) as info:
        _cfg(**parallel)
    assert "\n" not in str(info.value)


def test_pipeline_tied_embeddings_only_where_first_and_last_stages_differ_in_rank():
    tied = {"flavor": "tiny", "tie_embeddings": "true"}
    assert validate(load_config(None, {"model": tied, "parallel": {"dp_shard": 1, "pp": 2}})).pp == 2
    for name in {"zbv", "dualpipev"} & set(available_schedules()):  # V: both ends on rank 0
        with pytest.raises(ConfigError, match="model.tie_embeddings"):
            load_config(None, {"model": tied, "parallel": {"dp_shard": 1, "pp": 2, "pp_schedule": name}})


def test_pipeline_rejects_split_backward_compile():
    if "zero-bubble" in available_schedules():
        with pytest.raises(ConfigError, match="train.compile=false"):
            load_config(None, {"model": {"flavor": "tiny"}, "train": {"compile": True},
                               "parallel": {"dp_shard": 1, "pp": 2, "pp_schedule": "zero-bubble"}})


def test_pipeline_layouts_accepted():
    for name in available_schedules():
        cfg = _cfg(pp=2, pp_schedule=name)
        assert validate(cfg).pp == 2
    assert set(available_schedules()) <= set(SCHEDULES)
    assert {"gpipe", "1f1b", "interleaved-1f1b"} <= set(available_schedules())
