"""The engine's CUDA paths on one GPU (skipped without CUDA): bf16 training, asynchronous checkpoints
staged through pinned memory and a bit-identical resume, FSDP2 CPU offload on one GPU (the mixed
cuda:nccl,cpu:gloo process group), in-memory snapshots (CUDA RNG included) after a killed rank, and
per-block compile.

Each check is a function of the device, so the same bodies run on CPU as a dry run of the test
logic (``python tests/gpu/test_cuda.py cpu``); under pytest they run on ``cuda`` only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import full_state, read_metrics, tiny_config  # noqa: E402

from apogee.resilience.events import read_events  # noqa: E402
from apogee.resilience.supervisor import supervise  # noqa: E402
from apogee.train.trainer import Trainer  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def config(run_dir: Path, cache_dir: Path, device: str, **sections):
    sections.setdefault("run", {})["device"] = device
    return tiny_config(run_dir, cache_dir, **sections)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def check_async_resume_bit_identical(tmp: Path, cache_dir: Path, device: str) -> None:
    """Stopped at step 5 (async checkpoint staged via pinned memory on CUDA) and resumed: the step-10
    state and every logged loss equal the uninterrupted run's, bit for bit."""
    straight, resumed = tmp / "straight", tmp / "resumed"
    ck = {"interval": 5, "async_save": True}
    Trainer(config(straight, cache_dir, device, checkpoint=ck)).fit()
    Trainer(config(resumed, cache_dir, device, checkpoint=ck, run={"stop_at_step": 5})).fit()
    Trainer(config(resumed, cache_dir, device, checkpoint=ck)).fit()
    a = full_state(straight / "checkpoints" / "step-00000010")
    b = full_state(resumed / "checkpoints" / "step-00000010")
    assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(resumed) == losses(straight)
    got = read_metrics(straight)
    assert got[-1]["loss"] < got[0]["loss"] - 0.5  # it trains
    if device == "cuda":
        assert got[-1]["mem_gib"] > 0  # the CUDA allocator's peak is what mem_gib reports


def check_cpu_offload_matches(tmp: Path, cache_dir: Path, device: str) -> None:
    """FSDP2's CPUOffloadPolicy on one GPU (FSDP over a 1-rank mesh; process group cuda:nccl,cpu:gloo):
    weights, gradients and the optimizer step on the host, forward and backward on the GPU; the losses
    follow the plain run's (fused AdamW there, the CPU's foreach AdamW here: equal up to rounding)."""
    plain, offload = tmp / "plain", tmp / "offload"
    Trainer(config(plain, cache_dir, device)).fit()
    Trainer(config(offload, cache_dir, device, parallel={"cpu_offload": True})).fit()
    want, got = read_metrics(plain), read_metrics(offload)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=2e-2), g["step"]
    assert got[-1]["loss"] < got[0]["loss"] - 0.5


def check_snapshot_recovery(tmp: Path, cache_dir: Path, device: str) -> None:
    """`apogee launch`'s supervisor, one rank, killed after step 5 with snapshots every 2 steps and no
    durable checkpoint before the end: restored from the step-4 snapshot (CUDA RNG included), and the
    end state equals the uninterrupted run's bit for bit."""
    ck = {"interval": 20, "memory_interval": 2}
    res = {"max_restarts": 1, "hang_timeout_s": 60.0, "startup_timeout_s": 300.0}
    plain, killed = tmp / "plain-snap", tmp / "killed"
    assert supervise(config(plain, cache_dir, device, checkpoint=ck, resilience=res), 1, poll_s=0.1).step == 10
    cfg = config(killed, cache_dir, device, checkpoint=ck, resilience={**res, "inject": ["kill:rank=0,step=5"]})
    assert supervise(cfg, 1, poll_s=0.1).step == 10
    restored = next(e for e in read_events(killed) if e["event"] == "snapshot_restored")
    assert restored["step"] == 4 and restored["durable_step"] == 0
    a = full_state(plain / "checkpoints" / "step-00000010")
    b = full_state(killed / "checkpoints" / "step-00000010")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(killed) == losses(plain)


