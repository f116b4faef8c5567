"""Energy a rank's GPU draws, read from NVML's energy counter (``nvidia-ml-py``, the ``gpu`` extra).

NVML keeps a per-GPU counter of the energy the board has drawn since the driver loaded
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules, Volta and newer). Differences of that counter give
a window's energy exactly, where sampling the instantaneous power would miss what happens between
samples. Without CUDA, without ``nvidia-ml-py`` or on a GPU without the counter there is no meter, and
the metrics stream simply has no energy keys.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

# A reading takes ~5 ms of the driver's time; whether readings every 0.1 s slowed a host-bound run's
# kernel launches was not resolved from the noise on the H100 (docs/planner.md), so they are rarer.
SAMPLE_INTERVAL_S = 1.0


class EnergyMeter:
    """Energy over consecutive windows of a run, from a counter in joules (``read_j``).

    NVML's counter takes ~5 ms a read on an H100 (stop 17), too long for the training loop. Once
    ``start``-ed, a background thread reads it every ``interval_s`` (the read is a foreign call, which
    releases the GIL) and, once the thread has taken its first reading, ``lap`` reads nothing: the counter
    at the lap's instant is the latest reading extrapolated at the power of the two latest, over at most one
    interval. Before that (a window shorter than the interval would otherwise draw nothing), unstarted, or
    after the thread's read failed, ``lap`` reads the counter itself. Each window ends where the next
    starts."""

    def __init__(self, read_j: Callable[[], float], clock: Callable[[], float] = time.perf_counter):
        self.read_j, self.clock = read_j, clock
        self.lock = threading.Lock()
        self.samples: list[tuple[float, float]] = []  # the two latest (instant, joules)
        self.interval_s = 0.0
        self.thread: threading.Thread | None = None
        self.background = False  # the thread's readings keep ``samples`` current
        self.stopping = threading.Event()
        self.sample()
        self.start_j = self.samples[-1][1]

    def read(self) -> tuple[float, float]:
        """One reading of the counter, stamped at the middle of the read: (instant, joules)."""
        before = self.clock()
        joules = self.read_j()
        return (before + self.clock()) / 2, joules

    def sample(self) -> None:
        """A reading the extrapolation may use: the construction's and the thread's, an interval apart (a
        lap's own reading is not one, as two readings a few ms apart would give a wild power)."""
        reading = self.read()
        with self.lock:
            self.samples = (self.samples + [reading])[-2:]

    def energy_at(self, instant: float) -> float:
        """The counter at ``instant``, from the latest reading and the power of the two latest."""
        with self.lock:
            samples = list(self.samples)
        t1, j1 = samples[-1]
        if len(samples) < 2 or instant <= t1:
            return j1
        t0, j0 = samples[0]
        power = (j1 - j0) / (t1 - t0) if t1 > t0 else 0.0
        return j1 + power * min(instant - t1, self.interval_s)

    def lap(self) -> float:
        """Energy drawn since the last lap (or since the meter was made); the next window starts now."""
        if self.background:
            now = self.energy_at(self.clock())
        else:
            now = self.read()[1]
        drawn, self.start_j = now - self.start_j, now
        return drawn

    def start(self, interval_s: float = SAMPLE_INTERVAL_S) -> "EnergyMeter":
        """Read the counter on a background thread from now on, every ``interval_s``."""
        self.interval_s = interval_s

        def run() -> None:
            while not self.stopping.wait(interval_s):
                try:
                    self.sample()
                except Exception:  # the counter failed: lap reads it itself again (and raises there)
                    self.background = False
                    return
                self.background = True

        self.thread = threading.Thread(target=run, name="apogee-energy", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5.0)
            self.thread = None
        self.background = False

    @classmethod
    def for_device(cls, device: torch.device) -> "EnergyMeter | None":
        """A meter on ``device``'s GPU, or None where NVML cannot give its energy counter."""
        if device.type != "cuda":
            return None
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            # By UUID: NVML numbers every GPU of the node, torch only the visible ones (CUDA_VISIBLE_DEVICES).
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where the GPU has no counter
        except (pynvml.NVMLError, AttributeError, RuntimeError):
            return None
        return cls(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0).start()


def energy_record(joules: float, seconds: float, gpus: int, tokens: float) -> dict:
    """The metrics keys of one window: all ``gpus``' ``joules`` over ``seconds`` and ``tokens``."""
    return {"power_w": joules / seconds / gpus if seconds > 0 else 0.0,
            "energy_j_per_token": joules / tokens if tokens > 0 else 0.0}
