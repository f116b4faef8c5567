"""A planned layout -> an apogee training config (the engine's TOML sections) written with tomli_w."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from apogee.config import Config, ParallelConfig
from apogee.planner.cluster import ACCELERATORS, GIB, Cluster
from apogee.planner.errors import PlannerError
from apogee.planner.memory import memory_per_gpu
from apogee.planner.spec import SCHEDULES, Layout, RunSpec, shape_from_args


def layout_to_config(run: RunSpec, lay: Layout) -> dict:
    """The engine config dict: [run] (device, for a CPU cluster), [model], [parallel], [train]. The zero
    level picks how dp runs (estimate.APOGEE_ZERO): 3 is dp_shard (FSDP2), 2 is dp_shard with
    reshard_after_forward = "never" (gathered weights kept from forward to backward: ZeRO-2's memory),
    0 is dp_replicate (whole state on every rank). apogee has no ZeRO-1: check_layout refuses it. At
    zero 2 and 3, ``lay.dp_replicate`` replicas of dp / dp_replicate shards are HSDP."""
    sharded = lay.zero >= 2
    parallel = {
        "dp_replicate": lay.dp_replicate if sharded else lay.dp,
        "dp_shard": lay.dp // lay.dp_replicate if sharded else 1,
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


def engine_layout(cfg: Config, parallel: ParallelConfig) -> Layout | None:
    """The planner's Layout for an engine config and its resolved ``parallel`` (the inverse of
    ``layout_to_config``), or None where the planner does not price it: a schedule it has no bubble for
    (zbv, dualpipev), or offload to host memory. Replicas with something to shard over (dp_shard x cp
    > 1; apogee.parallel.mesh) are HSDP, replicas alone are zero 0."""
    from apogee.parallel.pipeline import stages_per_rank  # lazy: it imports torch

    p = parallel
    if p.cpu_offload or p.activation_offload:
        return None
    if p.pp > 1 and p.pp_schedule not in SCHEDULES:
        return None
    replicas_only = p.dp_replicate > 1 and p.dp_shard * p.cp == 1
    zero = 0 if replicas_only else 2 if p.reshard_after_forward == "never" else 3
    schedule = p.pp_schedule if p.pp > 1 else "1f1b"
    return Layout(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, microbatch=cfg.train.micro_batch,
                  dp_replicate=1 if replicas_only else p.dp_replicate,
                  virtual_stages=stages_per_rank(schedule, p.pp_stages_per_rank) if p.pp > 1 else 1,
                  pp_schedule=schedule, recompute=p.recompute, sequence_parallel=p.tp > 1 and p.sequence_parallel,
                  zero=zero, grad_reduce=p.grad_reduce, dp_overlap=False, compile=cfg.train.compile)


def engine_memory_gib(cfg: Config, parallel: ParallelConfig, *, vocab: int, bf16: bool) -> float | None:
    """The planner's memory per GPU (GiB, its reserve for the CUDA context and workspaces included) for
    an engine config on ``parallel``, or None where ``engine_layout`` has no Layout for it."""
    lay = engine_layout(cfg, parallel)
    if lay is None:
        return None
    m = shape_from_args(cfg.model.args().with_vocab(vocab), seq_len=cfg.train.seq_len, vocab=vocab)
    # Any GPU of the table: the memory model reads only its reserve, 2.5 GiB on every GPU (cluster.py).
    cluster = Cluster(accel=ACCELERATORS["h100-80gb"], gpus=lay.world, gpus_per_node=min(lay.world, 8))
    mem = memory_per_gpu(m, lay, cluster, global_batch=cfg.train.global_batch, precision="bf16" if bf16 else "fp32")
    return mem.total / GIB


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
