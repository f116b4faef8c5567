"""The launcher's watchdog: dead ranks and hangs, from the ranks' heartbeats (``heartbeat.py``).

A thread in the ``apogee launch`` process polls ``RUN_DIR/heartbeats/`` for the ranks on this host:

- a rank whose process is gone before it reported ``done`` is a failure (event ``rank_exited``,
  with the exit status when the process is still a zombie); torchrun's agent restarts the group;
- no heartbeat from any live rank for ``hang_timeout_s`` (``startup_timeout_s`` until every rank
  is training) is a hang: the watchdog asks every rank for its Python stacks (SIGUSR1 ->
  faulthandler), writes ``RUN_DIR/diagnosis/hang-attempt-A.txt`` naming the rank(s) the others are
  waiting for (the ones furthest behind in (step, phase)), then SIGKILLs the ranks so that the agent
  restarts them from the latest durable checkpoint. No waiting for a 30-minute collective timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from apogee.resilience.heartbeat import PHASE_ORDER, TRAINING_PHASES, read_heartbeats


def process_state(pid: int) -> tuple[bool, int | None]:
    """(alive, wait status if it is a zombie). Linux /proc; elsewhere only liveness."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False, None
    except OSError:
        try:
            os.kill(pid, 0)
            return True, None
        except ProcessLookupError:
            return False, None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        try:
            return False, int(fields[-1])  # exit_code field (Linux >= 3.5): the wait status
        except (ValueError, IndexError):
            return False, None
    return True, None


def describe_status(status: int | None) -> str:
    if status is None:
        return "exited"
    if status & 0x7F:
        sig = status & 0x7F
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {status >> 8}"


def _key(beat: dict) -> tuple[int, int]:
    return int(beat["step"]), PHASE_ORDER.get(beat["phase"], -10)


def diagnose(beats: dict[int, dict]) -> tuple[list[int], str]:
    """The ranks the others wait for (furthest behind in (step, phase)), and a one-line summary."""
    where = {r: f"step {b['step']} {b['phase']}" for r, b in sorted(beats.items())}
    keys = {r: _key(b) for r, b in beats.items()}
    low = min(keys.values())
    behind = sorted(r for r, k in keys.items() if k == low)
    if len(behind) == len(beats):
        return [], f"no rank diverged: all {len(beats)} ranks stopped at {where[behind[0]]} (a deadlock, or a stall all share)"
    others = sorted(set(beats) - set(behind))
    ahead = ", ".join(f"rank {r} at {where[r]}" for r in others)
    names = ", ".join(str(r) for r in behind)
    return behind, f"rank(s) {names} stopped at {where[behind[0]]} while {ahead} wait in the next collective"


class Watchdog(threading.Thread):
    def __init__(self, run_dir: Path, *, hang_timeout_s: float, startup_timeout_s: float,
                 events: Callable[..., object], log: Callable[[str], None] = print, poll_s: float = 0.25):
        super().__init__(name="apogee-watchdog", daemon=True)
        self.run_dir = Path(run_dir)
        self.hang_timeout_s = hang_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.events = events
        self.log = log
        self.poll_s = poll_s
        self.host = socket.gethostname()
        self._stop_event = threading.Event()
        self._reported: set[tuple[int, int]] = set()  # (rank, pid) already reported dead
        self._handled: set[frozenset] = set()  # generations of pids already treated as hung
        self.hangs = 0
        self.failures = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # the watchdog must outlive any odd file it reads
                self.log(f"apogee watchdog: {exc!r}")

    def check(self) -> None:
        beats = {r: b for r, b in read_heartbeats(self.run_dir).items() if b.get("host") == self.host}
        live = {}
        for rank, beat in beats.items():
            alive, status = process_state(int(beat["pid"]))
            if alive:
                if beat["phase"] != "done":
                    live[rank] = beat
            elif beat["phase"] != "done" and (rank, beat["pid"]) not in self._reported:
                self._reported.add((rank, beat["pid"]))
                self.failures += 1
                how = describe_status(status)
                self.events("rank_exited", rank=rank, pid=beat["pid"], attempt=beat.get("attempt"), how=how,
                            step=beat["step"], phase=beat["phase"])
                self.log(f"apogee launch: rank {rank} (pid {beat['pid']}) {how} at step {beat['step']} ({beat['phase']})")
        if not live:
            return
        generation = frozenset((r, b["pid"]) for r, b in live.items())
        if generation in self._handled:
            return
        world = max(int(b["world"]) for b in live.values())
        training = len(live) == world and all(b["phase"] in TRAINING_PHASES for b in live.values())
        limit = self.hang_timeout_s if training else self.startup_timeout_s
        silent = time.time() - max(float(b["t"]) for b in live.values())
        if silent > limit:
            self._handled.add(generation)
            self.handle_hang(live, silent)

    def handle_hang(self, live: dict[int, dict], silent: float) -> None:
        self.hangs += 1
        try:
            self.diagnose_hang(live, silent)
        finally:  # whatever the diagnosis met, the hung ranks must go so that the agent restarts them
            for beat in live.values():
                try:
                    os.kill(int(beat["pid"]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.events("ranks_killed", reason="hang", ranks=sorted(live))

    def diagnose_hang(self, live: dict[int, dict], silent: float) -> None:
        attempt = max(int(b.get("attempt", 0)) for b in live.values())
        self.events("hang_detected", silent_s=round(silent, 1), attempt=attempt,
                    ranks={r: {"step": b["step"], "phase": b["phase"]} for r, b in sorted(live.items())})
        stacks = self.collect_stacks(live)
        suspects, summary = diagnose(live)
        out = self.run_dir / "diagnosis" / f"hang-attempt-{attempt}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"hang: no heartbeat from any rank for {silent:.1f} s (limit {self.hang_timeout_s} s)", summary, ""]
        for rank, beat in sorted(live.items()):
            lines += [f"=== rank {rank} (pid {beat['pid']}): step {beat['step']}, phase {beat['phase']}, "
                      f"last heartbeat {time.time() - float(beat['t']):.1f} s ago", stacks.get(rank, "(no stack)"), ""]
        out.write_text("\n".join(lines))
        self.events("diagnosis", problem="hang", suspects=suspects, summary=summary, file=str(out))
        self.log(f"apogee launch: hang: {summary}; stacks in {out}; restarting the ranks")

    def collect_stacks(self, live: dict[int, dict], wait_s: float = 3.0) -> dict[int, str]:
        """SIGUSR1 to every rank (faulthandler dumps all threads), then read the dumps."""
        files = {}
        for rank, beat in live.items():
            if beat.get("stacks"):
                files[rank] = Path(beat["stacks"])
                try:
                    os.kill(int(beat["pid"]), signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        deadline = time.time() + wait_s
        out: dict[int, str] = {}
        while time.time() < deadline:
            out = {r: p.read_text() if p.exists() else "" for r, p in files.items()}
            if all("File" in text for text in out.values()):
                break
            time.sleep(0.1)
        return out
