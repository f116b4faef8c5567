"""The straggler drill (2 gloo ranks, tiny model): one rank computes twice as slowly; the job names
that rank, and only it, within 20 steps, and finishes on its own. With exclude_stragglers on, the
one node cannot shrink to nothing: it says so once and keeps the rank."""

from __future__ import annotations

import pytest

from apogee.resilience.events import read_events
from apogee.resilience.supervisor import supervise
from helpers import tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("slow_rank", [1])
def test_straggler_drill_names_the_rank(slow_rank, tmp_path, cache_dir):
    # 20 steps, as the docstring promises: the tiny model's steps are ~40 ms of CPU, so the fast rank's own
    # noise now and then pulls a step's ratio under the factor and restarts the 5-step streak (a CI run at
    # 12 steps found none; a probe run had a step at 1.18x among ones at 1.9-2.1x).
    cfg = tiny_config(tmp_path, cache_dir, steps=20, parallel={"dp_shard": 2},
                      resilience={"max_restarts": 0, "hang_timeout_s": 30.0, "startup_timeout_s": 120.0,
                                  "exclude_stragglers": True, "inject": [f"slow:rank={slow_rank},factor=2"]})
    result = supervise(cfg, 2, poll_s=0.1)
    assert result.step == 20
    found = [e for e in read_events(tmp_path) if e["event"] == "straggler"]
    assert [e["rank"] for e in found] == [slow_rank], found
    assert found[0]["step"] <= 20 and found[0]["vs_peers"] > 1.3
    skipped = [e for e in read_events(tmp_path) if e["event"] == "exclusion_skipped"]
    assert [(e["rank"], e["node"]) for e in skipped] == [(slow_rank, 0)] and "only node" in skipped[0]["reason"]
    assert not [e for e in read_events(tmp_path) if e["event"] in ("exclusion", "node_left", "replanned")]
