"""Fault drills: the engine's one injection hook.

``resilience.inject`` (or ``apogee launch --inject``) lists faults such as ``kill:rank=1,step=6``.
Every rank holds a ``FaultInjector`` and the engine calls it at a few named points:

  ``after_step``   the trainer, after each optimizer step (``kill``, ``hang``)
  ``during_save``  the checkpointer, shards written but no manifest yet (``kill-during-save``)
  ``after_save``   the checkpointer, once a checkpoint is durable (``corrupt-checkpoint``)

A fault fires once per run directory, not once per attempt: before firing, the rank writes a marker
under ``RUN_DIR/faults/`` (fsynced), and a restarted attempt that replays the step skips it.
``corrupt-checkpoint`` damages one file of the checkpoint it names and then kills rank 0, so that
the restart has to load (and reject) it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = {
    "kill": ("after_step", {"rank", "step"}),
    "hang": ("after_step", {"rank", "step"}),
    "kill-during-save": ("during_save", {"rank", "step"}),
    "corrupt-checkpoint": ("after_save", {"step", "mode"}),
}
PLANNED = ("nan", "spike", "slow")  # named by the issue, not implemented yet
CORRUPT_MODES = ("flip", "truncate", "delete")


@dataclass(frozen=True)
class Fault:
    index: int  # position in resilience.inject: names its fire-once marker
    kind: str
    step: int
    rank: int = 0
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def point(self) -> str:
        return KINDS[self.kind][0]

    @property
    def marker(self) -> str:
        return f"{self.index}-{self.kind}-rank{self.rank}-step{self.step}.fired"


def parse_fault(spec: str, index: int = 0) -> Fault:
    """``kill:rank=1,step=6`` -> Fault. Raises ValueError naming what is wrong."""
    kind, _, rest = spec.strip().partition(":")
    if kind in PLANNED:
        raise ValueError(f"fault {kind!r} is not implemented yet; drills available: {', '.join(KINDS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown fault {kind!r} in {spec!r}; choose one of: {', '.join(KINDS)}")
    allowed = KINDS[kind][1]
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"fault {spec!r}: {item!r} is not one of {', '.join(sorted(k + '=...' for k in allowed))}")
        values[key] = value
    if "step" not in values:
        raise ValueError(f"fault {spec!r} needs step=S (e.g. {kind}:step=5)")
    try:
        step, rank = int(values["step"]), int(values.get("rank", 0))
    except ValueError:
        raise ValueError(f"fault {spec!r}: rank and step must be integers") from None
    if step < 1 or rank < 0:
        raise ValueError(f"fault {spec!r}: step must be >= 1 and rank >= 0")
    mode = values.get("mode", "flip")
    if mode not in CORRUPT_MODES:
        raise ValueError(f"fault {spec!r}: mode must be one of {', '.join(CORRUPT_MODES)}")
    return Fault(index=index, kind=kind, step=step, rank=rank, options={"mode": mode} if kind == "corrupt-checkpoint" else {})


def parse_faults(specs) -> list[Fault]:
    return [parse_fault(s, i) for i, s in enumerate(specs)]


class FaultInjector:
    """Called as ``injector(point, step, **ctx)``; fires this rank's faults planned for that point."""

    def __init__(self, specs, *, rank: int, run_dir: Path, events: Callable[..., object] | None = None,
                 log: Callable[[str], None] | None = None):
        self.faults = [f for f in parse_faults(specs) if f.rank == rank]
        self.rank = rank
        self.dir = Path(run_dir) / "faults"
        self.events = events or (lambda kind, **fields: None)
        self.log = log or (lambda msg: None)

    def __call__(self, point: str, step: int, **ctx) -> None:
        for fault in self.faults:
            if fault.point == point and fault.step == step and not (self.dir / fault.marker).exists():
                self._mark(fault)
                self.events("fault_injected", fault=fault.kind, rank=self.rank, step=step, point=point)
                self.log(f"drill: injecting {fault.kind} on rank {self.rank} at step {step} ({point})")
                getattr(self, "_" + fault.kind.replace("-", "_"))(fault, **ctx)

    def _mark(self, fault: Fault) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / fault.marker, "w") as f:
            f.write(f"{time.time()}\n")
            f.flush()
            os.fsync(f.fileno())

    # Each fault is a method, so a drill is readable in one place.
    def _kill(self, fault: Fault, **_) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _kill_during_save(self, fault: Fault, **_) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _hang(self, fault: Fault, **_) -> None:
        while True:  # a rank stuck outside any collective: its peers block in the next one
            time.sleep(1.0)

    def _corrupt_checkpoint(self, fault: Fault, path: Path | None = None, **_) -> None:
        if path is None:
            return
        shards = sorted(Path(path).glob("*.distcp")) or sorted(p for p in Path(path).iterdir() if p.name != "manifest.json")
        victim = shards[0]
        mode = fault.options.get("mode", "flip")
        if mode == "delete":
            victim.unlink()
        elif mode == "truncate":
            os.truncate(victim, victim.stat().st_size // 2)
        else:
            with open(victim, "r+b") as f:
                f.seek(victim.stat().st_size // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
        self.events("checkpoint_corrupted", checkpoint=str(path), file=victim.name, mode=mode)
        os.kill(os.getpid(), signal.SIGKILL)  # so that the restart has to load it
