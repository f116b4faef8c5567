"""NaN/Inf and loss-spike anomalies: the per-step check, and the skip list that makes recovery
deterministic.

Every step, before the optimizer applies anything, each rank flags a non-finite loss or gradient
norm, or a loss above ``spike_factor`` x its moving average (an exponential average of the good
steps' losses, once ``warmup`` good steps were seen). The flags are OR-ed over all ranks in the
step's one small collective (``hooks.RankHooks.check_step``), so every rank takes the same
decision. The trainer then drops the step's gradients, rolls back to the last durable checkpoint
(in-process) and skips the offending step's global windows.

``RUN_DIR/skipped_samples.jsonl`` is the skip list: one line per skipped step window (the step, the
global window indices and their token offsets, the reason). Rank 0 appends and fsyncs it before the
rollback; every rank reads it when it starts, so a restarted or re-run job skips the same windows
and so makes the same choices. The detector's moving average lives in the checkpoint's trainer
state, so a rollback or a resume sees the average it had at that step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

SKIPPED = "skipped_samples.jsonl"
NONFINITE, SPIKE = "non-finite loss or gradient norm", "loss spike"


@dataclass(frozen=True)
class Anomaly:
    step: int
    reason: str  # NONFINITE or SPIKE
    loss: float
    grad_norm: float
    average: float | None  # the moving average the loss was compared with


class AnomalyDetector:
    def __init__(self, *, spike_factor: float, warmup: int, beta: float = 0.9):
        self.spike_factor = spike_factor
        self.warmup = warmup
        self.beta = beta
        self.average: float | None = None  # bias-corrected exponential moving average of good losses
        self._ema = 0.0
        self.good = 0  # good steps folded into the average

    def flags(self, loss: float, grad_norm: float) -> tuple[bool, bool]:
        """This rank's view: (non-finite, spike)."""
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        spike = (not nonfinite and self.spike_factor > 0 and self.good >= self.warmup
                 and self.average is not None and loss > self.spike_factor * self.average)
        return nonfinite, spike

    def decide(self, step: int, loss: float, grad_norm: float, *, nonfinite: bool, spike: bool) -> Anomaly | None:
        """The verdict from the flags OR-ed over ranks; a good step updates the moving average."""
        if nonfinite or spike:
            return Anomaly(step, NONFINITE if nonfinite else SPIKE, loss, grad_norm, self.average)
        self._ema = self.beta * self._ema + (1.0 - self.beta) * loss
        self.good += 1
        self.average = self._ema / (1.0 - self.beta**self.good)
        return None

    def state_dict(self) -> dict:
        return {"ema": self._ema, "good": self.good}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self._ema, self.good = float(state.get("ema", 0.0)), int(state.get("good", 0))
        self.average = self._ema / (1.0 - self.beta**self.good) if self.good else None


class SkipList:
    """``RUN_DIR/skipped_samples.jsonl``: every rank reads it; only the writer (rank 0) appends."""

    def __init__(self, run_dir: Path, *, writer: bool):
        self.path = Path(run_dir) / SKIPPED
        self.writer = writer
        self.entries: list[dict] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self.entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: its rollback never happened

    def windows(self) -> list[tuple[int, int]]:
        """(first global window, count) of every skipped step window."""
        return [(int(e["first_window"]), int(e["count"])) for e in self.entries]

    def at_step(self, step: int) -> int:
        return sum(1 for e in self.entries if int(e["step"]) == step)

    def add(self, entry: dict) -> None:
        self.entries.append(entry)
        if not self.writer:
            return
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
