"""What the trainer holds of resilience: heartbeats, the event log and the fault hook, as one object.

The trainer calls ``hooks.beat(phase, step)`` when it changes phase and ``hooks.at(point, step)`` at
the named injection points; nothing else in the engine knows about drills.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from apogee.resilience.events import EventLog
from apogee.resilience.faults import FaultInjector
from apogee.resilience.heartbeat import Heartbeat, attempt


class RankHooks:
    def __init__(self, run_dir: Path, inject, *, rank: int, world: int, log: Callable[[str], None]):
        self.rank = rank
        self.events = EventLog(run_dir, source=f"rank{rank}")
        self.heartbeat = Heartbeat(run_dir, rank=rank, world=world)
        self.faults = FaultInjector(inject, rank=rank, run_dir=run_dir, events=self.events, log=log)
        self.attempt = attempt()
        self._stepped = False

    def beat(self, phase: str, step: int) -> None:
        self.heartbeat.beat(phase, step)

    def at(self, point: str, step: int, **ctx) -> None:
        self.heartbeat.beat(point, step)
        if point == "after_step" and not self._stepped:
            self._stepped = True
            if self.rank == 0:  # the end of a (re)start: recovery time is measured up to here
                self.events("first_step", attempt=self.attempt, step=step)
        self.faults(point, step, **ctx)
