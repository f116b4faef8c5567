"""How many layers each pipeline stage gets: pure arithmetic, no torch, so that the planner
(apogee.planner.memory) and the engine (apogee.parallel.pipeline.split_layers) share one rule."""

from __future__ import annotations

import math


def balanced_stage_sizes(n_layers: int, n_stages: int, last_extra: float) -> list[int]:
    """Layers per stage, each at least one, minimising the most loaded stage, where a layer costs 1
    and the last stage carries ``last_extra`` more (its output projection, in layer units). Surplus
    layers come off the most loaded, latest stages first, so no stage holds more layers than the first."""
    if n_layers < n_stages:
        raise ValueError(f"{n_layers} layers cannot fill {n_stages} pipeline stages")
    extra = [0.0] * n_stages
    extra[-1] += last_extra
    # The smallest max-load T for which stages capped at T hold all the layers.
    for target in sorted({c + e for e in extra for c in range(1, n_layers + 1)}):
        caps = [max(1, math.floor(target - e + 1e-9)) for e in extra]
        if sum(caps) >= n_layers:
            break
    surplus = sum(caps) - n_layers
    while surplus:
        i = max((i for i in range(n_stages) if caps[i] > 1), key=lambda i: (caps[i] + extra[i], i))
        caps[i] -= 1
        surplus -= 1
    return caps
