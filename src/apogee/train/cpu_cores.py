"""Which of the host's cores a CPU rank runs on, and with how many threads.

Ranks on one host share its cores. Left to the scheduler, their processes migrate between cores and a
rank waiting in a collective wakes up on whichever core is free. So each local rank gets cores of its
own, as torch's CPU launcher (``torch.backends.xeon.run_cpu``) gives instances: ``cores // ranks``
each where every rank gets one; otherwise one core each, dealt round-robin, so that consecutive ranks
(the innermost mesh axes: a tensor-parallel group, the data-parallel ranks of one pipeline stage), which
compute at the same moments, run on different cores.

Measured on this project's 2-core machine (benchmarks/planner_vs_measured.py's configs, minimum step
over 16, unpinned and pinned runs alternated, two rounds): tiny dp2 x tp2 on 4 ranks 0.344/0.368 s ->
0.310/0.312 s; debug pp=2 x dp2 on 4 ranks 0.705/0.688 -> 0.708/0.665; debug dp2 0.358/0.365 ->
0.344/0.341; debug pp=2 0.659/0.635 -> 0.640/0.624. Consecutive ranks on one core instead (blocks) gave
0.286/0.299 on tiny but 0.853/0.838 on pp=2 x dp2: a stage's two ranks then share one core while the
other idles in the pipeline's bubble. The README's run (debug dp2 x tp2, 4 ranks, more compute per rank
than tiny) took 126 s pinned and 124 s unpinned, with the same losses.
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
    return [allowed[local_rank % n]]


def pin_cpu_rank(local_rank: int, local_world: int) -> int:
    """Binds every thread of this process (gloo's and the runtime's included; threads started later
    inherit it) to the rank's cores and returns how many they are: the rank's intra-op thread count. Where
    the platform has no affinity calls (macOS), nothing is bound and the rank's share of the cores is
    returned (the same rule over all of them)."""
    if not hasattr(os, "sched_setaffinity"):
        return len(rank_cores(list(range(os.cpu_count() or 1)), local_rank, local_world))
    cores = rank_cores(sorted(os.sched_getaffinity(0)), local_rank, local_world)
    # Every thread by id where /proc lists them (Linux); elsewhere the calling thread (0) and its children.
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that has just exited
            pass
    return len(cores)
