"""Peak FLOP/s of known accelerators, for model FLOPs utilisation (PaLM's definition)."""

from __future__ import annotations

import torch

# Dense (no sparsity) peak FLOP/s by (device-name fragment, dtype), from the vendors' data sheets.
PEAK_FLOPS = {
    ("H200", "bf16"): 989e12,  # NVIDIA H200 SXM datasheet: 1,979 TFLOP/s with sparsity
    ("H100", "bf16"): 989e12,  # NVIDIA H100 SXM datasheet: 1,979 TFLOP/s with sparsity
    ("H800", "bf16"): 989e12,  # same silicon as H100 SXM
    ("B200", "bf16"): 2250e12,  # NVIDIA HGX B200 datasheet: 4.5 PFLOP/s bf16 with sparsity
    ("A100", "bf16"): 312e12,  # NVIDIA A100 datasheet
    ("H100", "fp32"): 67e12,
    ("A100", "fp32"): 19.5e12,
}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one ``device`` for ``dtype`` (bf16|fp32), or None where unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (fragment, kind), value in PEAK_FLOPS.items():
        if fragment in name and kind == dtype:
            return value
    return None
