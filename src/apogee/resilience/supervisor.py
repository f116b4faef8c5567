"""``apogee launch``: the job under torchrun's elastic agent, supervised.

The agent (``torch.distributed.launcher.api``, c10d rendezvous) starts the ranks and, when one dies,
stops the others and starts them all again, up to ``resilience.max_restarts`` times; each new
attempt resumes from the latest durable checkpoint (the trainer always resumes on a restart). Around
it this module adds what the agent does not do: the watchdog thread (dead ranks, hangs with stack
dumps and a diagnosis, see ``watchdog.py``), the job's events in ``RUN_DIR/events.jsonl``, and the
elastic shrink (``resilience.exclude_stragglers``, ``elastic.py``):

When the ranks exclude a straggler's node they save a durable checkpoint and all return, each with
the exclusion in its result. On the excluded node this supervisor stops (``node_left``) and does not
rejoin. On every other node it starts the agent again, with a new rendezvous id and the node range
capped at the nodes that remain (so the rendezvous completes as soon as they have all joined, with
no last-call wait), passing the exclusion to the ranks, which re-plan the layout for the smaller
world (``replan.py``) and resume from that checkpoint. With ``--rdzv-endpoint`` the supervisor on
the endpoint's host holds the c10d rendezvous store for its whole life (``RendezvousStore``), not
only for one agent's: the rounds after a shrink reuse it, and if that supervisor's node is the
excluded one it keeps serving the store until the job ends elsewhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from apogee.config import Config
from apogee.resilience.elastic import Elastic
from apogee.resilience.events import EventLog, read_events
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


JOB_END = ("job_finished", "job_failed", "job_stopped")


def _last_activity(run_dir: Path) -> float:
    """The newest modification time of the events and the ranks' heartbeats."""
    newest = 0.0
    for path in [Path(run_dir) / "events.jsonl", *heartbeat_dir(run_dir).glob("rank-*.json")]:
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            pass  # replaced while reading
    return newest


class RendezvousStore:
    """The c10d rendezvous TCPStore, hosted by this process for its whole life when the endpoint is
    on this host and no other process serves it yet. torch's rendezvous backend creates its store
    with ``multi_tenant=True``, so the agent of every round in this process reuses this server
    instead of starting (and, when the round ends, stopping) its own."""

    def __init__(self, endpoint: str):
        from datetime import timedelta

        from torch.distributed import TCPStore
        from torch.distributed.elastic.rendezvous.utils import (
            _matches_machine_hostname,
            parse_rendezvous_endpoint,
        )

        self.store = None
        host, port = parse_rendezvous_endpoint(endpoint, default_port=29400)
        if port == 0 or not _matches_machine_hostname(host):
            return
        try:
            self.store = TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=60))
        except (RuntimeError, ValueError):
            self.store = None  # another process on this host serves it (an other node's supervisor)

    @property
    def hosting(self) -> bool:
        return self.store is not None

    def linger(self, run_dir: Path, since: float, idle_s: float, log, poll_s: float = 0.5) -> None:
        """Keep serving until the job ends on the other nodes (a job_finished / job_failed /
        job_stopped event after ``since``), or nothing in the run directory has moved for ``idle_s``."""
        if not self.hosting:
            return
        log("apogee launch: this node hosts the rendezvous store; serving it until the job ends on the other nodes")
        while True:
            if any(e.get("event") in JOB_END and e.get("t", 0) > since for e in read_events(run_dir)):
                return
            if time.time() - max(_last_activity(run_dir), since) > idle_s:
                log(f"apogee launch: nothing moved in {run_dir} for {idle_s:.0f} s; no longer serving the rendezvous store")
                return
            time.sleep(poll_s)


def supervise(cfg: Config, nproc: int, *, nodes: Nodes | None = None, rdzv_endpoint: str = "",
              run_id: str = "", poll_s: float = 0.25):
    """Run ``cfg`` on ``nproc`` ranks per node under the elastic agent; return rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from apogee.launch import run_rank

    nodes = nodes or Nodes()
    elastic = Elastic(min_nodes=nodes.min, max_nodes=nodes.max)
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
    # Every node's agent must name the same run; one node alone may pick a fresh one.
    base_id = run_id or (f"apogee-{cfg.run.name}" if rdzv_endpoint else f"apogee-{uuid.uuid4().hex[:8]}")
    store = RendezvousStore(rdzv_endpoint) if rdzv_endpoint else None
    round_nodes = nodes
    start = time.time()
    watchdog.start()
    try:
        while True:
            launch = LaunchConfig(
                min_nodes=round_nodes.min,
                max_nodes=round_nodes.max,
                nproc_per_node=nproc,
                # A finished agent closes its rendezvous for good: each round after a shrink needs a
                # new id, the same on every remaining node.
                run_id=base_id + (f"-shrink{len(elastic.excluded)}" if elastic.excluded else ""),
                rdzv_backend="c10d",
                rdzv_endpoint=rdzv_endpoint or "localhost:0",
                max_restarts=r.max_restarts,
                monitor_interval=0.2,
                start_method="spawn",
            )
            try:
                results = elastic_launch(launch, run_rank)(cfg, elastic)
            except ChildFailedError as exc:
                failures = {rank: f.message or f"exit code {f.exitcode}" for rank, f in exc.failures.items()}
                events("job_failed", after_s=round(time.time() - start, 1), failures=failures,
                       rank_exits=watchdog.failures, hangs=watchdog.hangs)
                raise JobFailed(
                    f"the job failed after {r.max_restarts} restart(s) (resilience.max_restarts); "
                    f"see {run_dir / 'events.jsonl'}"
                ) from None
            result = results[0] if 0 in results else next(iter(results.values()))  # rank 0 may be on another node
            ex = result.exclusion
            if ex is None:
                break
            if ex["self_node"] == ex["node"]:  # this node is the straggler's: leave, do not rejoin
                events("node_left", node=ex["node"], rank=ex["rank"], step=ex["step"], checkpoint=ex["checkpoint"])
                _log(f"apogee launch: this node (node {ex['node']}, straggler rank {ex['rank']}) leaves the job at "
                     f"step {ex['step']}; the other node(s) go on from {ex['checkpoint']}")
                watchdog.stop()
                if store is not None:
                    store.linger(run_dir, since=time.time(), idle_s=max(r.startup_timeout_s, r.hang_timeout_s), log=_log)
                return result
            kept = {k: v for k, v in ex.items() if k != "self_node"}
            elastic = replace(elastic, excluded=(*elastic.excluded, kept))
            round_nodes = Nodes(min(nodes.min, ex["nodes_after"]), ex["nodes_after"])
            # The remaining ranks resume from the exclusion's checkpoint whatever checkpoint.resume said.
            cfg = cfg.replace(checkpoint={"resume": "auto"})
            events("shrink", excluded_node=ex["node"], excluded_rank=ex["rank"], step=ex["step"],
                   nodes=ex["nodes_after"], world=ex["world_after"], checkpoint=ex["checkpoint"])
            _log(f"apogee launch: node {ex['node']} (straggler rank {ex['rank']}) excluded at step {ex['step']}; "
                 f"re-rendezvous with {ex['nodes_after']} node(s), {ex['world_after']} ranks")
    finally:
        watchdog.stop()
        watchdog.join()
    if getattr(result, "stopped", None):  # repeated anomalies: restarting would only loop
        events("job_stopped", after_s=round(time.time() - start, 1), step=result.step, reason=result.stopped)
        raise JobFailed(result.stopped)
    events("job_finished", after_s=round(time.time() - start, 1), step=result.step,
           rank_exits=watchdog.failures, hangs=watchdog.hangs)
    return result
