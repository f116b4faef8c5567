"""A randomized drill: 5 kills at seeded random (rank, step) in one supervised run; the job restarts
from its latest checkpoint each time and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import random

import pytest

from apogee.resilience.events import read_events
from apogee.resilience.supervisor import supervise
from helpers import full_state, tiny_config
from test_drills import losses

pytestmark = pytest.mark.slow

STEPS, KILLS, SEED = 12, 5, 20240611


def kill_config(run_dir, cache_dir, inject=()):
    return tiny_config(run_dir, cache_dir, steps=STEPS, parallel={"dp_shard": 2}, eval={"interval": 0},
                       checkpoint={"interval": 2, "keep": 2},
                       resilience={"max_restarts": KILLS, "hang_timeout_s": 30.0, "startup_timeout_s": 120.0,
                                   "inject": list(inject)})


def test_five_random_kills_end_bit_identical(tmp_path, cache_dir):
    rng = random.Random(SEED)
    kills = [f"kill:rank={rng.randrange(2)},step={rng.randint(1, STEPS)}" for _ in range(KILLS)]
    straight, drilled = tmp_path / "straight", tmp_path / "drilled"
    assert supervise(kill_config(straight, cache_dir), 2, poll_s=0.1).step == STEPS
    assert supervise(kill_config(drilled, cache_dir, kills), 2, poll_s=0.1).step == STEPS
    events = read_events(drilled)
    assert sum(e["event"] == "fault_injected" for e in events) == KILLS, kills
    # Kills at one step (on both ranks) fall in one attempt: one restart per distinct step.
    assert sum(e["event"] == "restart" for e in events) == len({k.rsplit("=", 1)[1] for k in kills}), kills
    a, b = (full_state(d / "checkpoints" / f"step-{STEPS:08d}") for d in (straight, drilled))
    assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch_equal(a[key], b[key]), (key, kills)
    assert losses(drilled) == losses(straight)


def torch_equal(x, y):
    import torch

    return torch.equal(x, y)
