"""Anomaly detection, the skip list, straggler scoring and the nan / spike / slow drills' parsing:
plain Python, no process group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apogee.config import ConfigError, load_config
from apogee.data.sampler import TrainSampler
from apogee.resilience.anomalies import NONFINITE, SPIKE, AnomalyDetector, SkipList
from apogee.resilience.faults import FaultInjector, parse_fault
from apogee.resilience.stragglers import StragglerDetector


def test_detector_flags_nonfinite_at_once_and_spikes_after_warmup():
    d = AnomalyDetector(spike_factor=3.0, warmup=3)
    assert d.flags(float("nan"), 1.0) == (True, False) and d.flags(1.0, float("inf")) == (True, False)
    assert d.flags(100.0, 1.0) == (False, False)  # no average yet: no spike during warm-up
    for loss in (4.0, 3.8, 3.6):
        assert d.decide(0, loss, 1.0, nonfinite=False, spike=False) is None
    assert d.flags(3.0 * d.average * 0.99, 1.0) == (False, False)
    assert d.flags(3.0 * d.average * 1.01, 1.0) == (False, True)
    anomaly = d.decide(5, 40.0, 1.0, nonfinite=False, spike=True)
    assert anomaly.reason == SPIKE and anomaly.step == 5 and d.good == 3  # not folded into the average
    assert d.decide(6, 1.0, 1.0, nonfinite=True, spike=False).reason == NONFINITE  # another rank's flag
    restored = AnomalyDetector(spike_factor=3.0, warmup=3)
    restored.load_state_dict(d.state_dict())
    assert restored.average == d.average and restored.good == d.good


def test_skip_list_persists_and_the_sampler_steps_over_it(tmp_path):
    SkipList(tmp_path, writer=True).add({"step": 2, "first_window": 8, "count": 4})
    SkipList(tmp_path, writer=False).add({"step": 9, "first_window": 99, "count": 4})  # not the writer
    skips = SkipList(tmp_path, writer=False)
    assert skips.windows() == [(8, 4)] and skips.at_step(2) == 1 and skips.at_step(3) == 0
    tokens = np.arange(10_000, dtype=np.int64) % 251
    plain, skipping = (TrainSampler(tokens, seq_len=16, seed=3) for _ in range(2))
    skipping.skip(*skips.windows()[0])
    batches = [plain.next_batch(global_batch=4, dp_rank=0, dp_size=1).inputs for _ in range(4)]
    got = [skipping.next_batch(global_batch=4, dp_rank=0, dp_size=1).inputs for _ in range(3)]
    assert torch.equal(got[0], batches[0]) and torch.equal(got[1], batches[1]) and torch.equal(got[2], batches[3])
    assert skipping.consumed == 16


def test_straggler_needs_consecutive_slow_steps_and_names_the_rank():
    d = StragglerDetector(4, factor=1.3, consecutive=3, skip_first=1)
    assert d.observe(1, [1.0, 1.0, 9.0, 1.0]) == []  # warm-up step
    assert d.observe(2, [1.0, 1.0, 2.0, 1.0]) == [] and d.observe(3, [1.0, 1.05, 2.0, 1.0]) == []
    assert d.observe(4, [1.0, 1.0, 1.2, 1.0]) == []  # back under the factor: the streak restarts
    found = [d.observe(s, [1.0, 1.0, 1.5, 1.0]) for s in (5, 6, 7, 8)]
    assert found[:2] == [[], []] and [f["rank"] for f in found[2]] == [2] and found[3] == []  # reported once
    assert found[2][0]["vs_peers"] == 1.5
    # One step's dip is no recovery: still slow afterwards, it is not reported again (the straggler drill
    # once saw its slowed rank named twice in 12 steps on a loaded runner).
    assert d.observe(9, [1.0, 1.0, 1.1, 1.0]) == []
    assert [d.observe(s, [1.0, 1.0, 1.5, 1.0]) for s in (10, 11, 12, 13)] == [[]] * 4
    # Recovered for `consecutive` steps, then slow anew for as many: a second event.
    assert [d.observe(s, [1.0, 1.0, 1.0, 1.0]) for s in (14, 15, 16)] == [[]] * 3
    again = [d.observe(s, [1.0, 1.0, 1.6, 1.0]) for s in (17, 18, 19)]
    assert again[:2] == [[], []] and [f["rank"] for f in again[2]] == [2]


def test_anomaly_and_slow_drills_parse_and_fire(tmp_path):
    nan = parse_fault("nan:step=3,times=2")
    assert nan.rank == -1 and nan.options["times"] == 2
    assert parse_fault("spike:step=4,factor=20").options["factor"] == 20.0
    slow = parse_fault("slow:rank=1,factor=1.5")
    assert (slow.rank, slow.step, slow.options["factor"]) == (1, 1, 1.5)
    for bad in ("slow:factor=2", "spike:step=2,factor=0.5", "nan:step=2,rank=1", "nan:step=2,times=0"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    # Every rank fires an every-rank fault, each with its own marker; times=2 fires twice, then not.
    for rank in (0, 1):
        injector = FaultInjector(["nan:step=3,times=2"], rank=rank, run_dir=tmp_path)
        assert injector("after_backward", 2, loss=1.0, model=model)["loss"] == 1.0
        assert math.isnan(injector("after_backward", 3, loss=1.0, model=model)["loss"])
        assert math.isnan(injector("after_backward", 3, loss=1.0, model=model)["loss"])
        assert injector("after_backward", 3, loss=1.0, model=model)["loss"] == 1.0
    assert torch.isnan(model.weight.grad).all()


def test_resilience_settings_are_validated():
    cfg = load_config(None, {"resilience": {"spike_factor": 5.0, "straggler_factor": 1.5}})
    assert cfg.resilience.spike_factor == 5.0 and cfg.resilience.max_anomalies == 3
    for bad in ({"spike_factor": 0.5}, {"max_anomalies": 0}, {"straggler_factor": 1.0}, {"exclude_stragglers": "maybe"}):
        with pytest.raises(ConfigError, match="resilience"):
            load_config(None, {"resilience": bad})
