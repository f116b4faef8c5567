"""What the trainer holds of resilience: heartbeats, the event log and the fault hook, as one object.

The trainer calls ``hooks.beat(phase, step)`` when it changes phase, ``hooks.at(point, step)`` at
the named injection points (``hooks.inject`` where a drill changes a value), and once per step,
before the optimizer step, ``hooks.check_step``: one small all-gather of every rank's anomaly flags
and own compute time (and node), which ORs the anomaly verdict over ranks (``anomalies.py``), scores
stragglers (``stragglers.py``) and, with ``resilience.exclude_stragglers``, decides an elastic
shrink (``elastic.py``): every rank scores the same gathered table, so all reach the same verdict.
Nothing else in the engine knows about drills.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from apogee.resilience.anomalies import Anomaly, AnomalyDetector, SkipList
from apogee.resilience.elastic import Elastic, Shrink, this_node
from apogee.resilience.events import EventLog
from apogee.resilience.faults import FaultInjector
from apogee.resilience.heartbeat import Heartbeat, attempt
from apogee.resilience.stragglers import StragglerDetector


class RankHooks:
    def __init__(self, run_dir: Path, inject, *, rank: int, world: int, log: Callable[[str], None],
                 resilience=None, device=None, elastic: Elastic | None = None,
                 replans: Callable[[int], str | None] = lambda world: None):
        self.rank = rank
        self.world = world
        self.log = log
        self.device = device
        spike, warmup = (resilience.spike_factor, resilience.anomaly_warmup) if resilience else (3.0, 10)
        self.anomalies = AnomalyDetector(spike_factor=spike, warmup=warmup)
        self.skips = SkipList(run_dir, writer=rank == 0)  # skipped_samples.jsonl, read by every rank
        self.stragglers = StragglerDetector(world, factor=resilience.straggler_factor if resilience else 1.3,
                                            consecutive=resilience.straggler_steps if resilience else 5)
        self.events = EventLog(run_dir, source=f"rank{rank}")
        self.heartbeat = Heartbeat(run_dir, rank=rank, world=world)
        self.faults = FaultInjector(inject, rank=rank, run_dir=run_dir, events=self.events, log=log,
                                    skip_ranks=elastic.gone_ranks if elastic else frozenset())
        self.attempt = attempt()
        self._stepped = False
        self.shrink = Shrink(run_dir, enabled=bool(resilience and resilience.exclude_stragglers), elastic=elastic,
                             rank=rank, world=world, replans=replans, events=self.events, log=log)

    def beat(self, phase: str, step: int) -> None:
        self.heartbeat.beat(phase, step)

    def at(self, point: str, step: int, **ctx) -> None:
        self.heartbeat.beat(point, step)
        if point == "after_step" and not self._stepped:
            self._stepped = True
            if self.rank == 0:  # the end of a (re)start: recovery time is measured up to here
                self.events("first_step", attempt=self.attempt, step=step)
        self.faults(point, step, **ctx)

    def inject(self, point: str, step: int, **ctx) -> dict:
        """A drill that changes a value (``after_backward``: the loss); returns ``ctx`` updated."""
        return self.faults(point, step, **ctx)

    def check_step(self, step: int, loss: float, grad_norm: float, compute_s: float) -> Anomaly | None:
        """Once per step, before the optimizer step, on every rank (a collective): the anomaly
        verdict OR-ed over ranks, and straggler scoring of every rank's own compute time."""
        import torch
        import torch.distributed as dist

        nonfinite, spike = self.anomalies.flags(loss, grad_norm)
        mine = torch.tensor([float(nonfinite), float(spike), compute_s, float(this_node())], dtype=torch.float64,
                            device=self.device)
        if dist.is_initialized() and self.world > 1:
            rows = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(rows, mine)
            table = torch.stack(rows).cpu()
        else:
            table = mine.cpu().unsqueeze(0)
        anomaly = self.anomalies.decide(step, loss, grad_norm, nonfinite=bool(table[:, 0].max() > 0),
                                        spike=bool(table[:, 1].max() > 0))
        # Every rank scores the same table (the exclusion decision must agree); rank 0 reports.
        stragglers = self.stragglers.observe(step, table[:, 2].tolist())
        if self.rank == 0:
            for found in stragglers:
                self.events("straggler", **found, node=int(table[found["rank"], 3]))
                self.log(f"straggler: rank {found['rank']} computes {found['vs_peers']:.2f}x slower than the median "
                         f"of its peers for {found['steps']} consecutive steps (step {step}: {found['compute_s']:.3f} s "
                         f"vs {found['peers_median_s']:.3f} s; {found['vs_own'] or 0:.2f}x its own baseline)")
        self.shrink.consider(step, stragglers, [int(n) for n in table[:, 3].tolist()])
        return anomaly
