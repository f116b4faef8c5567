"""Checkpoints with ``torch.distributed.checkpoint``: every rank writes its own shards, in parallel.

Layout: ``RUN_DIR/checkpoints/step-NNNNNNNN/``. A save goes to ``step-NNNNNNNN.tmp`` and is renamed
only once every rank has finished, so a directory without the suffix is always complete; a crash
mid-save leaves the previous checkpoint as the latest.

What is saved: the model and optimizer (sharded, as DTensors, so a later load may reshard), the
trainer's step and data position, and each rank's RNG state. The learning-rate schedule is a
function of the step and needs no state of its own.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns when it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: Path, *, keep: int):
        self.root = root
        self.keep = keep

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir(parents=True)
        _barrier()
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "trainer": trainer_state,
            # Per-rank key: each rank's generator is its own (the rest is deduplicated across ranks).
            f"rng.rank{_rank()}": torch.get_rng_state(),
        }
        with single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for _, path in list_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainer_state: dict) -> dict:
        """Load ``path`` into the (already parallelised) model and optimizer.

        ``trainer_state`` is a template with every key the trainer saved (DCP loads by key); the
        loaded values come back in a new dict.
        """
        state = {"model": get_model_state_dict(model), "trainer": trainer_state}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        rng_key = f"rng.rank{_rank()}"
        saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if rng_key in saved_keys:
            state[rng_key] = torch.get_rng_state()
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"])
        if rng_key in state:
            torch.set_rng_state(state[rng_key])
        return state["trainer"]
