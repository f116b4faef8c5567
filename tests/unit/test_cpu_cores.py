"""apogee.train.cpu_cores: which cores a CPU rank is pinned to, and that every thread of the process is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apogee.train.cpu_cores import rank_cores


@pytest.mark.parametrize("allowed,world,expected", [
    ([0, 1, 2, 3], 1, [[0, 1, 2, 3]]),
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
    ([0, 1, 2, 3], 3, [[0], [1], [2]]),  # one core left over, as the thread count cores // ranks leaves it
    ([4, 5, 6, 7], 2, [[4, 5], [6, 7]]),  # a cpuset's own ids
    ([0, 1], 4, [[0], [1], [0], [1]]),  # more ranks than cores: dealt round-robin
    ([0, 1], 3, [[0], [1], [0]]),
    ([2], 2, [[2], [2]]),
])
def test_rank_cores(allowed, world, expected):
    got = [rank_cores(allowed, r, world) for r in range(world)]
    assert got == expected
    assert all(cores and set(cores) <= set(allowed) for cores in got)
    if world <= len(allowed):  # every rank has cores no other rank runs on
        flat = [c for cores in got for c in cores]
        assert len(flat) == len(set(flat))


PIN = """
import json, os, threading
from apogee.train.cpu_cores import pin_cpu_rank
ready, done = threading.Event(), threading.Event()
tid = []
def worker():
    tid.append(threading.get_native_id()); ready.set(); done.wait()
t = threading.Thread(target=worker); t.start(); ready.wait()
n = pin_cpu_rank(1, 2)
main, other = sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(tid[0]))
print(json.dumps({"threads": n, "main": main, "other": other}))
done.set(); t.join()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux affinity calls and two cores")
def test_pin_cpu_rank_binds_every_thread_of_the_process():
    """Local rank 1 of 2 gets the second half of the cores, and a thread started before the call (as
    gloo's are, at init_process_group) is bound too."""
    allowed = sorted(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", PIN], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    half = allowed[len(allowed) // 2:2 * (len(allowed) // 2)]
    assert got == {"threads": len(half), "main": half, "other": half}
