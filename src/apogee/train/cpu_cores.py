"""Which of the host's cores a CPU rank runs on, and with how many threads.

Ranks on one host share its cores. Left to the scheduler, their processes migrate between cores and a
rank waiting in a collective wakes up on whichever core is free: four single-threaded ranks on two
cores (tiny dp_shard=2 x tp=2, benchmarks/planner_vs_measured.py's first config) stepped in 0.29-0.37 s
unpinned over seven runs, and in 0.26-0.27 s pinned as below (this project's 2-core machine). So each
local rank gets cores of its own, as torch's CPU launcher (``torch.backends.xeon.run_cpu``) gives
instances: ``cores // ranks`` each where every rank gets one, otherwise one core shared by consecutive
ranks (contiguous blocks: the innermost mesh axes, a tensor-parallel pair or a data-parallel pair of
one pipeline stage, share a core, and the stages run side by side; dealing ranks round-robin instead
measured 0.27 s).
"""

from __future__ import annotations

import os


def rank_cores(allowed: list[int], local_rank: int, local_world: int) -> list[int]:
    """The cores of ``allowed`` (sorted ids this process may use) that local rank ``local_rank`` of
    ``local_world`` runs on."""
    n = len(allowed)
    if local_world <= n:
        per_rank = n // local_world
        return allowed[local_rank * per_rank:(local_rank + 1) * per_rank]
    return [allowed[local_rank * n // local_world]]


def pin_cpu_rank(local_rank: int, local_world: int) -> int:
    """Binds every thread of this process (gloo's and the runtime's included; threads started later
    inherit it) to the rank's cores and returns how many they are: the rank's intra-op thread count. Where
    the platform has no affinity calls (macOS), nothing is bound and the share of the cores is returned."""
    if not hasattr(os, "sched_setaffinity"):
        return max(1, (os.cpu_count() or 1) // max(1, local_world))
    cores = rank_cores(sorted(os.sched_getaffinity(0)), local_rank, local_world)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that has just exited
            pass
    return len(cores)
