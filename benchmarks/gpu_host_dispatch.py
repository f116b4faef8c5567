"""Where a GPU step's wall time goes between the host and the device: the engine's step in three parts.

    python benchmarks/gpu_host_dispatch.py [--steps 12] [--out host.json]     # on a GPU

Trains each config below on one GPU (the settings of benchmarks/planner_vs_measured_gpu.py) and times,
per step, with the engine untouched (its methods wrapped in this process):
  - ``forward_backward``: every micro-batch's forward and backward. It ends in a device sync of its own
    (the step's loss as a Python float), so this is the micro-batches' device time, or the host's
    dispatch of them where that takes longer;
  - ``optimizer_step``: clipping (a sync on the gradient norm) and AdamW, timed to a device sync;
  - the rest of the step: logging, the data, the trainer's hooks (host only; the device idles);
  - ``forward_host``: each micro-batch's forward alone (the model and the loss), host time without a sync:
    what the host takes to enqueue it.
The seq32 configs run at 32 tokens a sequence: their kernels are tiny, so forward_backward is the host's
dispatch of the micro-batches (eager PyTorch: Python, autograd, autocast, kernel launches). Beside each
config the planner's dispatch (planner/host.gpu_dispatch_s: the engine's calls and autograd nodes at the
accelerator's host_call_s / host_node_s) is printed against forward_host and forward_backward. llama-1b
at 32 tokens is where those costs come from (cluster.H100_HOST_DISPATCH_S); the 4-layer Llama 3 8B at 32
tokens is held out. Kept runs: benchmarks/results/h100-host-dispatch.json; docs/planner.md, "Fused AdamW,
energy and the host at micro-batch 1" and "The host's dispatch as a floor".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from planner_vs_measured_gpu import one_gpu_config, planner_run  # noqa: E402

# name, flavor, model overrides, seq_len, global_batch, micro_batch
CONFIGS = [
    ("llama-1b seq32 mb1", "llama-1b", {}, 32, 2, 1),  # kernels of 32 tokens: the host's dispatch alone
    ("llama3-8b x4 layers seq32 mb1", "llama3-8b", {"n_layers": 4}, 32, 2, 1),  # other counts, held out
    ("llama-1b mb1", "llama-1b", {}, 2048, 2, 1),
    ("llama-1b mb4", "llama-1b", {}, 2048, 8, 4),
]
WARMUP_STEPS = 3


def timed_run(flavor: str, overrides: dict, seq: int, gb: int, mb: int, steps: int, cache: Path, d: Path,
              device: str = "cuda") -> dict:
    import torch

    from apogee.launch import launch_local
    from apogee.train.trainer import Trainer

    cfg = one_gpu_config(d, cache, flavor, overrides, seq, gb, mb, steps=steps, device=device)
    times: dict[str, list[float]] = {"forward_backward": [], "optimizer_step": [], "step": [], "forward_host": []}
    fb, opt, fwd = Trainer.forward_backward, Trainer.optimizer_step, Trainer.loss
    last = [None]

    def fwd_timed(self, micro):
        t = time.perf_counter()
        out = fwd(self, micro)
        times["forward_host"].append(time.perf_counter() - t)
        return out

    def fb_timed(self, batch):
        t = time.perf_counter()
        if last[0] is not None:
            times["step"].append(t - last[0])
        last[0] = t
        out = fb(self, batch)
        times["forward_backward"].append(time.perf_counter() - t)
        return out

    def opt_timed(self, *args, **kwargs):
        t = time.perf_counter()
        out = opt(self, *args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        times["optimizer_step"].append(time.perf_counter() - t)
        return out

    Trainer.forward_backward, Trainer.optimizer_step, Trainer.loss = fb_timed, opt_timed, fwd_timed
    try:
        launch_local(cfg, 1)
    finally:
        Trainer.forward_backward, Trainer.optimizer_step, Trainer.loss = fb, opt, fwd
    # Steps after warm-up; the last step's evaluation falls outside "step" (it is timed to the next start),
    # and its forward passes out of forward_host.
    micro = gb // mb
    times["forward_host"] = times["forward_host"][: len(times["forward_backward"]) * micro]
    body = {k: v[WARMUP_STEPS * (micro if k == "forward_host" else 1):] for k, v in times.items()}
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in body.items() if v}


def planner_dispatch(rec: dict, gpu: str = "h100-80gb") -> tuple[float, float]:
    """The planner's host dispatch of one micro-batch of ``rec``'s model, forward and backward (seconds)."""
    from apogee.planner.cluster import ACCELERATORS
    from apogee.planner.host import gpu_dispatch_s

    run, lay = planner_run(rec, ACCELERATORS[gpu])
    return gpu_dispatch_s(lay, run.cluster.accel, run.model.layers, head=True)


def planner_step(rec: dict, gpu: str = "h100-80gb", *, host: bool = True):
    """The planner's estimate of ``rec``'s step on one GPU (``host``: with the host's dispatch costs; without,
    the device's work alone)."""
    from apogee.planner.cluster import ACCELERATORS
    from apogee.planner.estimate import estimate

    acc = ACCELERATORS[gpu] if host else dataclasses.replace(ACCELERATORS[gpu], host_call_s=0.0, host_node_s=0.0)
    return estimate(*planner_run(rec, acc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default="", help="run only the configs whose name contains this text")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this measures a GPU's host and device")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as td:
        for i, (name, flavor, overrides, seq, gb, mb) in enumerate(CONFIGS):
            if args.only not in name:
                continue
            rec = {"config": name, "flavor": flavor, "overrides": overrides, "seq_len": seq, "global_batch": gb,
                   "micro_batch": mb, **timed_run(flavor, overrides, seq, gb, mb, args.steps, Path(td) / "cache",
                                                  Path(td) / f"run{i}")}
            out["runs"].append(rec)
            print(json.dumps(rec), flush=True)
    for r in out["runs"]:
        rest = r["step"]["min"] - r["forward_backward"]["min"] - r["optimizer_step"]["min"]
        print(f"{r['config']:<22} step {1e3 * r['step']['min']:7.1f} ms (min): forward_backward "
              f"{1e3 * r['forward_backward']['min']:7.1f}, optimizer_step {1e3 * r['optimizer_step']['min']:6.1f}, "
              f"rest {1e3 * rest:5.1f}  (medians {1e3 * r['step']['median']:.1f} / "
              f"{1e3 * r['forward_backward']['median']:.1f} / {1e3 * r['optimizer_step']['median']:.1f})")
        hf, hb = planner_dispatch(r)
        micro = r["global_batch"] // r["micro_batch"]
        est = planner_step(r)
        print(f"{'':<22} planner: host dispatch forward {1e3 * hf:5.1f} ms a micro-batch (measured "
              f"{1e3 * r['forward_host']['min']:5.1f}), forward + backward {1e3 * micro * (hf + hb):6.1f} ms a step; "
              f"step {1e3 * est.step_time_s:6.1f} ms, of which the GPU waits on the host {1e3 * est.host_wait_s:5.1f}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
