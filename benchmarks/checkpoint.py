"""How long a checkpoint holds training up, sync vs async, and how fast saves and loads run compared
with the disk itself.

One process, a stack of Linear layers of about ``--params`` parameters with AdamW state (fp32:
12 bytes per parameter on disk), saved with apogee's Checkpointer (DCP shards, CRC-32 manifest,
fsync, rename, ``latest``):

- blocked: seconds the save holds the training loop (sync: the whole save; async: ``save()``
  itself plus any wait in ``wait_staged()`` before the next optimizer step, as the trainer does it:
  the host copy runs behind ``--step-s`` seconds of forward/backward, the write, checksums and
  rename behind the steps after);
- async total: from ``save()`` until the checkpoint is durable, while the loop keeps computing;
- throughput of save and of load (verify + read), against raw ``write + fsync`` and ``read`` of
  files of the same sizes in the same directory.

    python benchmarks/checkpoint.py --params 50e6 --dir /tmp/apogee-ckpt-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from apogee.checkpoint.dcp import Checkpointer  # noqa: E402
from apogee.checkpoint.manifest import MANIFEST  # noqa: E402


def build(params: float, width: int = 1024) -> tuple[nn.Module, torch.optim.Optimizer]:
    layers = max(1, round(params / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    optim.step()  # materialise exp_avg / exp_avg_sq
    return model, optim


def train_work(model: nn.Module, seconds: float) -> int:
    """Stand-in for training steps running while a save persists: matmuls for ``seconds``."""
    x, steps, end = torch.randn(64, model[0].in_features), 0, time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            model(x)
            steps += 1
    return steps


def raw_disk(directory: Path, sizes: list[int]) -> tuple[float, float]:
    """Seconds to write + fsync, and to read back, files of ``sizes`` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    payloads = [os.urandom(min(s, 64 << 20)) for s in sizes]
    start = time.perf_counter()
    for i, (size, chunk) in enumerate(zip(sizes, payloads)):
        with open(directory / f"raw{i}", "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(sizes)):
        with open(directory / f"raw{i}", "rb") as f:
            while f.read(8 << 20):
                pass
    read_s = time.perf_counter() - start
    shutil.rmtree(directory)
    return write_s, read_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--dir", default="/tmp/apogee-ckpt-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-s", type=float, default=1.0,
                        help="forward/backward seconds between save() and the next optimizer step")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    model, optim = build(args.params)
    n_params = sum(p.numel() for p in model.parameters())

    sync = Checkpointer(root / "sync", keep=1)
    asyn = Checkpointer(root / "async", keep=1, async_save=True)
    sync_s, blocked_s, durable_s, work_steps = [], [], [], []
    for step in range(1, args.repeats + 1):
        start = time.perf_counter()
        sync.save(step, model, optim, {"step": step})
        sync_s.append(time.perf_counter() - start)

        start = time.perf_counter()
        asyn.save(step, model, optim, {"step": step})
        # The loop goes on as the trainer's does: forward/backward (parameters read, not written),
        # then wait_staged() before the optimizer step writes them; later steps until durable.
        work_steps.append(train_work(model, args.step_s))
        asyn.wait_staged()
        optim.step()
        blocked_s.append(asyn.blocked_s[-1])
        work_steps[-1] += train_work(model, sync_s[-1] * 0.5)
        asyn.wait()
        durable_s.append(time.perf_counter() - start)
    asyn.close()

    path = sync.root / f"step-{args.repeats:08d}"
    sizes = [p.stat().st_size for p in path.iterdir() if p.name != MANIFEST]
    total = sum(sizes)
    fresh, fresh_optim = build(args.params)
    os.sync()
    start = time.perf_counter()
    sync.load(path, fresh, fresh_optim)
    load_s = time.perf_counter() - start
    write_s, read_s = raw_disk(root / "raw", sizes)

    best = min(sync_s)
    gb = total / 1e9
    result = {
        "params": n_params,
        "checkpoint_bytes": total,
        "files": len(sizes),
        "sync_save_s": round(best, 3),
        "async_blocked_s": [round(b, 3) for b in blocked_s],
        "async_blocked_fraction_of_sync": round(max(blocked_s) / best, 3),  # the worst save
        "async_until_durable_s": round(min(durable_s), 3),
        "save_GBps": round(gb / best, 3),
        "load_verified_GBps": round(gb / load_s, 3),
        "raw_write_fsync_GBps": round(gb / write_s, 3),
        "raw_read_GBps": round(gb / read_s, 3),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
