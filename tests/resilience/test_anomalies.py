"""NaN and loss-spike drills (2 gloo ranks, tiny model): the job rolls back to its last checkpoint,
skips the bad step's batch, records it and finishes on its own with a finite loss; its end state is
bit-identical to an uninterrupted run told to skip the same windows from the start. Repeated
anomalies at one step stop the job with one clear message."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from apogee.resilience.anomalies import SKIPPED
from apogee.resilience.events import read_events
from apogee.resilience.supervisor import JobFailed, supervise
from helpers import read_metrics, tiny_config
from test_drills import full_state

pytestmark = pytest.mark.slow

STEPS, BAD = 10, 8  # checkpoints at 3, 6, 9: an anomaly at step 8 rolls back to 6 and replays step 7


def anomaly_config(run_dir, cache_dir, inject=(), memory_interval=0):
    return tiny_config(
        run_dir, cache_dir, steps=STEPS, parallel={"dp_shard": 2},
        checkpoint={"interval": 3, "keep": 2, "memory_interval": memory_interval},
        resilience={"max_restarts": 0, "hang_timeout_s": 30.0, "startup_timeout_s": 120.0, "anomaly_warmup": 3,
                    "inject": list(inject)},
    )


def skipped(run_dir):
    return [json.loads(line) for line in (run_dir / SKIPPED).read_text().splitlines()]


@pytest.fixture(scope="module")
def drilled(tmp_path_factory, cache_dir):
    """The nan and the spike drill, each at step BAD: both skip the same windows."""
    out = {}
    for kind in ("nan", "spike"):
        run_dir = tmp_path_factory.mktemp(kind)
        result = supervise(anomaly_config(run_dir, cache_dir, [f"{kind}:step={BAD}"]), 2, poll_s=0.1)
        assert result.step == STEPS and result.stopped is None
        out[kind] = run_dir
    return out


@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_anomaly_drill_rolls_back_and_skips(kind, drilled):
    run_dir = drilled[kind]
    [entry] = skipped(run_dir)
    assert entry["step"] == BAD and entry["reason"] == ("non-finite loss or gradient norm" if kind == "nan" else "loss spike")
    assert entry["windows"] == list(range(entry["first_window"], entry["first_window"] + 8)) == list(range(56, 64))
    assert len(entry["token_offsets"]) == 8
    events = read_events(run_dir)
    anomaly = next(e for e in events if e["event"] == "anomaly")
    assert anomaly["step"] == BAD and anomaly["rollback_to"] == 6
    assert [e["event"] for e in events][-1] == "job_finished"
    assert not any(e["event"] in ("restart", "rank_exited") for e in events)  # recovered in-process
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))  # each step once, replays included
    assert all(math.isfinite(r["loss"]) for r in metrics)


@pytest.fixture(scope="module")
def skip_reference(drilled, tmp_path_factory, cache_dir):
    """An uninterrupted run given the nan drill's skip list from the start."""
    run_dir = tmp_path_factory.mktemp("skip_reference")
    shutil.copy(drilled["nan"] / SKIPPED, run_dir / SKIPPED)
    assert supervise(anomaly_config(run_dir, cache_dir), 2, poll_s=0.1).step == STEPS
    return run_dir


def test_anomaly_recovery_is_deterministic(drilled, skip_reference):
    """An uninterrupted run given the same skip list from the start ends bit-identical."""
    assert skipped(drilled["spike"])[0]["windows"] == skipped(drilled["nan"])[0]["windows"]
    _assert_same_end_state(drilled, skip_reference)


def test_anomaly_rolls_back_to_the_memory_snapshot(skip_reference, tmp_path, cache_dir):
    """With in-memory snapshots every step, the nan at step 8 rolls back to step 7's snapshot
    (newer than the durable step 6), replays nothing twice, and ends bit-identical all the same."""
    result = supervise(anomaly_config(tmp_path, cache_dir, [f"nan:step={BAD}"], memory_interval=1), 2, poll_s=0.1)
    assert result.step == STEPS and result.stopped is None
    anomaly = next(e for e in read_events(tmp_path) if e["event"] == "anomaly")
    assert anomaly["rollback_to"] == BAD - 1 and "memory snapshot" in anomaly["checkpoint"]
    assert skipped(tmp_path)[0]["windows"] == list(range(56, 64))
    _assert_same_end_state({"nan-memory": tmp_path}, skip_reference)


def _assert_same_end_state(runs: dict, reference):
    ref = full_state(reference / "checkpoints" / f"step-{STEPS:08d}")
    for kind, run_dir in runs.items():
        got = full_state(run_dir / "checkpoints" / f"step-{STEPS:08d}")
        assert set(got) == set(ref)
        for key in ref:
            assert torch.equal(got[key], ref[key]), (kind, key)
        losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d)]  # noqa: E731
        assert losses(run_dir) == losses(reference), kind


def test_repeated_anomaly_stops_the_job(tmp_path, cache_dir):
    cfg = anomaly_config(tmp_path, cache_dir, ["nan:step=2,times=3"]).replace(train={"steps": 4})
    with pytest.raises(JobFailed, match="3 anomalies at step 2"):
        supervise(cfg, 2, poll_s=0.1)
    assert [e["step"] for e in skipped(tmp_path)] == [2, 2, 2]
    names = [e["event"] for e in read_events(tmp_path)]
    assert names.count("anomaly") == 2 and "anomaly_stop" in names and names[-1] == "job_stopped"
