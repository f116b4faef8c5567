"""Energy a rank's GPU draws, read from NVML's energy counter (``nvidia-ml-py``, the ``gpu`` extra).

NVML keeps a per-GPU counter of the energy the board has drawn since the driver loaded
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules, Volta and newer). Differences of that counter give
a window's energy exactly, where sampling the instantaneous power would miss what happens between
samples. Without CUDA, without ``nvidia-ml-py`` or on a GPU without the counter there is no meter, and
the metrics stream simply has no energy keys.
"""

from __future__ import annotations

from typing import Callable

import torch


class EnergyMeter:
    """Energy over consecutive windows of a run, from a counter in joules (``read_j``). Each window ends
    where the next starts, on one reading: NVML's counter takes ~5 ms a read on an H100 (stop 17), so the
    trainer reads it once per logging window."""

    def __init__(self, read_j: Callable[[], float]):
        self.read_j = read_j
        self.start_j = read_j()

    def lap(self) -> float:
        """Energy drawn since the last lap (or since the meter was made); the next window starts now."""
        now = self.read_j()
        drawn, self.start_j = now - self.start_j, now
        return drawn

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
        return cls(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0)


def energy_record(joules: float, seconds: float, gpus: int, tokens: float) -> dict:
    """The metrics keys of one window: all ``gpus``' ``joules`` over ``seconds`` and ``tokens``."""
    return {"power_w": joules / seconds / gpus if seconds > 0 else 0.0,
            "energy_j_per_token": joules / tokens if tokens > 0 else 0.0}
