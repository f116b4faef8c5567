"""Small, fast training runs for the tests: tiny model, stdlib corpus capped to a few hundred KB."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from apogee.config import Config, load_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_config(run_dir: Path, cache_dir: Path, *, steps: int = 10, **sections):
    overrides = {
        # gloo ranks on CPU by design, also on a GPU machine (tests/gpu sets run.device=cuda).
        "run": {"dir": str(run_dir), "log_interval": 1, "device": "cpu"},
        "model": {"flavor": "tiny"},
        "data": {"source": "stdlib", "tokenizer": "byte", "max_bytes": 300_000, "cache_dir": str(cache_dir)},
        "train": {"steps": steps, "seed": 7, "global_batch": 8, "micro_batch": 2, "seq_len": 32,
                  "lr": 3e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "eval": {"interval": 5, "batches": 1},
        "checkpoint": {"interval": 0, "resume": "auto"},
        "parallel": {"dp_shard": 1, "tp": 1},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(None, overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_params(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model parameters stored in a checkpoint, whatever layout wrote it."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    dcp.load(state, checkpoint_id=str(checkpoint))
    return state


def full_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model and optimizer), unsharded, without per-rank RNG states."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in metadata.state_dict_metadata.items()
        if hasattr(m, "size") and not k.startswith("rng.")
    }
    dcp.load(state, checkpoint_id=str(checkpoint))
    return state


def assert_matches_reference(got: list[dict], want: list[dict], *, steps: int, evals: int = 2) -> None:
    """A parallel run's metrics equal the single-process run's: loss, grad norm and val loss at
    rtol 1e-4 on every step, the same token counts, and the loss falls (it trains, not just agrees)."""
    import pytest

    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), g["step"]
        assert g["tokens"] == w["tokens"]
    val = [(g["val_loss"], w["val_loss"]) for g, w in zip(got, want) if "val_loss" in w]
    assert len(val) == evals
    for g, w in val:
        assert g == pytest.approx(w, rel=1e-4)
    assert got[-1]["loss"] < got[0]["loss"] - 0.5


def run_in_turn(cfgs: list[Config]) -> None:
    """One rank's entry point for several runs on the same ranks, one after another: each run then
    pays no process start, rendezvous or imports (most of a tiny run's time on 2 cores)."""
    import torch.distributed as dist

    from apogee.train.trainer import Trainer

    dist.init_process_group("gloo")
    try:
        for cfg in cfgs:
            Trainer(cfg).fit()
    finally:
        dist.destroy_process_group()


def launch_in_groups(cfgs: dict[str, Config]) -> dict[str, str | None]:
    """Run every config, those with the same world size in one launch; returns, per name, None or
    why its launch failed (each test then fails on its own line)."""
    from apogee.launch import launch_ranks

    by_world: dict[int, list[str]] = {}
    for name, cfg in cfgs.items():
        by_world.setdefault(math.prod(cfg.parallel.degrees().values()), []).append(name)
    errors: dict[str, str | None] = {}
    for world, names in sorted(by_world.items()):
        try:
            launch_ranks(run_in_turn, [cfgs[n] for n in names], nproc=world)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported by every test of the group
            error = f"the launch of {names} on {world} ranks failed: {type(exc).__name__}: {exc}"
        errors.update(dict.fromkeys(names, error))
    return errors
