"""Stragglers: ranks whose own compute is persistently slower than their peers'.

In a synchronous data-parallel job every rank's wall step time is the slowest rank's: the others
wait for it inside the collectives (FSDP's all-gathers and reduce-scatters, the gradient-norm
all-reduce). So wall step times cannot name the straggler. Each rank instead measures its *own*
compute: the CPU time its process spent in the step's forward/backward (``time.process_time``),
which excludes the time it sat blocked in a collective waiting for a peer. (On CUDA, where the host
only launches kernels, the trainer falls back to wall time, which includes those waits: there the
right measure is the kernels' own time, e.g. from CUPTI; not done yet.)

The times travel in the step's one small collective (``hooks.RankHooks.check_step``), so every rank
sees all of them and scores them (the same verdict everywhere, which an elastic shrink needs);
rank 0 reports. A rank is scored against the median of its peers (``vs_peers``)
and against its own baseline (the median of its first scored steps, ``vs_own``); ``vs_peers`` above
``factor`` for ``consecutive`` steps in a row is a straggler: one ``straggler`` event and one log
line, again only after the rank recovered (``consecutive`` steps in a row at or under the factor: one
step's dip in a noisy measurement is not a recovery) and slowed down anew.
"""

from __future__ import annotations

import statistics


def peer_medians(times: list[float]) -> list[float]:
    """For each rank, the median of the others' times: one sort, O(n log n) for the whole world
    (every rank scores every rank each step, so not O(n^2))."""
    order = sorted(range(len(times)), key=times.__getitem__)
    ranked = [times[i] for i in order]
    m = len(times) - 1  # peers per rank
    out = [0.0] * len(times)
    for pos, rank in enumerate(order):
        # The j-th smallest peer is ranked[j], or ranked[j + 1] from this rank's own place on.
        hi = ranked[m // 2 if m // 2 < pos else m // 2 + 1]
        if m % 2:
            out[rank] = hi
        else:
            lo = ranked[m // 2 - 1 if m // 2 - 1 < pos else m // 2]
            out[rank] = (lo + hi) / 2
    return out


class StragglerDetector:
    def __init__(self, world: int, *, factor: float = 1.3, consecutive: int = 5, skip_first: int = 1,
                 baseline_steps: int = 5):
        self.world = world
        self.factor = factor
        self.consecutive = consecutive
        self.skip_first = skip_first  # the first steps of a process warm up (allocations, caches)
        self.baseline_steps = baseline_steps
        self.seen = 0
        self.streak = [0] * world
        self.healthy = [0] * world  # steps in a row at or under the factor
        self.baseline: list[list[float]] = [[] for _ in range(world)]
        self.reported: set[int] = set()

    def observe(self, step: int, times: list[float]) -> list[dict]:
        """Score one step's per-rank compute times; returns the stragglers newly found."""
        self.seen += 1
        if self.seen <= self.skip_first or len(times) < 2:
            return []
        found = []
        medians = peer_medians(times)
        for rank, t in enumerate(times):
            peers = medians[rank]
            vs_peers = t / peers if peers > 0 else 1.0
            own = self.baseline[rank]
            if len(own) < self.baseline_steps:
                own.append(t)
            base = statistics.median(own)
            if vs_peers > self.factor:
                self.streak[rank] += 1
                self.healthy[rank] = 0
            else:
                self.streak[rank] = 0
                self.healthy[rank] += 1
                if self.healthy[rank] >= self.consecutive:
                    self.reported.discard(rank)
            if self.streak[rank] >= self.consecutive and rank not in self.reported:
                self.reported.add(rank)
                found.append({"rank": rank, "step": step, "vs_peers": round(vs_peers, 3),
                              "vs_own": round(t / base, 3) if base > 0 else None, "compute_s": round(t, 4),
                              "peers_median_s": round(peers, 4), "steps": self.streak[rank]})
        return found
