"""Fault drills: the engine's one injection hook.

``resilience.inject`` (or ``apogee launch --inject``) lists faults such as ``kill:rank=1,step=6``.
Every rank holds a ``FaultInjector`` and the engine calls it at a few named points:

  ``after_step``   the trainer, after each optimizer step (``kill``, ``hang``)
  ``during_save``  the checkpointer, shards written but no manifest yet (``kill-during-save``)
  ``after_save``   the checkpointer, once a checkpoint is durable (``corrupt-checkpoint``)
  ``after_backward`` the trainer, gradients computed, before the anomaly check (``nan``, ``spike``):
                   returns the (poisoned) loss; the gradients are poisoned in place
  ``compute``      the trainer, at the end of a rank's own forward/backward compute (``slow``)

A fault fires once per run directory, not once per attempt: before firing, the rank writes a marker
under ``RUN_DIR/faults/`` (fsynced), and a restarted attempt that replays the step skips it.
``nan`` and ``spike`` fire on every rank (each rank its own marker), ``times=N`` times (default 1:
the anomaly rollback then replays the step with the next batch, cleanly). ``slow`` is a condition,
not an event: from ``step`` (default 1) on, every step of that rank burns (factor - 1) x its own
compute time on the CPU, as a slower chip would (a plain sleep would look like idle waiting).
``corrupt-checkpoint`` damages one file of the checkpoint it names and then kills rank 0, so that
the restart has to load (and reject) it. ``lose-memory:rank=R[,step=S]`` has no point of its own:
when a ``kill`` or ``kill-during-save`` of rank R fires (at step S, or any step without one), rank R
first wipes its in-memory snapshots (``checkpoint.memory_interval``), as if its node's RAM went with
it; the restart must then load R's shard from the peer copy. The snapshot module tells the hook
where they are (``provide(memory_dir=...)``). A ``kill`` or ``kill-during-save`` at step S first lets
in-memory snapshots of steps before S finish persisting (``provide(settle_snapshots=...)``): training
does not wait for them every step, and a drill must find the same snapshot on every run. A snapshot
of step S itself may still be in flight when the rank dies, as in a real crash.
"""

from __future__ import annotations

import os
import shutil
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
    "nan": ("after_backward", {"step", "times"}),
    "spike": ("after_backward", {"step", "factor", "times"}),
    "slow": ("compute", {"rank", "factor", "step"}),
    "lose-memory": ("kill", {"rank", "step"}),  # a modifier of this rank's kills: no point of its own
}
EVERY_RANK = {"nan", "spike"}  # an anomaly every rank sees (rank = -1)
PERSISTENT = {"slow"}  # a condition from its step on, not a one-off event
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
        return self.marker_for(self.rank)

    def marker_for(self, rank: int) -> str:
        return f"{self.index}-{self.kind}-rank{rank}-step{self.step}.fired"


def parse_fault(spec: str, index: int = 0) -> Fault:
    """``kill:rank=1,step=6`` -> Fault. Raises ValueError naming what is wrong."""
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown fault {kind!r} in {spec!r}; choose one of: {', '.join(KINDS)}")
    allowed = KINDS[kind][1]
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"fault {spec!r}: {item!r} is not one of {', '.join(sorted(k + '=...' for k in allowed))}")
        values[key] = value
    if "step" not in values and kind not in ("slow", "lose-memory"):
        raise ValueError(f"fault {spec!r} needs step=S (e.g. {kind}:step=5)")
    if kind in ("slow", "lose-memory") and "rank" not in values:
        raise ValueError(f"fault {spec!r} needs rank=R (e.g. {kind}:rank=1)")
    try:
        step, rank = int(values.get("step", 0 if kind == "lose-memory" else 1)), int(values.get("rank", 0))
        times = int(values.get("times", 1))
        factor = float(values.get("factor", 2.0 if kind == "slow" else 10.0))
    except ValueError:
        raise ValueError(f"fault {spec!r}: rank, step and times must be integers, factor a number") from None
    if step < (0 if kind == "lose-memory" else 1) or rank < 0 or times < 1:
        raise ValueError(f"fault {spec!r}: step and times must be >= 1 and rank >= 0")
    if kind in ("slow", "spike") and not factor > 1.0:
        raise ValueError(f"fault {spec!r}: factor must be > 1")
    mode = values.get("mode", "flip")
    if mode not in CORRUPT_MODES:
        raise ValueError(f"fault {spec!r}: mode must be one of {', '.join(CORRUPT_MODES)}")
    options: dict = {}
    if kind == "corrupt-checkpoint":
        options = {"mode": mode}
    elif kind in ("nan", "spike"):
        options = {"times": times, "factor": factor}
    elif kind == "slow":
        options = {"factor": factor}
    return Fault(index=index, kind=kind, step=step, rank=-1 if kind in EVERY_RANK else rank, options=options)


