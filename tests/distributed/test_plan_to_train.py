"""plan -> --write-config -> train: the planner's config runs on CPU ranks as written."""

from __future__ import annotations

import pytest

from apogee.config import load_config
from apogee.launch import launch_local
from apogee.planner import run_from_dict, search
from apogee.planner.export import write_config
from helpers import read_metrics


@pytest.mark.parametrize("gpus,layout", [
    (2, {}),  # the search's choice
    (4, {"tp": 1, "pp": 1, "cp": 1, "zero": 3, "dp_replicate": 2}),  # HSDP: 2 replicas of 2 shards
])
def test_planned_config_trains(tmp_path, cache_dir, gpus, layout):
    run = run_from_dict({"model": {"flavor": "tiny", "seq_len": 32}, "cluster": {"gpu": "cpu", "gpus": gpus},
                         "layout": layout, "train": {"global_batch": 8}})
    best = search(run, top=1).ranked[0]
    path = write_config(run, best.layout, tmp_path / "planned.toml")
    cfg = load_config(path, {
        "run": {"dir": str(tmp_path / "run"), "log_interval": 1},
        "train": {"steps": 3},
        "data": {"max_bytes": 300_000, "cache_dir": str(cache_dir)},
        "eval": {"interval": 0, "batches": 1},
    })
    if layout:
        assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard) == (2, 2)
    result = launch_local(cfg, gpus)
    assert result.step == 3
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["tokens"] == 3 * 8 * 32
