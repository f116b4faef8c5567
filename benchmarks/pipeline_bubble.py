"""Pipeline bubble per schedule: measured idle fraction of each stage vs the theoretical bubble.

    python benchmarks/pipeline_bubble.py [--pp 4] [--microbatches 8] [--schedules gpipe,1f1b,...]

Runs apogee's own pipeline (``apogee.parallel.pipeline``: split, stages, torch schedules) on ``pp``
gloo ranks on this host, one CPU thread each, over a small Llama (8 layers, dim 256) and times
every compute action of every stage (forward, backward, and the weight-gradient half of a split
backward) by wrapping ``PipelineStage``'s ``*_one_chunk`` methods. A rank's idle fraction is
1 - (its compute time) / (the step's span, first action anywhere to last action anywhere), the
median over the timed steps. Theory, with m micro-batches, p ranks and v stages per rank, when
forward, backward-input and backward-weight take equal time:

    GPipe, 1F1B          (p - 1) / (m + p - 1)
    interleaved 1F1B     (p - 1) / (v m + p - 1)
    zero bubble (ZB1P)   (p - 1) / 3 / (v m + (p - 1) / 3)   (a third of the interleaved bubble)
    ZB-V                 ~0 (its schedule has no bubble when F = B = W)
    DualPipeV            not modelled here

The measured idle also holds the point-to-point time (send, receive, waiting on the neighbour):
``comm`` is the idle the schedule's theory does not account for (measured - theory). On a CPU
host with fewer cores than ranks the ranks also compete for cores, which stretches busy periods
and shrinks measured bubbles; read these as the shape of each schedule, not as GPU figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from apogee.models.flavors import ModelArgs  # noqa: E402
from apogee.models.init import init_weights  # noqa: E402
from apogee.models.llama import Transformer  # noqa: E402
from apogee.parallel.pipeline import Pipeline, available_schedules, split_model, stages_per_rank  # noqa: E402

ARGS = ModelArgs(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, ffn_hidden=768, vocab_size=256, max_seq_len=128)
MICRO_BATCH, SEQ = 2, 128


def theory(schedule: str, p: int, m: int, v: int) -> float | None:
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved-1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zero-bubble":
        return (p - 1) / 3 / (v * m + (p - 1) / 3)
    if schedule == "zbv":
        return 0.0
    return None


def _instrument(log: list) -> None:
    from torch.distributed.pipelining import stage as stage_mod

    base = stage_mod._PipelineStageBase
    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        original = getattr(base, name)

        def timed(self, *a, __original=original, **k):
            start = time.perf_counter()
            try:
                return __original(self, *a, **k)
            finally:
                log.append((start, time.perf_counter()))

        setattr(base, name, timed)


def _rank(rank: int, world: int, port: int, schedule: str, m: int, steps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    log: list = []
    _instrument(log)
    v = stages_per_rank(schedule, 0)
    with torch.device("meta"):
        model = Transformer(ARGS)
    model, stages = split_model(model, pp_rank=rank, pp=world, schedule=schedule, per_rank=v, seq_len=SEQ)
    init_weights(model, seed=0, device=torch.device("cpu"))
    loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()) / m  # noqa: E731
    pipe = Pipeline(model, stages, schedule=schedule, n_stages=world * v, n_microbatches=m,
                    group=dist.group.WORLD, device=torch.device("cpu"), loss_fn=loss_fn)
    tokens = torch.randint(0, ARGS.vocab_size, (m * MICRO_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    spans = []
    for step in range(steps + 1):  # the first step also infers shapes: not timed
        dist.barrier()
        log.clear()
        pipe.step(tokens[:, :-1], tokens[:, 1:])
        for p in model.parameters():
            p.grad = None
        first = torch.tensor([min(s for s, _ in log), -max(e for _, e in log)], dtype=torch.float64)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)  # earliest start, latest end over all ranks
        span = -first[1].item() - first[0].item()
        busy = sum(e - s for s, e in log)
        if step:
            spans.append((1 - busy / span, span))
    result = torch.tensor([statistics.median(i for i, _ in spans), statistics.median(s for _, s in spans)], dtype=torch.float64)
    gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, result)
    if rank == 0:
        out.put([g.tolist() for g in gathered])
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--schedules", default=",".join(available_schedules()))
    a = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"pp={a.pp}, m={a.microbatches} micro-batches of {MICRO_BATCH}x{SEQ} tokens, {ARGS.n_layers} layers, dim {ARGS.dim}; "
          f"{os.cpu_count()} CPU cores, gloo")
    print(f"{'schedule':18} {'v':>2} {'theory':>7} {'idle per stage (rank 0..p-1)':>34} {'mean':>6} {'comm':>6} {'step s':>7}")
    for i, schedule in enumerate(a.schedules.split(",")):
        if schedule not in available_schedules():
            print(f"{schedule:18} (not in torch {torch.__version__})")
            continue
        v = stages_per_rank(schedule, 0)
        if ARGS.n_layers < a.pp * v:
            print(f"{schedule:18} (needs {a.pp * v} layers)")
            continue
        out = ctx.SimpleQueue()
        mp.start_processes(_rank, args=(a.pp, 29650 + i, schedule, a.microbatches, a.steps, out), nprocs=a.pp,
                           start_method="spawn")
        rows = out.get()
        idle = [r[0] for r in rows]
        mean = sum(idle) / len(idle)
        th = theory(schedule, a.pp, a.microbatches, v)
        th_text = f"{th:7.3f}" if th is not None else "    n/a"
        comm = f"{mean - th:6.3f}" if th is not None else "   n/a"
        print(f"{schedule:18} {v:>2} {th_text} {' '.join(f'{x:6.3f}' for x in idle):>34} {mean:6.3f} {comm} {rows[0][1]:7.3f}")
    print("idle = 1 - compute / span per rank; comm = mean idle - theory (point-to-point and waiting not in the model)")


if __name__ == "__main__":
    main()
