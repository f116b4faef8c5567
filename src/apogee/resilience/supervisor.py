"""``apogee launch``: the job under torchrun's elastic agent, supervised.

The agent (``torch.distributed.launcher.api``, c10d rendezvous) starts the ranks and, when one dies,
stops the others and starts them all again, up to ``resilience.max_restarts`` times; each new
attempt resumes from the latest durable checkpoint (the trainer always resumes on a restart). Around
it this module adds what the agent does not do: the watchdog thread (dead ranks, hangs with stack
dumps and a diagnosis, see ``watchdog.py``) and the job's events in ``RUN_DIR/events.jsonl``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass

from apogee.config import Config
from apogee.resilience.events import EventLog
from apogee.resilience.heartbeat import heartbeat_dir
from apogee.resilience.watchdog import Watchdog


class JobFailed(RuntimeError):
    """The job failed more often than resilience.max_restarts allows."""


@dataclass
class Nodes:
    min: int = 1
    max: int = 1

    @classmethod
    def parse(cls, text: str) -> "Nodes":
        lo, _, hi = text.partition(":")
        try:
            nodes = cls(int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"--nnodes must be N or MIN:MAX, got {text!r}") from None
        if not 1 <= nodes.min <= nodes.max:
            raise ValueError(f"--nnodes needs 1 <= MIN <= MAX, got {text!r}")
        return nodes


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def supervise(cfg: Config, nproc: int, *, nodes: Nodes | None = None, rdzv_endpoint: str = "",
              run_id: str = "", poll_s: float = 0.25):
    """Run ``cfg`` on ``nproc`` ranks per node under the elastic agent; return rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from apogee.launch import run_rank

    nodes = nodes or Nodes()
    run_dir = cfg.run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(heartbeat_dir(run_dir), ignore_errors=True)  # heartbeats of an earlier job
    events = EventLog(run_dir, source="launcher")
    r = cfg.resilience
    events("job_started", nproc=nproc, nnodes=f"{nodes.min}:{nodes.max}", max_restarts=r.max_restarts,
           hang_timeout_s=r.hang_timeout_s, inject=list(r.inject))
    watchdog = Watchdog(run_dir, hang_timeout_s=r.hang_timeout_s, startup_timeout_s=r.startup_timeout_s,
                        events=events, log=_log, poll_s=poll_s)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    # The c10d rendezvous shares its TCPStore with the workers by default, and a restarted attempt
    # then reads the previous attempt's keys (gloo/NCCL peer addresses): init_process_group fails or
    # hangs (pytorch/pytorch#135712). A store per attempt, as before torch 2.5, restarts cleanly.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    launch = LaunchConfig(
        min_nodes=nodes.min,
        max_nodes=nodes.max,
        nproc_per_node=nproc,
        # Every node's agent must name the same run; one node alone may pick a fresh one.
        run_id=run_id or (f"apogee-{cfg.run.name}" if rdzv_endpoint else f"apogee-{uuid.uuid4().hex[:8]}"),
        rdzv_backend="c10d",
        rdzv_endpoint=rdzv_endpoint or "localhost:0",
        max_restarts=r.max_restarts,
        monitor_interval=0.2,
        start_method="spawn",
    )
    start = time.time()
    watchdog.start()
    try:
        results = elastic_launch(launch, run_rank)(cfg)
    except ChildFailedError as exc:
        failures = {rank: f.message or f"exit code {f.exitcode}" for rank, f in exc.failures.items()}
        events("job_failed", after_s=round(time.time() - start, 1), failures=failures,
               rank_exits=watchdog.failures, hangs=watchdog.hangs)
        raise JobFailed(
            f"the job failed after {r.max_restarts} restart(s) (resilience.max_restarts); "
            f"see {run_dir / 'events.jsonl'}"
        ) from None
    finally:
        watchdog.stop()
        watchdog.join()
    result = results[0] if 0 in results else next(iter(results.values()))  # rank 0 may be on another node
    if getattr(result, "stopped", None):  # repeated anomalies: restarting would only loop
        events("job_stopped", after_s=round(time.time() - start, 1), step=result.step, reason=result.stopped)
        raise JobFailed(result.stopped)
    events("job_finished", after_s=round(time.time() - start, 1), step=result.step,
           rank_exits=watchdog.failures, hangs=watchdog.hangs)
    return result