def check_compile_matches_eager(tmp: Path, cache_dir: Path, device: str) -> None:
    """Per-block torch.compile trains like eager: the same first loss, then within bf16 rounding."""
    eager, compiled = tmp / "eager", tmp / "compiled"
    Trainer(config(eager, cache_dir, device, train={"steps": 6})).fit()
    Trainer(config(compiled, cache_dir, device, train={"steps": 6, "compile": True})).fit()
    want, got = read_metrics(eager), read_metrics(compiled)
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-3)
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=2e-2), g["step"]


def test_replan_memory_check_reads_the_device():
    """The re-plan's memory check on a GPU (resilience.replan.memory_check) compares the planner's GiB per
    rank against this device's memory: Llama 3 8B's state whole on one rank (16 B/param) fits no single
    GPU; the verdict for each layout is exactly "needed > the device's GiB"; host ranks get no check."""
    from apogee.config import load_config
    from apogee.planner.export import engine_memory_gib
    from apogee.resilience.replan import memory_check, replan

    fits = memory_check(torch.device("cuda"))
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert fits is not None and 10 < capacity < 1000  # GiB, not bytes
    cfg = load_config(None, {"model": {"flavor": "llama3-8b"}, "parallel": {"dp_shard": 8, "tp": 1},
                             "train": {"global_batch": 32, "micro_batch": 1, "seq_len": 4096}})
    for world in (1, 2, 8):
        layout = replan(cfg, world)[1]
        need = engine_memory_gib(cfg, layout, vocab=256, bf16=True)  # the check's vocabulary: byte tokenizer
        verdict = fits(cfg, layout)
        assert (verdict is None) == (need <= capacity), (world, need, capacity, verdict)
        if world == 1:
            assert need > 8e9 * 16 / 2**30 and f"over the device's {capacity:.1f} GiB" in verdict
    assert memory_check(torch.device("cpu")) is None


def test_async_resume_bit_identical(tmp_path, cache_dir):
    check_async_resume_bit_identical(tmp_path, cache_dir, "cuda")


def test_cpu_offload_matches(tmp_path, cache_dir):
    check_cpu_offload_matches(tmp_path, cache_dir, "cuda")


def test_snapshot_recovery(tmp_path, cache_dir):
    check_snapshot_recovery(tmp_path, cache_dir, "cuda")


def test_compile_matches_eager(tmp_path, cache_dir):
    check_compile_matches_eager(tmp_path, cache_dir, "cuda")


def test_energy_counter_reads_the_device(tmp_path, cache_dir):
    """NVML's energy counter through apogee.telemetry.energy: a second of bf16 matmuls draws a board power
    between idle and well past any TDP (30-1500 W), and a training run logs that window's power and
    energy per token, the two consistent with its throughput on one GPU."""
    pytest.importorskip("pynvml")
    import time

    from apogee.telemetry.energy import EnergyMeter

    meter = EnergyMeter.for_device(torch.device("cuda"))
    assert meter is not None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    meter.lap()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    watts = meter.lap() / (time.perf_counter() - t0)
    assert meter.thread is not None  # still sampling: no read of the counter failed
    meter.close()
    assert 30 < watts < 1500, watts
    Trainer(config(tmp_path / "run", cache_dir, "cuda", run={"log_interval": 2})).fit()
    logged = [r for r in read_metrics(tmp_path / "run") if r["step"] > 1]
    assert logged and all(30 < r["power_w"] < 1500 for r in logged)
    for r in logged:
        assert r["energy_j_per_token"] == pytest.approx(r["power_w"] / r["tokens_per_s"], rel=1e-6)


if __name__ == "__main__":  # dry run of the test logic on another device: python tests/gpu/test_cuda.py cpu
    import tempfile

    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    only = sys.argv[2:] or ["async", "offload", "snapshot", "compile"]
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        for name, fn in (("async", check_async_resume_bit_identical), ("offload", check_cpu_offload_matches),
                         ("snapshot", check_snapshot_recovery), ("compile", check_compile_matches_eager)):
            if name in only:
                (root / name).mkdir()
                fn(root / name, root / "cache", dev)
                print(f"{name}: ok on {dev}", flush=True)

