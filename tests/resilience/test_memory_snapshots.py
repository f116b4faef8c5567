"""In-memory snapshot drills under `apogee launch` (2 gloo ranks, tiny model, durable checkpoints only
at the end): a killed rank is recovered from the snapshot in RAM (its own, or, when its RAM is lost
too, the peer's copy sent over the snapshot group), and the job ends bit-identical to an
uninterrupted run without snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest

from apogee.checkpoint.dcp import list_checkpoints
from apogee.resilience.events import read_events
from apogee.resilience.supervisor import supervise
from helpers import tiny_config
from test_drills import STEPS, assert_same_end_state, drill_config

pytestmark = pytest.mark.slow

DURABLE = 20  # > STEPS: the only durable checkpoint is the final one, so a restart has memory or nothing


def memory_config(run_dir, cache_dir, inject=(), memory_interval=2):
    return drill_config(run_dir, cache_dir, inject=inject,
                        checkpoint={"interval": DURABLE, "memory_interval": memory_interval})


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory, cache_dir):
    """The same job without snapshots or faults: snapshots must not change a single bit."""
    run_dir = tmp_path_factory.mktemp("plain")
    assert supervise(memory_config(run_dir, cache_dir, memory_interval=0), 2, poll_s=0.1).step == STEPS
    return run_dir


@pytest.mark.parametrize("lose_memory", [False, True], ids=["own-copy", "peer-copy"])
def test_kill_recovers_from_memory_bit_identical(lose_memory, plain_reference, tmp_path, cache_dir):
    inject = ["kill:rank=1,step=5"] + (["lose-memory:rank=1"] if lose_memory else [])
    cfg = memory_config(tmp_path, cache_dir, inject)
    assert supervise(cfg, 2, poll_s=0.1).step == STEPS
    events = read_events(tmp_path)
    names = [e["event"] for e in events]
    assert names.count("restart") == 1 and names[-1] == "job_finished", names
    restored = next(e for e in events if e["event"] == "snapshot_restored")
    restart = next(e for e in events if e["event"] == "restart")
    # Killed after step 5: the snapshot of step 4, not storage (which has nothing before step 10).
    assert restored["step"] == 4 and restored["durable_step"] == 0
    assert restart["step"] == 4 and "memory snapshot" in restart["checkpoint"]
    if lose_memory:
        assert sum(e["event"] == "fault_injected" and e["fault"] == "lose-memory" for e in events) == 1
        assert restored["sources"] == {"0": "own", "1": "peer: copy held by rank 0"}
    else:
        assert restored["sources"] == {"0": "own", "1": "own"}
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [STEPS]
    assert_same_end_state(tmp_path, plain_reference)  # model, optimizer and every logged loss
    token = (tmp_path / "memory-snapshots.id").read_text().strip()
    assert not (Path(cfg.checkpoint.memory_dir) / f"apogee-{token}").exists()  # RAM freed at the end


def test_fsdp_x_tp_peer_copy_bit_identical(tmp_path, cache_dir):
    """4 ranks as dp_shard=2 x tp=2 (DTensor shards of both kinds): rank 2 dies with its RAM; its
    shard comes from rank 3's copy, and the job ends equal to an uninterrupted run of that layout."""
    plain, drilled = tmp_path / "plain", tmp_path / "drilled"
    layout = {"parallel": {"dp_shard": 2, "tp": 2}}

    def config(run_dir, inject=(), memory_interval=2):
        return tiny_config(run_dir, cache_dir, steps=STEPS, **layout,
                           checkpoint={"interval": DURABLE, "memory_interval": memory_interval},
                           resilience={"max_restarts": 1, "hang_timeout_s": 60.0, "startup_timeout_s": 180.0,
                                       "inject": list(inject)})

    assert supervise(config(plain, memory_interval=0), 4, poll_s=0.1).step == STEPS
    assert supervise(config(drilled, ["kill:rank=2,step=7", "lose-memory:rank=2"]), 4, poll_s=0.1).step == STEPS
    restored = next(e for e in read_events(drilled) if e["event"] == "snapshot_restored")
    assert restored["step"] == 6
    assert restored["sources"] == {"0": "own", "1": "own", "2": "peer: copy held by rank 3", "3": "own"}
    assert_same_end_state(drilled, plain)
