"""Pipeline parallelism reproduces the single-process run: every schedule, virtual stages, and
composed with tensor, sequence and data parallelism (and activation recomputation) inside stages.

For each layout the first 8 steps' losses and gradient norms, and both validation losses, equal
those of one process with the same seed and global batch (rtol 1e-4; fp32 on gloo they agree to
about 1e-7). A run stopped and resumed under pp is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import pytest
import torch

from apogee.checkpoint.dcp import list_checkpoints
from apogee.launch import launch_local
from apogee.parallel.pipeline import available_schedules
from apogee.train.trainer import Trainer
from helpers import (
    assert_matches_reference,
    checkpoint_params,
    full_state,
    launch_in_groups,
    read_metrics,
    tiny_config,
)

# Reading a checkpoint back in the test process is single-process DCP, which warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 8
EVAL = {"interval": 4, "batches": 1}

# name: parallel section (the ranks are its product). tiny: 4 layers; global batch 8, micro-batch 2.
LAYOUTS = {
    "pp2_gpipe": {"pp": 2, "pp_schedule": "gpipe"},
    "pp2_1f1b": {"pp": 2, "pp_schedule": "1f1b"},
    "pp2_interleaved": {"pp": 2, "pp_schedule": "interleaved-1f1b", "pp_stages_per_rank": 2},
    "pp2_zero_bubble": {"pp": 2, "pp_schedule": "zero-bubble", "pp_stages_per_rank": 2},
    "pp2_zbv": {"pp": 2, "pp_schedule": "zbv"},
    "pp2_dualpipev": {"pp": 2, "pp_schedule": "dualpipev"},
    "tp2_pp2_recompute_full": {"pp": 2, "tp": 2, "pp_schedule": "1f1b", "recompute": "full"},
    "fsdp2_pp2_interleaved": {"pp": 2, "dp_shard": 2, "pp_schedule": "interleaved-1f1b"},
    "dp2_tp2_pp2_selective": {"pp": 2, "dp_shard": 2, "tp": 2, "pp_schedule": "1f1b", "recompute": "selective"},
}

RESUMED, STOPPED = "fsdp2_pp2_interleaved", "fsdp2_pp2_interleaved_stopped"  # the resume test's layout

# Tied embeddings: the first and last stages hold a copy each and sum their gradients.
TIED_LAYOUTS = {
    "pp2_1f1b_tied": {"pp": 2, "pp_schedule": "1f1b"},
    "pp4_gpipe_tied": {"pp": 4, "pp_schedule": "gpipe"},  # middle stages outside the pair
    "tp2_pp2_zero_bubble_tied": {"pp": 2, "tp": 2, "pp_schedule": "zero-bubble"},
    "fsdp2_pp2_interleaved_tied": {"pp": 2, "dp_shard": 2, "pp_schedule": "interleaved-1f1b"},
}
TIED = {"tie_embeddings": "true"}


def _schedule_available(parallel: dict) -> bool:
    return parallel.get("pp_schedule", "1f1b") in available_schedules()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The single-process run: its metrics and its final parameters."""
    run = tmp_path_factory.mktemp("single")
    Trainer(tiny_config(run, cache_dir, steps=STEPS, eval=EVAL)).fit()
    return read_metrics(run), checkpoint_params(run / "checkpoints" / f"step-{STEPS:08d}")


@pytest.fixture(scope="module")
def tied_reference(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("single_tied")
    Trainer(tiny_config(run, cache_dir, steps=STEPS, eval=EVAL, model=TIED)).fit()
    return read_metrics(run), checkpoint_params(run / "checkpoints" / f"step-{STEPS:08d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Every layout's run (untied and tied), those on the same number of ranks in one launch."""
    layouts = {name: (parallel, {}) for name, parallel in LAYOUTS.items()}
    layouts |= {name: (parallel, TIED) for name, parallel in TIED_LAYOUTS.items()}
    layouts = {name: spec for name, spec in layouts.items() if _schedule_available(spec[0])}
    dirs = {name: tmp_path_factory.mktemp(name) for name in [*layouts, STOPPED]}
    cfgs = {name: tiny_config(dirs[name], cache_dir, steps=STEPS, eval=EVAL, parallel=parallel, model=model)
            for name, (parallel, model) in layouts.items()}
    # The first half of the resume test: RESUMED's layout, stopped at step 4.
    cfgs[STOPPED] = tiny_config(dirs[STOPPED], cache_dir, steps=STEPS, eval=EVAL, parallel=LAYOUTS[RESUMED],
                                run={"stop_at_step": 4})
    return dirs, launch_in_groups(cfgs)


@pytest.mark.parametrize("name", LAYOUTS)
def test_pipeline_layout_matches_single_process(name, runs, reference):
    _check_layout(name, LAYOUTS[name], runs, reference)


@pytest.mark.parametrize("name", TIED_LAYOUTS)
def test_tied_embeddings_across_stages_match_single_process(name, runs, tied_reference):
    # The two copies' gradients are summed in another order than one process sums them; AdamW's
    # normalisation turns that rounding into parameter differences up to ~1.5e-5 (0.5% of one
    # step's lr) where a gradient element is near zero: parameters compare at atol 5e-5.
    _check_layout(name, TIED_LAYOUTS[name], runs, tied_reference, atol=5e-5)


def _check_layout(name, parallel, runs, reference, atol=1e-5):
    if not _schedule_available(parallel):
        pytest.skip(f"torch {torch.__version__} lacks {parallel['pp_schedule']}")
    dirs, errors = runs
    assert errors[name] is None, errors[name]
    (want, want_params), got = reference, read_metrics(dirs[name])
    assert_matches_reference(got, want, steps=STEPS)
    # The checkpoint holds every parameter once, under the single-process names, at equal values.
    params = checkpoint_params(dirs[name] / "checkpoints" / f"step-{STEPS:08d}")
    assert set(params) == set(want_params)
    for key in params:
        torch.testing.assert_close(params[key], want_params[key], rtol=1e-3, atol=atol, msg=key)


def test_pipeline_resume_is_bit_identical(runs, cache_dir):
    """pp2 x fsdp2 with interleaved virtual stages: stop at step 4, resume, and reach the same
    parameters, optimizer state and losses at step 8 as one uninterrupted run (the matrix's), bit
    for bit."""
    dirs, errors = runs
    assert errors[STOPPED] is None and errors[RESUMED] is None, errors[STOPPED] or errors[RESUMED]
    straight, resumed = dirs[RESUMED], dirs[STOPPED]
    assert [step for step, _ in list_checkpoints(resumed / "checkpoints")] == [4]
    launch_local(tiny_config(resumed, cache_dir, steps=STEPS, eval=EVAL, parallel=LAYOUTS[RESUMED]), 4)

    a = full_state(straight / "checkpoints" / f"step-{STEPS:08d}")
    b = full_state(resumed / "checkpoints" / f"step-{STEPS:08d}")
    assert set(a) == set(b)
    assert any(k.startswith("optim.state.layers.3.") for k in a)  # the second stage's state too
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda d: [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(d)]  # noqa: E731
    assert losses(resumed) == losses(straight)
