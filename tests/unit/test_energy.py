"""The energy meter's window arithmetic (apogee.telemetry.energy) on a counter we drive by hand; NVML itself
is exercised on a GPU (tests/gpu/test_cuda.py)."""

from __future__ import annotations

import time

import pytest
import torch

from apogee.telemetry.energy import EnergyMeter, energy_record
from apogee.telemetry.metrics import format_record


def test_each_lap_is_the_counter_difference_since_the_last_one_on_one_reading():
    counter, reads = [1000.0], []

    def read():
        reads.append(counter[0])
        return counter[0]

    meter = EnergyMeter(read)
    counter[0] += 350.0
    assert meter.lap() == 350.0
    counter[0] += 150.0
    counter[0] += 42.5
    assert meter.lap() == 192.5  # the next window started where the last one ended
    assert len(reads) == 3  # one reading per window boundary: NVML's takes milliseconds


def test_a_started_meter_reads_nothing_on_lap_and_extrapolates_at_the_latest_power():
    clock, counter, reads = [10.0], [500.0], []

    def read():
        reads.append(counter[0])
        return counter[0]

    meter = EnergyMeter(read, clock=lambda: clock[0])
    meter.interval_s = 0.1  # as start() sets it, without its thread: samples taken by hand below
    clock[0], counter[0] = 10.1, 570.0  # 700 W
    meter.sample()
    meter.background = True  # as the thread sets it after its first reading: lap must not read
    clock[0] = 10.15
    assert meter.lap() == pytest.approx(70.0 + 35.0)  # 50 ms past the latest reading at 700 W
    clock[0], counter[0] = 10.2, 640.0
    meter.sample()
    clock[0] = 10.5  # the sampler is late: extrapolate over one interval at most
    assert meter.lap() == pytest.approx(640.0 + 70.0 - 605.0)
    assert len(reads) == 3  # the construction and the two samples; no lap read


def test_a_started_meter_reads_on_lap_until_its_thread_has_read():
    # A window shorter than the sampling interval, before the thread's first reading: the lap reads the
    # counter itself rather than report nothing drawn.
    counter = [100.0]
    meter = EnergyMeter(lambda: counter[0]).start(interval_s=60.0)
    counter[0] += 25.0
    assert meter.lap() == 25.0 and not meter.background
    meter.close()


def test_the_sampler_thread_keeps_the_counter_current_and_stops():
    counter = [0.0]

    def read():
        counter[0] += 1.0
        return counter[0]

    meter = EnergyMeter(read).start(interval_s=0.01)
    deadline = time.monotonic() + 5.0
    while counter[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert meter.background
    before = counter[0]
    assert meter.lap() >= 4.0  # the readings the thread took since the start
    meter.close()
    stopped_at = counter[0]
    time.sleep(0.05)
    assert counter[0] == stopped_at and meter.thread is None and not meter.background
    assert stopped_at - before <= 2  # the lap itself did not read (the thread may have once meanwhile)


def test_record_gives_power_per_gpu_and_energy_per_token():
    # 8 GPUs drew 28 kJ together over 5 s and 100k tokens: 700 W each, 0.28 J a token.
    assert energy_record(28_000.0, 5.0, 8, 100_000) == pytest.approx({"power_w": 700.0, "energy_j_per_token": 0.28})
    assert energy_record(10.0, 0.0, 1, 0) == {"power_w": 0.0, "energy_j_per_token": 0.0}


def test_no_meter_on_the_cpu():
    assert EnergyMeter.for_device(torch.device("cpu")) is None


def test_the_console_line_shows_power_only_where_it_was_measured():
    base = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0, "mfu": None, "mem_gib": 1.0}
    assert "W/GPU" not in format_record(base)
    line = format_record({**base, "power_w": 612.4, "energy_j_per_token": 0.0123})
    assert "612 W/GPU, 0.0123 J/token" in line


def test_the_trainer_stops_the_sampler_also_when_the_run_fails(tmp_path, monkeypatch):
    from apogee.config import load_config
    from apogee.train.trainer import Trainer

    meter = EnergyMeter(lambda: 0.0).start(interval_s=0.01)

    def failing_run(self):
        self.energy = meter
        raise RuntimeError("a rank failed mid-run")

    monkeypatch.setattr(Trainer, "run_loop", failing_run)
    with pytest.raises(RuntimeError, match="mid-run"):
        Trainer(load_config(None, {"run": {"dir": str(tmp_path)}})).fit()
    assert meter.thread is None and meter.stopping.is_set()
