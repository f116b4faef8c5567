"""Elastic shrink (2 "nodes" x 2 gloo ranks on this host, tiny model): rank 3 computes 4x slower;
with resilience.exclude_stragglers the job checkpoints, node 1 (ranks 2, 3) leaves, node 0
re-rendezvouses alone, re-plans dp_shard=2 x tp=2 into tp=2 and goes on. The losses after the
shrink equal a run restarted from an uninterrupted run's checkpoint at that step on 2 ranks with
that layout, and the first of them equals the uninterrupted 4-rank run's: the same data order."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
from helpers import read_metrics, tiny_config

from apogee.checkpoint.manifest import Manifest
from apogee.launch import launch_local
from apogee.resilience.events import read_events

pytestmark = pytest.mark.slow

STEPS = 12
LAYOUT = {"dp_shard": 2, "tp": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_shrink_4_to_2_ranks_replans_and_keeps_the_data_order(tmp_path, cache_dir):
    run = tmp_path / "shrink"
    cfg = tiny_config(run, cache_dir, steps=STEPS, parallel=LAYOUT,
                      resilience={"max_restarts": 0, "hang_timeout_s": 60.0, "startup_timeout_s": 120.0,
                                  "straggler_steps": 3, "straggler_factor": 1.5, "exclude_stragglers": True,
                                  "inject": ["slow:rank=3,factor=4"]})
    toml = tmp_path / "shrink.toml"
    toml.write_text(cfg.to_toml())
    endpoint = f"localhost:{free_port()}"
    command = [sys.executable, "-m", "apogee.cli", "launch", str(toml), "--nproc", "2", "--nnodes", "1:2",
               "--rdzv-endpoint", endpoint]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
             for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=240)[0])
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(outputs)[-6000:]

    events = read_events(run)
    kinds = lambda kind: [e for e in events if e["event"] == kind]
    [straggler] = kinds("straggler")
    [exclusion] = kinds("exclusion")
    [replanned] = kinds("replanned")
    assert (straggler["rank"], straggler["node"]) == (3, 1), straggler
    assert (exclusion["rank"], exclusion["node"], exclusion["ranks"], exclusion["world_after"]) == (3, 1, [2, 3], 2)
    assert replanned["world"] == 2 and replanned["excluded"][0]["rank"] == 3 and replanned["excluded"][0]["node"] == 1
    assert replanned["after"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 2}, replanned
    assert replanned["dropped_faults"] == ["slow:rank=3,factor=4"]
    assert len(kinds("node_left")) == 1 and len(kinds("shrink")) == 1 and len(kinds("job_finished")) == 1
    step = exclusion["step"]
    assert 1 < step < STEPS
    final = Manifest.read(run / "checkpoints" / f"step-{STEPS:08d}")
    assert final.layout["world_size"] == 2 and final.layout["tp"] == 2

    # Reference: an uninterrupted 4-rank run that checkpoints at the exclusion step and goes one more
    # step, then 2 ranks as tp=2 restarted from that checkpoint.
    ref4, ref2 = tmp_path / "ref4", tmp_path / "ref2"
    launch_local(tiny_config(ref4, cache_dir, steps=STEPS, parallel=LAYOUT, checkpoint={"interval": step},
                             run={"stop_at_step": step + 1}), 4)
    launch_local(tiny_config(ref2, cache_dir, steps=STEPS, parallel={"dp_shard": 1, "tp": 2},
                             checkpoint={"resume": str(ref4 / "checkpoints" / f"step-{step:08d}")}), 2)
    got = {r["step"]: r for r in read_metrics(run)}
    assert sorted(got) == list(range(1, STEPS + 1))
    before = {r["step"]: r for r in read_metrics(ref4)}
    after = {r["step"]: r for r in read_metrics(ref2)}
    assert sorted(after) == list(range(step + 1, STEPS + 1))
    for s in range(1, step + 1):  # before the shrink: the same layout, the same losses
        assert math.isclose(got[s]["loss"], before[s]["loss"], rel_tol=1e-5), s
    for s in range(step + 1, STEPS + 1):  # after it: what a restart on 2 ranks as tp=2 gives
        assert math.isclose(got[s]["loss"], after[s]["loss"], rel_tol=1e-5), (s, got[s]["loss"], after[s]["loss"])
        assert got[s]["tokens"] == after[s]["tokens"]
        if "val_loss" in after[s]:
            assert math.isclose(got[s]["val_loss"], after[s]["val_loss"], rel_tol=1e-5), s
    # The first step after the shrink takes the batch the 4-rank job would have taken next.
    assert math.isclose(got[step + 1]["loss"], before[step + 1]["loss"], rel_tol=1e-5)
