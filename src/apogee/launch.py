"""Start local ranks through torchrun's elastic launcher (``torch.distributed.launcher.api``).

``apogee train --nproc N`` calls ``launch_local``; under an existing ``torchrun`` job the CLI skips
this and each process runs ``run_rank`` directly.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from apogee.config import Config
from apogee.train.trainer import TrainResult, Trainer


def under_torchrun() -> bool:
    """True inside a process that torchrun (or its launcher API) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def run_rank(cfg: Config, elastic=None) -> TrainResult:
    """The entry point of every rank (``elastic``: apogee launch's ``resilience.elastic.Elastic``)."""
    return Trainer(cfg, elastic).fit()


def launch_local(cfg: Config, nproc: int) -> TrainResult:
    """Run ``nproc`` ranks on this host and return rank 0's result."""
    if nproc == 1:
        return run_rank(cfg)  # one process needs no process group, rendezvous or launcher
    return launch_ranks(run_rank, cfg, nproc=nproc)[0]


def launch_ranks(entry: Callable[..., Any], *args: Any, nproc: int) -> dict[int, Any]:
    """Run ``entry(*args)`` on ``nproc`` spawned local ranks (c10d rendezvous on a free port, as
    torchrun --standalone does); returns each rank's return value."""
    # The agent's INFO lines (rendezvous details) drown the training log; keep its warnings.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"apogee-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,  # restarts belong to the orchestrator (apogee launch), not plain train
        monitor_interval=0.2,
        start_method="spawn",
    )
    return elastic_launch(launch, entry)(*args)
