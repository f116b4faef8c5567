"""Resume with async checkpoints is bit-identical; resume into another layout (DCP reshards, the data
position is a global count) gives the loss that continuing unchanged gives."""

from __future__ import annotations

import math

import pytest
import torch

from apogee.checkpoint.dcp import list_checkpoints
from apogee.launch import launch_local, launch_ranks
from helpers import read_metrics, run_in_turn, tiny_config
from test_drills import full_state

pytestmark = pytest.mark.slow


def test_async_resume_is_bit_identical(tmp_path, cache_dir):
    parallel = {"dp_shard": 2, "tp": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ck = {"interval": 5, "async_save": True}
    launch_ranks(run_in_turn, [tiny_config(straight, cache_dir, parallel=parallel, checkpoint=ck),
                               tiny_config(resumed, cache_dir, parallel=parallel, checkpoint=ck, run={"stop_at_step": 5})],
                 nproc=4)  # one launch; the resume below is a fresh one
    assert [step for step, _ in list_checkpoints(resumed / "checkpoints")] == [5]
    launch_local(tiny_config(resumed, cache_dir, parallel=parallel, checkpoint=ck), 4)
    a, b = full_state(straight / "checkpoints" / "step-00000010"), full_state(resumed / "checkpoints" / "step-00000010")
    assert set(a) == set(b) and any(k.startswith("optim.state.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda d: [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(d)]  # noqa: E731
    assert losses(resumed) == losses(straight)


def test_resume_into_another_layout(tmp_path, cache_dir):
    model = {"flavor": "tiny", "n_kv_heads": 4, "tie_embeddings": "false"}  # tp=4: 4 kv heads; pp: untied
    base = tmp_path / "dp2xtp2"
    step5 = base / "checkpoints" / "step-00000005"
    layouts = {"tp4": {"dp_shard": 1, "tp": 4}, "dp4": {"dp_shard": 4, "tp": 1},
               "pp2xdp2": {"pp": 2, "dp_shard": 2, "tp": 1}}
    # Checkpoint at step 5 and go on unchanged to step 6: the reference loss.
    launch_local(tiny_config(base, cache_dir, steps=8, model=model, parallel={"dp_shard": 2, "tp": 2},
                             checkpoint={"interval": 5}, run={"stop_at_step": 6}), 4)
    # Each other layout resumes from that step-5 checkpoint and takes step 6 (one launch, in turn).
    launch_ranks(run_in_turn, [tiny_config(tmp_path / name, cache_dir, steps=8, model=model, parallel=parallel,
                                           checkpoint={"resume": str(step5)}, run={"stop_at_step": 6})
                               for name, parallel in layouts.items()], nproc=4)
    want = next(r["loss"] for r in read_metrics(base) if r["step"] == 6)
    for name in layouts:
        run_dir = tmp_path / name
        got = [r for r in read_metrics(run_dir)]
        assert [r["step"] for r in got] == [6], got  # resumed at 5: the first step it logs is 6
        assert math.isclose(got[0]["loss"], want, rel_tol=1e-5), (name, got[0]["loss"], want)
