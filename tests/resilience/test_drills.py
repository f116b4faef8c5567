"""Fault drills under `apogee launch`'s supervisor (2 gloo ranks, tiny model): each job finishes on
its own, and its final model and optimizer state are bit-identical to an uninterrupted run's."""

from __future__ import annotations

import pytest
import torch

from apogee.checkpoint.dcp import list_checkpoints
from apogee.resilience.events import read_events
from apogee.resilience.supervisor import supervise
from helpers import full_state, read_metrics, tiny_config

pytestmark = pytest.mark.slow

STEPS = 10


def drill_config(run_dir, cache_dir, inject=(), **sections):
    # A short hang timeout only where a hang is the drill: a loaded CI machine must not fake one.
    hang_timeout = 4.0 if any(f.startswith("hang") for f in inject) else 30.0
    return tiny_config(
        run_dir, cache_dir, steps=STEPS, parallel={"dp_shard": 2},
        checkpoint={"interval": 3, "keep": 2, **sections.pop("checkpoint", {})},
        resilience={"max_restarts": 2, "hang_timeout_s": hang_timeout, "startup_timeout_s": 120.0,
                    "inject": list(inject)}, **sections,
    )


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("reference")
    result = supervise(drill_config(run_dir, cache_dir), 2, poll_s=0.1)
    assert result.step == STEPS
    return run_dir


def assert_same_end_state(run_dir, reference):
    a = full_state(reference / "checkpoints" / f"step-{STEPS:08d}")
    b = full_state(run_dir / "checkpoints" / f"step-{STEPS:08d}")
    assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(run_dir) == losses(reference)


def kinds(run_dir):
    return [e["event"] for e in read_events(run_dir)]


@pytest.mark.parametrize("fault,async_save", [
    ("kill:rank=1,step=5", False), ("kill-during-save:step=6", False), ("kill-during-save:step=6", True),
    ("corrupt-checkpoint:step=6", False), ("hang:rank=1,step=5", False),
], ids=["kill", "kill-during-save", "kill-during-async-save", "corrupt-checkpoint", "hang"])
def test_drill_recovers_bit_identical(fault, async_save, reference, tmp_path, cache_dir):
    cfg = drill_config(tmp_path, cache_dir, inject=[fault], checkpoint={"async_save": async_save})
    result = supervise(cfg, 2, poll_s=0.1)
    assert result.step == STEPS
    assert_same_end_state(tmp_path, reference)
    events = read_events(tmp_path)
    names = [e["event"] for e in events]
    assert "fault_injected" in names and "restart" in names and names[-1] == "job_finished", names
    restart = next(e for e in events if e["event"] == "restart")
    kind = fault.split(":")[0]
    if kind == "kill":
        assert restart["step"] == 3  # the newest durable checkpoint before step 5
        assert any(e["event"] == "rank_exited" and e["rank"] == 1 for e in events)
    elif kind == "kill-during-save":
        assert restart["step"] == 3  # step 6 was written but never made durable
    elif kind == "corrupt-checkpoint":
        fallback = next(e for e in events if e["event"] == "checkpoint_fallback")
        assert "step-00000006" in fallback["checkpoint"] and "crc32" in fallback["problem"]
        assert restart["step"] == 3
        assert (tmp_path / "checkpoints" / "step-00000006.corrupt").is_dir()
    elif kind == "hang":
        diagnosis = next(e for e in events if e["event"] == "diagnosis")
        assert diagnosis["suspects"] == [1], diagnosis
        text = open(diagnosis["file"]).read()
        assert "faults.py" in text and "_hang" in text  # rank 1's stack shows where it hangs
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")][-1] == STEPS
