"""Per-rank heartbeats and stack dumps, read by the launcher's watchdog (``watchdog.py``).

Each rank keeps ``RUN_DIR/heartbeats/rank-NNNNN.json`` current: its pid, host, attempt, the last
completed step and the phase it is in now. Writing is a small file and a rename per phase change
(a few per step, well under a millisecond). ``faulthandler`` is registered on SIGUSR1 so that the
watchdog can ask any rank, even one blocked inside a C++ collective, for every thread's Python
stack; the dump goes to ``RUN_DIR/heartbeats/stacks-rank-NNNNN.attempt-A.txt``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import time
from pathlib import Path

# Order of the phases within one step; ranks are compared by (step, order) to find who is behind.
# A rank in forward_backward with step s is computing step s + 1, so it sorts after step s's phases.
PHASE_ORDER = {"start": -3, "build": -2, "resume": -1, "after_step": 0, "evaluate": 1, "checkpoint": 2,
               "forward_backward": 3, "optimizer_step": 4, "done": 99}
TRAINING_PHASES = {"after_step", "evaluate", "checkpoint", "forward_backward", "optimizer_step"}


def attempt() -> int:
    """Which (re)start of the worker group this is: torchelastic's restart count."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def heartbeat_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "heartbeats"


class Heartbeat:
    def __init__(self, run_dir: Path, *, rank: int, world: int):
        self.dir = heartbeat_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank-{rank:05d}.json"
        self.record = {"rank": rank, "world": world, "pid": os.getpid(), "host": socket.gethostname(),
                       "attempt": attempt(), "step": 0, "phase": "start", "seq": 0, "t": time.time(), "stacks": None}
        # Only in processes torchrun started: a process that hosts the trainer in-line (a test, a
        # notebook) keeps its own signal handlers.
        if hasattr(signal, "SIGUSR1") and "TORCHELASTIC_RUN_ID" in os.environ:
            stacks = self.dir / f"stacks-rank-{rank:05d}.attempt-{attempt()}.txt"
            self._stack_file = open(stacks, "w")  # kept open: faulthandler writes from a signal handler
            faulthandler.register(signal.SIGUSR1, file=self._stack_file, all_threads=True, chain=False)
            self.record["stacks"] = str(stacks)

    def beat(self, phase: str, step: int) -> None:
        r = self.record
        r["phase"], r["step"], r["seq"], r["t"] = phase, step, r["seq"] + 1, time.time()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(r))
        os.replace(tmp, self.path)


def read_heartbeats(run_dir: Path) -> dict[int, dict]:
    out = {}
    directory = heartbeat_dir(run_dir)
    if not directory.is_dir():
        return out
    for path in directory.glob("rank-*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced while reading
        out[int(record["rank"])] = record
    return out
