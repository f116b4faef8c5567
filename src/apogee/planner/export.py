"""A planned layout -> an apogee training config (the engine's TOML sections) written with tomli_w."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from apogee.planner.errors import PlannerError
from apogee.planner.spec import Layout, RunSpec


def layout_to_config(run: RunSpec, lay: Layout) -> dict:
    """The engine config dict: [run] (device, for a CPU cluster), [model], [parallel], [train]. The zero
    level picks how dp runs (estimate.APOGEE_ZERO): 3 is dp_shard (FSDP2), 2 is dp_shard with
    reshard_after_forward = "never" (gathered weights kept from forward to backward: ZeRO-2's memory),
    0 is dp_replicate (whole state on every rank). apogee has no ZeRO-1: check_layout refuses it."""
    sharded = lay.zero >= 2
    parallel = {
        "dp_replicate": 1 if sharded else lay.dp,
        "dp_shard": lay.dp if sharded else 1,
        "tp": lay.tp,
        "pp": lay.pp,
        "cp": lay.cp,
        "sequence_parallel": bool(lay.sequence_parallel),
    }
    if lay.zero == 2 and lay.dp * lay.cp > 1:
        parallel["reshard_after_forward"] = "never"
    if lay.grad_reduce != "micro_batch":
        parallel["grad_reduce"] = lay.grad_reduce  # written where it is not the engine's default
    # Keys the engine's [parallel] does not have yet are written only when they hold something other
    # than the engine's fixed behaviour (one pipeline stage, no recompute), so a pp=1, no-recompute
    # layout's config stays minimal; engine_rejection() asks the engine whether it accepts the result.
    if lay.pp > 1:
        parallel.update(
            pp_schedule=lay.pp_schedule,
            pp_microbatches=run.global_batch // (lay.dp * lay.microbatch),
            pp_stages_per_rank=lay.virtual_stages,
        )
    if lay.recompute != "none":
        parallel["recompute"] = lay.recompute
    cfg: dict = {}
    if run.cluster.accel.name == "cpu":
        cfg["run"] = {"device": "cpu"}  # planned for CPU ranks: not whatever GPU the training host has
    if run.model.flavor:
        cfg["model"] = {"flavor": run.model.flavor}
    cfg["parallel"] = parallel
    cfg["train"] = {"global_batch": run.global_batch, "micro_batch": lay.microbatch, "seq_len": run.model.seq_len}
    if lay.compile:
        cfg["train"]["compile"] = True
    return cfg


def engine_rejection(run: RunSpec, lay: Layout) -> str | None:
    """Why the engine's own validation (apogee.config) would refuse this layout's config, or None.

    The planner asks the engine rather than restating its rules, so a plan never proposes a layout
    ``apogee train`` then rejects (tied embeddings under pp, schedule micro-batch rules, ...).
    """
    from apogee.config import ConfigError, config_from_dict

    try:
        config_from_dict(layout_to_config(run, lay), world_size=lay.tp * lay.pp * lay.dp * lay.cp)
    except ConfigError as exc:
        return str(exc)
    return None


def write_config(run: RunSpec, lay: Layout, path: str | Path) -> Path:
    path = Path(path)
    if not run.model.flavor:
        raise PlannerError(
            f"--write-config {path}: the engine builds models by flavor; give [model] flavor = \"...\" "
            "(shape-only run descriptions can be planned but not exported)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(layout_to_config(run, lay)).encode())
    return path
