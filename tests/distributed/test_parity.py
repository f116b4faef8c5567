"""Every parallel layout reproduces the single-process run: same loss and gradient norm per step."""

from __future__ import annotations

import pytest

from apogee.train.trainer import Trainer
from helpers import assert_matches_reference, launch_in_groups, read_metrics, tiny_config

LAYOUTS = {
    "fsdp2": ({"dp_shard": 2, "tp": 1}, {}),
    # Gradient accumulation (2 micro-batches a rank) with one reduction per step instead of one per micro-batch.
    "fsdp2_reduce_per_step": ({"dp_shard": 2, "tp": 1, "grad_reduce": "step"}, {}),
    "tp2": ({"dp_shard": 1, "tp": 2}, {}),
    "ddp2": ({"dp_replicate": 2, "dp_shard": 1, "tp": 1}, {}),
    "fsdp2_tp2_tied": ({"dp_shard": 2, "tp": 2}, {"tie_embeddings": "true"}),
    "hsdp2x2": ({"dp_replicate": 2, "dp_shard": 2, "tp": 1}, {}),
    "cp2": ({"dp_shard": 1, "cp": 2, "tp": 1}, {}),
    "cp2_tp2": ({"dp_shard": 1, "cp": 2, "tp": 2}, {}),
    "fsdp2_cp2": ({"dp_shard": 2, "cp": 2, "tp": 1}, {}),
    "pp2_cp2": ({"dp_shard": 1, "cp": 2, "tp": 1, "pp": 2}, {}),
    # Memory-wall switches change where bytes live, never the numbers.
    "fsdp2_offload_zero2": ({"dp_shard": 2, "tp": 1, "cpu_offload": True, "activation_offload": True,
                             "reshard_after_forward": "never"}, {}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """Single-process runs, untied and tied, by model section."""
    out = {}
    for tied in ("", "true"):
        run = tmp_path_factory.mktemp(f"single{tied}")
        Trainer(tiny_config(run, cache_dir, model={"tie_embeddings": tied})).fit()
        out[tied] = read_metrics(run)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Every layout's run, those on the same number of ranks in one launch."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in LAYOUTS}
    cfgs = {name: tiny_config(dirs[name], cache_dir, parallel=parallel, model=model)
            for name, (parallel, model) in LAYOUTS.items()}
    return dirs, launch_in_groups(cfgs)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, runs, reference):
    dirs, errors = runs
    assert errors[name] is None, errors[name]
    got, want = read_metrics(dirs[name]), reference[LAYOUTS[name][1].get("tie_embeddings", "")]
    assert_matches_reference(got, want, steps=10)


def test_one_rank_cpu_offload_matches_single_process(tmp_path, cache_dir, reference):
    # One process alone: FSDP2 over a 1-rank mesh (a process group of its own) for the offload policy.
    import torch.distributed as dist

    Trainer(tiny_config(tmp_path, cache_dir, parallel={"cpu_offload": True})).fit()
    assert not dist.is_initialized()  # the trainer's own group is gone with it
    assert_matches_reference(read_metrics(tmp_path), reference[""], steps=10)
