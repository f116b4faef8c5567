"""benchmarks/planner_vs_measured.py's measurement helpers: HeapSampler (the CPU counterpart of a GPU's peak
allocated memory is the peak resident size less the heap chunks glibc has freed but keeps for reuse) and
the GEMM roles its calibration times."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20


# Run in a fresh interpreter: a long-lived process (the test session) brings a heap already full of
# holes of every size, which the blocks below would land in instead of making their own.
FRAGMENT = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("pvm", sys.argv[1])
pvm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pvm)
MiB = 2**20
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
print(json.dumps({"rss": heap.rss_peak - base_rss, "live": heap.live_peak - base_live}))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc's mallinfo2")
def test_heap_sampler_leaves_out_freed_heap_chunks_that_stay_resident():
    """Interleaved 512 KiB blocks, every other one freed: the holes stay resident (their neighbours are
    live) and 1 MiB blocks do not fit them, so 16 MiB more of those raise the resident size by 16 MiB
    while the live bytes stay at 32 MiB. Peak RSS - peak live = the 16 MiB of holes."""
    out = subprocess.run([sys.executable, "-c", FRAGMENT, str(ROOT / "benchmarks" / "planner_vs_measured.py")],
                         capture_output=True, text=True, check=True)
    grew = json.loads(out.stdout)
    assert grew["rss"] == pytest.approx(48 * MiB, abs=6 * MiB)
    assert grew["live"] == pytest.approx(32 * MiB, abs=6 * MiB)


@pytest.mark.parametrize("flavor,tp,mb,cp", [("debug", 1, 4, 1), ("tiny", 2, 4, 1), ("debug", 2, 1, 1),
                                             ("debug", 1, 4, 2)])  # cp: a rank's seq / cp tokens
def test_gemm_roles_time_exactly_the_shapes_the_cost_model_prices(flavor, tp, mb, cp):
    """The CPU calibration's GEMM table holds every shape the cost model looks up for a layer and the
    output layer (recorded from compute.layer_parts and logits_times themselves) and nothing else, each
    with the products priced there: three per block weight (forward, input and weight gradient), plus the
    output layer's forward."""
    import dataclasses

    from apogee.models.flavors import FLAVORS
    from apogee.planner.cluster import get_accelerator
    from apogee.planner.compute import dense_layer_gemms, layer_parts, logits_times
    from apogee.planner.spec import shape_from_args

    class Recording(dict):
        def __contains__(self, key):
            looked.add(key)
            return False  # priced by the shape model; only the keys matter

    looked: set = set()
    cpu = dataclasses.replace(get_accelerator("cpu"), gemm_table=Recording())
    pvm = load_benchmark("planner_vs_measured")
    m = shape_from_args(FLAVORS[flavor], flavor=flavor, seq_len=128, vocab=256)
    layer_parts(m, tp, cp, 1, mb, tp > 1, "none", cpu, "fp32")
    logits_times(m, tp, cp, mb, cpu, "fp32")
    roles = pvm.gemm_roles(m, tp, cp, mb)
    tokens = mb * 128 // cp
    assert set(roles) == looked
    assert sum(len(r) for r in roles.values()) == 3 * len(dense_layer_gemms(m, tokens, tp)) + 1
    assert "wgrad" in roles[(m.hidden, m.ffn_hidden // tp, tokens)]  # w1's weight gradient: [h, tokens] x [tokens, f]


@pytest.mark.parametrize("nproc,cores,expected", [
    (4, 2, [[0, 1], [2, 3]]),  # pinned to cores 0, 1, 0, 1: one rank of each core per turn
    (2, 2, [[0, 1]]),  # every rank has a core: all at once
    (1, 2, [[0]]),
    (3, 2, [[0, 1], [2]]),
    (6, 4, [[0, 1, 2, 3], [4, 5]]),
    (3, 16, [[0, 1, 2]]),  # five cores each
])
def test_calibration_turns_never_put_two_ranks_on_one_core(nproc, cores, expected):
    """The CPU calibration times the compute primitives in turns of ranks on distinct cores, each pinned as
    the engine pins it (apogee.train.cpu_cores); the contention factor then applies the time-sharing once."""
    from apogee.train.cpu_cores import rank_cores

    pvm = load_benchmark("planner_vs_measured")
    got = pvm.turns(nproc, cores)
    assert got == expected
    for turn in got:
        held = [c for r in turn for c in rank_cores(list(range(cores)), r, nproc)]
        assert len(held) == len(set(held))
    assert sorted(r for t in got for r in t) == list(range(nproc))
