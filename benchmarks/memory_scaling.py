"""Per-rank parameter + gradient + optimizer bytes of llama-1b (untied) under dp_shard x tp x pp in {1,2,4,8}.

    python benchmarks/memory_scaling.py [--flavor llama-1b] [--degrees 1,2,4,8]

Nothing is estimated by hand: for each layout the model is built on the meta device and put through
apogee's own ``parallelize_stages`` (pipeline split, tensor + sequence parallel, FSDP2) on a fake
process group (``torch.testing``'s ``fake`` backend) of the layout's world size, and each rank's
bytes are read off its local DTensor shards: fp32 parameters, fp32 gradients and AdamW's two fp32
moments, 16 bytes per local element. Ranks at data- and tensor-parallel coordinate 0 are measured
for every pipeline rank (FSDP's first shard is the largest when a dimension does not divide).

The check: the mean over pipeline ranks of the per-rank bytes, norms excluded (sequence parallel
keeps the norm gains replicated over tp, by design), is within 5% of the single-rank total divided
by dp_shard x tp x pp. ``max/mean`` shows the pipeline imbalance: the first stage holds the
embedding and the last the output projection (each vocab x dim, 262M parameters for llama-1b), which
no split by layer can spread; the per-rank maximum therefore stops falling as 1/pp once the
embedding dominates a stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from apogee.config import ParallelConfig  # noqa: E402
from apogee.models.flavors import get_flavor  # noqa: E402
from apogee.models.llama import Transformer  # noqa: E402
from apogee.parallel.apply import parallelize_stages  # noqa: E402
from apogee.parallel.mesh import Mesh  # noqa: E402

BYTES_PER_ELEMENT = 4 + 4 + 8  # fp32 parameter, gradient, AdamW exp_avg and exp_avg_sq


def rank_bytes(args, *, dp: int, tp: int, pp: int, rank: int, seq_len: int) -> tuple[int, int]:
    """(bytes excluding norms, norm bytes) held by ``rank`` of a dp_shard x tp x pp world."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dp * tp * pp)
    try:
        mesh = Mesh.build(ParallelConfig(dp_shard=dp, tp=tp, pp=pp), "cpu")
        with torch.device("meta"):
            model = Transformer(args)
        done = parallelize_stages(model, mesh, param_dtype=torch.float32, compile=False, seq_len=seq_len)
        body = norms = 0
        for name, p in done.model.named_parameters():
            n = (p.to_local() if isinstance(p, DTensor) else p).numel() * BYTES_PER_ELEMENT
            if name.endswith("norm.weight"):
                norms += n
            else:
                body += n
        return body, norms
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="llama-1b")
    parser.add_argument("--degrees", default="1,2,4,8")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tolerance", type=float, default=0.05)
    a = parser.parse_args()
    # Untied: pipeline parallelism keeps the embedding (first stage) and the output projection
    # (last stage) as two matrices (apogee rejects tied embeddings with pp > 1), so every layout is
    # measured on the untied shape, against the same one-rank total.
    args = dataclasses.replace(get_flavor(a.flavor), tie_embeddings=False)
    degrees = [int(d) for d in a.degrees.split(",")]
    total, total_norms = rank_bytes(args, dp=1, tp=1, pp=1, rank=0, seq_len=a.seq_len)
    gib = 2**30
    print(f"{a.flavor} (untied): {(total + total_norms) / BYTES_PER_ELEMENT / 1e9:.3f}B parameters, "
          f"{(total + total_norms) / gib:.2f} GiB of params + grads + AdamW on one rank (fp32)")
    print(f"{'dp_shard':>8} {'tp':>3} {'pp':>3} {'ranks':>5} {'GiB/rank':>9} {'ideal':>9} {'ratio':>6} "
          f"{'max/mean':>8} {'norms MiB':>9}  check")
    failures = 0
    for dp, tp, pp in itertools.product(degrees, degrees, degrees):
        if pp > args.n_layers:
            continue
        world = dp * tp * pp
        per_pp = [rank_bytes(args, dp=dp, tp=tp, pp=pp, rank=r * dp * tp, seq_len=a.seq_len) for r in range(pp)]
        bodies = [b for b, _ in per_pp]
        mean = sum(bodies) / pp
        ideal = total / world
        ratio = mean / ideal
        ok = abs(ratio - 1) <= a.tolerance
        failures += not ok
        print(f"{dp:>8} {tp:>3} {pp:>3} {world:>5} {mean / gib:9.4f} {ideal / gib:9.4f} {ratio:6.3f} "
              f"{max(bodies) / mean:8.2f} {max(n for _, n in per_pp) / 2**20:9.3f}  {'ok' if ok else 'FAIL'}")
    print(f"ratio = mean per-rank bytes (norms excluded) / (one-rank total / ranks); must be within "
          f"{a.tolerance:.0%}: {'all ok' if not failures else f'{failures} layouts outside'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
