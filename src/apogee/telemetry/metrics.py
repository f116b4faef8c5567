"""The per-step metrics stream: ``RUN_DIR/metrics.jsonl`` plus a readable console line (rank 0)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # VmHWM is this process's own peak; ru_maxrss survives exec, so a spawned rank would report
    # its launcher's peak.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """Appends one JSON object per logged step. Only rank 0 writes; other ranks hold a no-op."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int = 0):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the stream has each step once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(format_record(record), flush=True)


def format_record(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}"]
    if r.get("val_loss") is not None:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"mem {r['mem_gib']:.2f} GiB")
    if r.get("power_w") is not None:
        parts.append(f"{r['power_w']:.0f} W/GPU, {r['energy_j_per_token']:.3g} J/token")
    return " | ".join(parts)


def log(message: str, *, enabled: bool = True) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
