"""benchmarks/planner_vs_measured.py's HeapSampler: the CPU counterpart of a GPU's peak allocated memory is
the peak resident size less the heap chunks glibc has freed but keeps for reuse."""

from __future__ import annotations

import ctypes
import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20


def _load():
    spec = importlib.util.spec_from_file_location("pvm", ROOT / "benchmarks" / "planner_vs_measured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc's mallinfo2")
def test_heap_sampler_leaves_out_freed_heap_chunks_that_stay_resident():
    """Interleaved 512 KiB blocks, every other one freed: the holes stay resident (their neighbours are
    live) and 1 MiB blocks do not fit them, so 16 MiB more of those raise the resident size by 16 MiB
    while the live bytes stay at 32 MiB. Peak RSS - peak live = the 16 MiB of holes (within 4 MiB)."""
    pvm = _load()
    warm = bytearray(2 * MiB)  # freeing a block above glibc's mmap threshold raises it: later blocks use the heap
    del warm
    with pvm.HeapSampler(interval_s=0.001) as heap:
        time.sleep(0.05)
        base_rss, base_live = heap.rss_peak, heap.live_peak
        small = [bytearray(512 * 1024) for _ in range(64)]  # 32 MiB, touched (zero-filled)
        time.sleep(0.05)
        del small[::2]  # 16 MiB of 512 KiB holes between live blocks
        time.sleep(0.05)
        large = [bytearray(MiB) for _ in range(16)]  # 16 MiB that cannot reuse the holes
        time.sleep(0.05)
    assert heap.rss_peak - base_rss == pytest.approx(48 * MiB, abs=6 * MiB)
    assert heap.live_peak - base_live == pytest.approx(32 * MiB, abs=6 * MiB)
    del small, large