def parse_faults(specs) -> list[Fault]:
    return [parse_fault(s, i) for i, s in enumerate(specs)]


class FaultInjector:
    """Called as ``injector(point, step, **ctx)``; fires this rank's faults planned for that point."""

    def __init__(self, specs, *, rank: int, run_dir: Path, events: Callable[..., object] | None = None,
                 log: Callable[[str], None] | None = None, skip_ranks: frozenset[int] = frozenset()):
        # skip_ranks: ranks an elastic shrink excluded; drills naming them left with their node.
        self.faults = [f for f in parse_faults(specs) if f.rank in (rank, -1) and f.rank not in skip_ranks]
        self.rank = rank
        self.dir = Path(run_dir) / "faults"
        self.events = events or (lambda kind, **fields: None)
        self.log = log or (lambda msg: None)
        self.context: dict = {}  # standing context other modules provide (memory_dir)

    def provide(self, **ctx) -> None:
        """Context every firing receives, from modules the trainer does not route it through
        (the in-memory snapshots' directory, for ``lose-memory``)."""
        self.context.update(ctx)

    def __call__(self, point: str, step: int, **ctx) -> dict:
        """Fire this rank's faults due at ``point``; returns ``ctx``, updated by the faults that
        change a value (``after_backward``: the loss)."""
        ctx = {**self.context, **ctx}
        for fault in self.faults:
            if fault.point != point:
                continue
            if fault.kind in PERSISTENT:
                if step >= fault.step:
                    if self._fired(fault) == 0:
                        self._announce(fault, step, point)
                    ctx.update(getattr(self, "_" + fault.kind)(fault, **ctx) or {})
                continue
            if fault.step == step and self._fired(fault) < fault.options.get("times", 1):
                self._announce(fault, step, point)
                ctx.update(getattr(self, "_" + fault.kind.replace("-", "_"))(fault, **ctx) or {})
        return ctx

    def _announce(self, fault: Fault, step: int, point: str) -> None:
        self._mark(fault)
        self.events("fault_injected", fault=fault.kind, rank=self.rank, step=step, point=point)
        self.log(f"drill: injecting {fault.kind} on rank {self.rank} at step {step} ({point})")

    def _fired(self, fault: Fault) -> int:
        """How often this rank fired ``fault`` in this run directory (a line per firing)."""
        try:
            return len((self.dir / fault.marker_for(self.rank)).read_text().splitlines())
        except FileNotFoundError:
            return 0

    def _mark(self, fault: Fault) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / fault.marker_for(self.rank), "a") as f:
            f.write(f"{time.time()}\n")
            f.flush()
            os.fsync(f.fileno())

    # Each fault is a method, so a drill is readable in one place.
    def _kill(self, fault: Fault, memory_dir: Path | None = None, settle_snapshots=None, **_) -> None:
        if settle_snapshots is not None:
            settle_snapshots(fault.step)  # earlier steps' in-memory snapshots finish (module docstring)
        self._lose_memory(fault, memory_dir)
        os.kill(os.getpid(), signal.SIGKILL)

    _kill_during_save = _kill  # the same act; only the point it fires at (inside a save) differs

    def _lose_memory(self, kill: Fault, memory_dir: Path | None) -> None:
        """A ``lose-memory`` of this rank that matches the kill: wipe the rank's snapshots first."""
        for fault in self.faults:
            if fault.kind == "lose-memory" and fault.step in (0, kill.step) and memory_dir is not None:
                self._announce(fault, kill.step, kill.point)
                shutil.rmtree(memory_dir, ignore_errors=True)

    def _hang(self, fault: Fault, **_) -> None:
        while True:  # a rank stuck outside any collective: its peers block in the next one
            time.sleep(1.0)

    def _nan(self, fault: Fault, loss: float = 0.0, model=None, **_) -> dict:
        """A NaN in the loss and in every gradient, as an overflow would leave them."""
        _scale_grads(model, float("nan"))
        return {"loss": float("nan")}

    def _spike(self, fault: Fault, loss: float = 0.0, model=None, **_) -> dict:
        """The loss (and so its gradients) ``factor`` times larger, as a bad batch would make it."""
        factor = fault.options.get("factor", 10.0)
        _scale_grads(model, factor)
        return {"loss": loss * factor}

    def _slow(self, fault: Fault, compute_s: float = 0.0, **_) -> None:
        """Burn (factor - 1) x this step's own compute time on the CPU: a slower chip."""
        deadline = time.thread_time() + (fault.options.get("factor", 2.0) - 1.0) * compute_s
        while time.thread_time() < deadline:
            pass

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


def _scale_grads(model, factor: float) -> None:
    if model is None:
        return
    import torch  # lazy: config validation imports this module without torch

    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
