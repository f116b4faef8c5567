"""Elastic shrink: a confirmed straggler's node leaves the job (``resilience.exclude_stragglers``).

The supervisor (``apogee launch``) hands every rank an ``Elastic``: the node range of the job
(``--nnodes MIN:MAX``) and the exclusions so far. Each step every rank all-gathers its own compute
time and its node (torchelastic's ``GROUP_RANK``) in the step's one small collective
(``hooks.RankHooks.check_step``), so every rank runs the straggler detector on the same numbers and
reaches the same verdict without another collective. When the detector confirms a straggler:

- if removing its node leaves fewer nodes than the job's minimum (the only node, a fixed-size job,
  plain ``apogee train``) or no layout fits the smaller world (``replan.py``), the job says so in
  one line and an ``exclusion_skipped`` event, and keeps running;
- otherwise ``Shrink.pending`` is set; at the end of that step every rank saves a durable
  checkpoint, rank 0 writes the ``exclusion`` event (rank, node, host, step, checkpoint), and every
  rank returns from ``fit`` with the exclusion in its result. The supervisors read it: the excluded
  node's stops and does not rejoin, the others re-rendezvous for the smaller world, whose ranks
  re-plan the layout (``replan.fit_world``) and resume from that checkpoint with the same global
  batch, so the data order continues where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Elastic:
    """What the supervisor tells every rank about the elastic job (plain data: it is pickled into
    the spawned ranks)."""

    min_nodes: int = 1  # the job's node range as given (--nnodes MIN:MAX), not the current rendezvous's
    max_nodes: int = 1
    excluded: tuple = field(default_factory=tuple)  # the exclusions so far, oldest first (dicts)

    @property
    def gone_ranks(self) -> frozenset[int]:
        """Ranks (as numbered when excluded) whose node left: their fault drills leave with them."""
        return frozenset(r for ex in self.excluded for r in ex.get("ranks", ()))

    @property
    def is_elastic(self) -> bool:
        """May the world differ from the configured layout (and then be re-planned)?"""
        return self.max_nodes > self.min_nodes


def this_node() -> int:
    """This rank's node: torchelastic's GROUP_RANK (0 outside torchelastic)."""
    return int(os.environ.get("GROUP_RANK", "0"))


class Shrink:
    """The exclusion decision, taken identically on every rank from the all-gathered table."""

    def __init__(self, run_dir: Path, *, enabled: bool, elastic: Elastic | None, rank: int, world: int,
                 replans: Callable[[int], str | None], events: Callable[..., object], log: Callable[[str], None]):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.elastic = elastic
        self.rank = rank
        self.world = world
        self.replans = replans  # new world size -> None if a layout fits, else why not
        self.events = events
        self.log = log
        self.pending: dict | None = None
        self._skipped: set[int] = set()  # nodes already reported as not excludable

    def consider(self, step: int, stragglers: list[dict], nodes: list[int]) -> None:
        """``stragglers``: the detector's new findings this step; ``nodes``: every rank's node."""
        if not self.enabled or self.pending is not None or not stragglers:
            return
        found = min(stragglers, key=lambda f: f["rank"])
        node = nodes[found["rank"]]
        count = len(set(nodes))
        remaining = self.world - sum(1 for n in nodes if n == node)
        minimum = self.elastic.min_nodes if self.elastic is not None else count
        why = None
        if count == 1:
            why = "it is the job's only node"
        elif count - 1 < minimum:
            why = (f"{count - 1} node(s) would remain, below the job's minimum of {minimum} "
                   f"({'apogee launch --nnodes MIN:MAX' if self.elastic else 'not an elastic apogee launch job'})")
        else:
            problem = self.replans(remaining)
            if problem:
                why = f"no layout fits the {remaining} remaining ranks ({problem})"
        if why:
            if node not in self._skipped:
                self._skipped.add(node)
                if self.rank == 0:
                    self.events("exclusion_skipped", rank=found["rank"], node=node, step=step, reason=why)
                    self.log(f"straggler rank {found['rank']} is not excluded: {why}; training goes on with it")
            return
        self.pending = {"rank": found["rank"], "node": node, "host": host_of(self.run_dir, found["rank"]),
                        "ranks": [r for r, n in enumerate(nodes) if n == node],
                        "step": step, "vs_peers": found["vs_peers"], "nodes_before": count,
                        "nodes_after": count - 1, "world_before": self.world, "world_after": remaining}

    def leave(self, step: int, checkpoint: Path | None) -> dict:
        """Every rank, once the exclusion step's checkpoint is durable: the exclusion, as the
        supervisors read it from the ranks' results (``self_node``: this rank's node)."""
        record = {**self.pending, "step": step, "checkpoint": str(checkpoint) if checkpoint else None}
        if self.rank == 0:
            self.events("exclusion", **record)
            self.log(f"excluding straggler rank {record['rank']} with its node {record['node']} "
                     f"({record['host']}): checkpoint {record['checkpoint']} at step {step}; the job goes on with "
                     f"{record['world_after']} ranks on {record['nodes_after']} node(s)")
        return {**record, "self_node": this_node()}


def host_of(run_dir: Path, rank: int) -> str | None:
    """The host a rank runs on, from its heartbeat file (the launcher's watchdog reads the same)."""
    try:
        return json.loads((Path(run_dir) / "heartbeats" / f"rank-{rank:05d}.json").read_text()).get("host")
    except (OSError, ValueError):
        return None
