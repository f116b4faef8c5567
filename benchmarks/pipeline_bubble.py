"""Pipeline bubble per schedule: measured idle of each stage vs theory plus measured communication.

    python benchmarks/pipeline_bubble.py [--pp 4] [--microbatches 8] [--steps 5] [--schedules gpipe,1f1b,...]
                                         [--dim 256] [--seq 128] [--cpu-quota auto|CORES]
                                         [--cpu-period-ms 10] [--fixed-ms MS] [--dump PREFIX]
    python benchmarks/pipeline_bubble.py --dim 32 --seq 32 --steps 3 --fixed-ms 200   # equal devices: the verdict

Runs apogee's own pipeline (``apogee.parallel.pipeline``: split, stages, torch schedules) on ``pp``
gloo ranks on this host (one process each, one intra-op thread each), over a small Llama (8 layers,
dim 256 unless `--dim`), every schedule in one launch. Per rank and per step it records timestamps (one monotonic
clock shared by the processes of a host) of:

* every compute action: forward, backward (full, or its input-gradient half ``I``), the
  weight-gradient half ``W``, and the loss, by wrapping ``PipelineStage``'s ``*_one_chunk`` methods
  and the loss function;
* every point-to-point operation, by wrapping the two functions all of torch's schedules send and
  receive through (``torch.distributed.pipelining.schedules._batch_p2p``, which issues the
  ``isend``/``irecv`` of a batch, ``_sorted_batch_p2p`` included, and ``_wait_batch_p2p``, which
  waits on their works): when each op was issued, and when its wait started and ended.

Measured idle of a rank = 1 - (its compute time) / (the step's span: first compute action anywhere
to last anywhere); the median over the timed steps is reported.

Measured communication (``comm``). Time blocked in a p2p wait is partly waiting for the neighbour
to get there (that is bubble) and partly moving the data. Gloo matches the k-th send from A to B
with the k-th receive on B from A, so every message is paired with its other end. A receive's
transfer part is from max(wait start, the matching send's issue) to the wait's end; a send's is
from max(wait start, the matching receive's post) to its end; plus the time spent issuing ops.
Each interval lies inside its own wait, so they never overlap. ``comm`` = the sum / span, per rank.
As a cross-check that does not depend on the pairing, a ping-pong between every pair of
neighbouring ranks before the run gives the isolated one-way time of a 4-byte and an
activation-sized message (latency + bytes / bandwidth; the minimum over 30 laps, the pure transfer
cost); ``pp est`` = that time for every message a rank sends or receives in a step (counted by the
wrappers), over the span: an estimate that assumes no send overlaps a receive or compute and no
CPU contention. On a busy host the measured ``comm`` is far above it: a few messages whose data
was sent and whose receiver was waiting still take milliseconds to land (neither end got a core),
while most land before the receiver asks for them (``recv/send ms``, the median per message).

Theory (``theor``): the bubble of the schedule's own action order (the order each rank executed, which
torch's schedule fixes in advance) replayed with every stage's forward (F), backward-input (I) and
backward-weight (W) equal (a full backward B = I + W), the loss free and communication free. Actions
torch issues as one (DualPipeV's OVERLAP_F_B pairs a forward and a backward of two chunks, and its
lowering receives both inputs before either runs) start together in the replay (_joint_actions). For
the four schedules with a closed form it equals the formula (``formula``), with m micro-batches, p
ranks and v stages per rank:

    GPipe, 1F1B          (p - 1) / (m + p - 1)
    interleaved 1F1B     (p - 1) / (v m + p - 1)
    zero bubble (ZB1P)   (p - 1) / 3 / (v m + (p - 1) / 3)   (a third of the interleaved bubble)
    ZB-V                 0 in the paper's limit; torch's order at p = 4, m = 8 leaves (p - 1) / 3 /
                         (v m + (p - 1) / 3) = 0.059, as ZB1P, which is what ``theor`` gives
    DualPipeV            no closed form here; ``theor`` from torch's order with its joint pairs: 0.111
                         at p = 4, m = 8 (0.059 if the pairs started independently)

The 1F1B-family formulas do not depend on the F : B ratio as long as all stages cost the same
(their bubble is (p - 1)(F + B) against m(F + B) of work). The zero-bubble ones do: ZB1P's bubble
is (p - 1)(F + I - W) per chunk, a third of 1F1B's only when F = I = W, and ZB-V is bubble-free only
when F = I = W. On a CPU, B = I + W is about 2 F and I and W differ, so the measured F / B / I / W
per micro-batch and chunk are printed. ``sim`` replays each rank's executed action order with each
action's measured duration in that step and free communication: the bubble this schedule has with
the costs it really had, unequal stages and ranks of unequal speed included (median over steps); it
is a diagnostic, the verdict is against the theory, as the criterion asks:
|mean idle - (theory + comm)| / (theory + comm) <= 10%.

On a host with fewer cores than ranks (pp=4 on 2 cores) uncapped ranks compete for cores: busy periods
in the steady state (all ranks computing) are stretched and those in the fill and drain are not, which
shrinks the neighbour waiting (``nbr w``) below the formula. ``--cpu-quota`` (default ``auto``)
therefore puts each rank in a cgroup of its own with a CFS bandwidth quota of cores / pp (0.5 of a core
each for pp=4 on 2 cores, 5 ms in every 10 ms, ``--cpu-period-ms``): the ranks together never ask for
more than the host has, so each behaves as a device of fixed speed, as a GPU does, nearly: 1-2 ms
periods leave the capped ranks unequally slow (up to ~15% apart for the same work), 10 ms ones equalise
them (see DEFAULT_CPU_PERIOD_MS). It needs a writable cgroup hierarchy (root); without one, ``auto``
says so and runs uncapped. At the default ``--dim 256`` the schedule's own host work between actions
(``other``) is a sizeable share; ``--dim 768`` makes compute dominate. What stays: on a shared virtual
machine the same action's CPU time varies by +-20% from one call to the next even in a process alone
(user time; keeping glibc's freed heap removes ~9 ms of page faults per dim-768 layer but not that, and
made a rank abort at exit), so some actions run late and their successors wait; ``sim`` shows how much
bubble that adds, and ``noisy`` what equal devices with that spread would give (_noisy_equal_devices):
measured idle is within 4-14% of noisy + comm for every schedule, the zero-bubble family included, where
it is 50-85% from theory + comm. Other jobs on the host stall ranks at random: those stalls land in
``comm`` (and in compute), and the figures move by a few points between runs. ``--dump PREFIX`` keeps
the raw timestamps for such analysis.

Equal devices (``--fixed-ms MS``): the CPU cannot make four ranks equally fast (on the H100 machine's
16 idle cores too, with a core per rank: the same block's forward varied with a 12-40% coefficient of
variation, and every schedule missed theory + comm, by 13-209%), so the verdict needs devices whose work
takes a fixed time, as a GPU kernel's nearly does. With ``--fixed-ms`` every transformer block's
forward, input-gradient and weight-gradient work each take MS milliseconds more than the block's real
compute (a sleep in an autograd function on the block's input, and in one on a weight of its own for
the weight gradient: each runs in the pass where torch's schedules put that work). Everything else is
the real run: apogee's split and stages, torch's schedules and their action orders, gloo's p2p,
the loss, the host work between actions. A small model (``--dim 32 --seq 32``) keeps the real compute
near 1% of MS. What is then measured is whether the pipeline adds idle beyond its schedule's bubble and
its communication. At MS = 200 on 6 spare cores of the H100 machine every schedule is within 0.1-6.0%
of theory + comm (gpipe 0.3, 1f1b 0.1, interleaved 0.5, zero-bubble 6.0, zbv 3.2, dualpipev 0.7%). On
2 shared cores the 1F1B family and DualPipeV stay within 1%, while the zero-bubble pair moves between
5% and 11% from run to run: each pipeline hop costs ~3 ms of host latency (a rank wakes, posts its
receive, starts), ~0.5 points of idle against a 5.9% bubble; at MS = 400 they are within 2-3%. Torch's
first stage has no input gradient to compute: its I is empty and its W does the whole backward (the
replay of such orders gives the same bubble).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections import defaultdict
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


def _configure(dim: int, seq: int) -> None:
    """The model's width and sequence length (``--dim``, ``--seq``), set in every spawned rank."""
    global ARGS, SEQ, _ACT_ELEMS
    ARGS = ModelArgs(dim=dim, n_layers=8, n_heads=4, n_kv_heads=4, ffn_hidden=3 * dim, vocab_size=256, max_seq_len=seq)
    SEQ = seq
    _ACT_ELEMS = MICRO_BATCH * SEQ * ARGS.dim


TOLERANCE = 0.10
now = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across the processes of one host


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


# --- per-process instrumentation -------------------------------------------------------------
# COMPUTE: (kind, stage, micro-batch, start, end), kind in F B I W L (L: loss, on the last stage)
# P2P: [peer, is_send, nbytes, batch issue start, batch issue end, wait start, wait end]
COMPUTE: list[tuple] = []
P2P: list[list] = []
_WORKS: dict[int, tuple] = {}


def _instrument() -> None:
    from torch.distributed.pipelining import schedules as sched_mod
    from torch.distributed.pipelining import stage as stage_mod

    base = stage_mod._PipelineStageBase

    def kind_of(name, a, k):
        if name == "forward_one_chunk":
            return "F"
        if name == "backward_weight_one_chunk":
            return "W"
        full = k.get("full_backward", a[2] if len(a) > 2 else True)
        return "B" if full else "I"

    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        original = getattr(base, name)

        def timed(self, *a, __original=original, __name=name, **k):
            start = now()
            try:
                return __original(self, *a, **k)
            finally:
                COMPUTE.append((kind_of(__name, a, k), self.stage_index, a[0] if a else -1, start, now()))

        setattr(base, name, timed)

    batch_p2p = sched_mod._batch_p2p

    def timed_batch_p2p(p2p_ops, desc=None):
        start = now()
        works = batch_p2p(p2p_ops, desc)
        end = now()
        # gloo does not coalesce: one work per op, in order (torch 2.13 batch_isend_irecv)
        assert len(works) == len(p2p_ops), (len(works), len(p2p_ops))
        for op, work in zip(p2p_ops, works):
            rec = [op.peer, op.op is dist.isend, op.tensor.numel() * op.tensor.element_size(), start, end, None, None]
            P2P.append(rec)
            _WORKS[id(work)] = (work, rec)
        return works

    def timed_wait(works):
        for work in works:
            start = now()
            work.wait()
            end = now()
            entry = _WORKS.pop(id(work), None)
            if entry is not None and entry[1][5] is None:
                entry[1][5], entry[1][6] = start, end

    sched_mod._batch_p2p = timed_batch_p2p  # _sorted_batch_p2p calls it through the module too
    sched_mod._wait_batch_p2p = timed_wait


def _pingpong(rank: int, world: int, nbytes: int, iters: int = 30, warm: int = 3) -> dict:
    """One-way seconds per neighbour pair {(a, b): (4 bytes, nbytes, 4 bytes min, nbytes min)}: half a
    round trip, median (printed: it holds the host's scheduling noise) and minimum (the pure transfer
    cost, used for ``pp est``) over ``iters`` laps."""
    pairs = sorted({tuple(sorted((r, (r + 1) % world))) for r in range(world)})
    out = {}
    for a, b in pairs:
        times = []
        for n in (1, nbytes // 4):
            buf = torch.zeros(n)
            dist.barrier()
            if rank in (a, b):
                peer = b if rank == a else a
                laps = []
                for _ in range(warm + iters):
                    t0 = now()
                    if rank == a:
                        dist.send(buf, peer)
                        dist.recv(buf, peer)
                    else:
                        dist.recv(buf, peer)
                        dist.send(buf, peer)
                    laps.append(now() - t0)
                times.append((statistics.median(laps[warm:]) / 2, min(laps[warm:]) / 2))
        if rank == a:
            out[(a, b)] = (times[0][0], times[1][0], times[0][1], times[1][1])
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return {k: v for g in gathered for k, v in g.items()}


class _Hold(torch.autograd.Function):
    """Identity on a block's input whose forward and backward each take ``cost`` seconds more: the
    block's input-gradient work (I, or its part of a full backward B) on an ideal device."""

    @staticmethod
    def forward(ctx, x, cost):
        time.sleep(cost)
        ctx.cost = cost
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.cost)
        return grad, None


class _WeightHold(torch.autograd.Function):
    """A zero that depends on a weight of its own: its backward, which runs with the weight gradients
    (W, or their part of a full backward B), takes ``cost`` seconds."""

    @staticmethod
    def forward(ctx, weight, cost):
        ctx.cost, ctx.shape = cost, weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.cost)
        return grad.new_zeros(ctx.shape), None


def _fix_block_costs(model, cost: float) -> None:
    """``--fixed-ms``: every transformer block's forward, input-gradient and weight-gradient work take
    ``cost`` seconds more than its (small) real compute, each in the pass where torch's schedules run
    it: the equal stages with F = I = W that the theory assumes, free of the CPU's timing noise. The
    schedule, the stages, their p2p and every other cost stay real."""
    for block in model.layers.values():
        # A weight of its own: one shared with the real compute merges the two in torch's weight-gradient
        # grouping (stage_backward_weight), which then runs a freed part of the graph twice.
        block.hold_weight = torch.nn.Parameter(torch.zeros(()))
        block.register_forward_pre_hook(lambda mod, args: (_Hold.apply(args[0], cost), *args[1:]))
        block.register_forward_hook(lambda mod, args, out: out + _WeightHold.apply(mod.hold_weight, cost))


def _joint_actions(pipe: Pipeline, rank: int) -> list:
    """The compute actions torch's schedule issues together (DualPipeV's OVERLAP_F_B: a forward and a
    backward of two chunks; its lowering receives both inputs before either runs), as lists of
    (kind, stage, micro-batch) in execution order."""
    order = (getattr(pipe.schedule, "pipeline_order", None) or {}).get(rank) or []
    return [[(sub.computation_type.value, sub.stage_index, sub.microbatch_index) for sub in a.sub_actions]
            for a in order if a is not None and getattr(a, "sub_actions", None)]


def _run_schedule(rank: int, world: int, schedule: str, m: int, steps: int, fixed_s: float = 0.0
                  ) -> tuple[list, list]:
    v = stages_per_rank(schedule, 0)
    with torch.device("meta"):
        model = Transformer(ARGS)
    model, stages = split_model(model, pp_rank=rank, pp=world, schedule=schedule, per_rank=v, seq_len=SEQ)
    init_weights(model, seed=0, device=torch.device("cpu"))
    if fixed_s:
        _fix_block_costs(model, fixed_s)

    def loss_fn(logits, y):
        start = now()
        last = next((c for c in reversed(COMPUTE) if c[0] == "F"), ("F", -1, -1))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / m
        COMPUTE.append(("L", last[1], last[2], start, now()))
        return loss

    pipe = Pipeline(model, stages, schedule=schedule, n_stages=world * v, n_microbatches=m,
                    group=dist.group.WORLD, device=torch.device("cpu"), loss_fn=loss_fn)
    tokens = torch.randint(0, ARGS.vocab_size, (m * MICRO_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    logs = []
    for step in range(steps + 1):  # the first step also infers shapes and sets up p2p: not timed
        dist.barrier()
        COMPUTE.clear()
        P2P.clear()
        _WORKS.clear()
        pipe.step(tokens[:, :-1], tokens[:, 1:])
        for p in model.parameters():
            p.grad = None
        if step:
            logs.append((list(COMPUTE), [tuple(r) for r in P2P]))
    gathered, joint = [None] * world, [None] * world
    dist.all_gather_object(gathered, logs)
    dist.all_gather_object(joint, _joint_actions(pipe, rank))
    return gathered, [group for rank_groups in joint for group in rank_groups]  # [rank][step] -> (compute, p2p)


# --- analysis (rank 0) -----------------------------------------------------------------------

def _clip(a: float, b: float, lo: float, hi: float) -> float:
    return max(0.0, min(b, hi) - max(a, lo))


def _analyse_step(per_rank: list, world: int, pingpong: dict) -> dict:
    """per_rank[r] = (compute, p2p) of one step -> per-rank fractions of the step's span."""
    lo = min(c[3] for comp, _ in per_rank for c in comp)
    hi = max(c[4] for comp, _ in per_rank for c in comp)
    span = hi - lo
    busy = [sum(c[4] - c[3] for c in comp) for comp, _ in per_rank]
    # time inside p2p calls (issuing a batch once, and every wait)
    p2p_time, comm_time, est_time = [0.0] * world, [0.0] * world, [0.0] * world
    for r, (_, p2p) in enumerate(per_rank):
        for issue in {(x[3], x[4]) for x in p2p}:
            d = _clip(issue[0], issue[1], lo, hi)
            p2p_time[r] += d
            comm_time[r] += d
        for x in p2p:
            if x[5] is not None:
                p2p_time[r] += _clip(x[5], x[6], lo, hi)
            small, big = pingpong[tuple(sorted((r, x[0])))][2:]  # minimum: the pure transfer cost
            est_time[r] += small + (big - small) * max(0, x[2] - 4) / max(1, 4 * _ACT_ELEMS - 4)
    # pair the k-th send A -> B with the k-th receive on B from A
    paired, per_msg = True, {"recv": [], "send": []}
    for a in range(world):
        for b in range(world):
            if a == b:
                continue
            sends = [x for x in per_rank[a][1] if x[0] == b and x[1]]
            recvs = [x for x in per_rank[b][1] if x[0] == a and not x[1]]
            if len(sends) != len(recvs):
                paired = False
                continue
            for s, q in zip(sends, recvs):
                if q[5] is not None:  # receive: transfer part starts when both are there
                    comm_time[b] += _clip(max(q[5], s[3]), q[6], lo, hi)
                    per_msg["recv"].append(max(0.0, q[6] - max(q[5], s[3])))
                if s[5] is not None:  # send: likewise, from the receive's post
                    comm_time[a] += _clip(max(s[5], q[3]), s[6], lo, hi)
                    per_msg["send"].append(max(0.0, s[6] - max(s[5], q[3])))
    return {
        "span": span,
        "idle": [1 - b / span for b in busy],
        "p2p": [t / span for t in p2p_time],
        "comm": [t / span for t in comm_time] if paired else None,
        "est": [t / span for t in est_time],
        "msgs": [len(p2p) for _, p2p in per_rank],
        "per_msg": per_msg if paired else None,
    }


def _kind_costs(logs: list) -> dict:
    """Median seconds per action kind, over ranks, stages and steps (robust to a busy host)."""
    by_kind = defaultdict(list)
    for rank_logs in logs:
        for comp, _ in rank_logs:
            for kind, _, _, s, e in comp:
                by_kind[kind].append(e - s)
    return {k: statistics.median(x) for k, x in by_kind.items()}


def _simulate(orders: list, cost, n_stages: int, joint: list = ()) -> list[float]:
    """Replay each rank's action order with ``cost(kind, stage, micro-batch)`` seconds per action and
    free communication: idle per rank. ``joint``: groups of actions issued together (_joint_actions):
    whichever runs first starts only once every member's input is there."""
    index = {tuple(a): i for order in orders for i, a in enumerate(order)}
    first_of = {}
    for group in joint:
        members = [tuple(a) for a in group]
        first_of[min(members, key=lambda a: index.get(a, 0))] = members

    done: dict = {}

    def ready(kind, stage, mb):
        if kind == "F" and stage > 0:
            return done.get(("F", stage - 1, mb))
        if kind in ("B", "I") and stage < n_stages - 1:
            return done.get(("B", stage + 1, mb), done.get(("I", stage + 1, mb)))
        return 0.0  # same-rank dependencies hold by the order

    pos = [0] * len(orders)
    free = [0.0] * len(orders)
    busy = [0.0] * len(orders)
    progress = True
    while progress:
        progress = False
        for r, order in enumerate(orders):
            while pos[r] < len(order):
                kind, stage, mb = order[pos[r]]
                deps = [ready(*a) for a in first_of.get((kind, stage, mb), [(kind, stage, mb)])]
                if None in deps:
                    break
                dep = max(deps)
                start = max(free[r], dep)
                c = cost(kind, stage, mb)
                free[r] = start + c
                busy[r] += c
                done[(kind, stage, mb)] = free[r]
                pos[r] += 1
                progress = True
    if any(p < len(o) for p, o in zip(pos, orders)):
        return [float("nan")] * len(orders)
    span = max(free)
    return [1 - b / span for b in busy]


def _noisy_equal_devices(logs: list, orders: list, n_stages: int, joint: list = (), trials: int = 200,
                         seed: int = 0) -> float:
    """Expected bubble of the executed orders on equal devices whose action times vary as measured.

    Each action's measured duration is divided by its rank's mean for that kind (removing which rank
    was faster) and scaled by the mean over all ranks; each trial draws every action's duration from
    that pool (by kind, the first stage's apart: its input-gradient half is empty) and replays the
    orders with free communication. The mean idle over trials: what the theory becomes once the
    devices are as noisy as these, and no more unequal than the theory's."""
    by_rank = defaultdict(list)
    for r, rank_logs in enumerate(logs):
        for comp, *_ in rank_logs:
            for kind, stage, _, s, e in comp:
                by_rank[r, kind, stage == 0].append(e - s)
    overall = defaultdict(list)
    for (_, kind, first), xs in by_rank.items():
        overall[kind, first].extend(xs)
    pool = defaultdict(list)
    for (r, kind, first), xs in by_rank.items():
        mean_r, mean_all = statistics.mean(xs), statistics.mean(overall[kind, first])
        pool[kind, first].extend(x / mean_r * mean_all if mean_r else x for x in xs)
    rng = random.Random(seed)
    idle = [statistics.mean(_simulate(orders, lambda k, st, mb: rng.choice(pool[k, st == 0]), n_stages, joint))
            for _ in range(trials)]
    return statistics.mean(idle)


# The costs the theory assumes: every stage's forward, input-gradient and weight-gradient halves equal
# (a full backward is both), the loss free.
def unit_cost(kind: str, stage: int, mb: int) -> float:
    return {"B": 2.0, "L": 0.0}.get(kind, 1.0)

_ACT_ELEMS = MICRO_BATCH * SEQ * ARGS.dim


def xfer(steps_stats: list) -> str:
    if any(st["per_msg"] is None for st in steps_stats):
        return "n/a".rjust(12)
    r = [t for st in steps_stats for t in st["per_msg"]["recv"]]
    s = [t for st in steps_stats for t in st["per_msg"]["send"]]
    return f"{statistics.median(r) * 1e3:5.2f} /{statistics.median(s) * 1e3:5.2f}" if r and s else "-".rjust(12)


# CFS bandwidth period: a capped rank runs share x period, then waits for the next period (the kernel's
# shortest period is 1 ms; with share 0.5 that made an effective 2 ms period here). Measured here (4
# ranks at 0.5 core on 2 cores, a matmul loop with pauses): short periods cost each rank 20-40% of its
# throughput in switches and cache refills, unequally (40-56 matmuls/s against 72 expected); 10 ms
# periods give 68-69 each, and in the pipeline ~30% shorter actions with less spread between ranks.
# Coarser slices add some per-action jitter (a woken rank may burst). Against the theory the two
# periods scored alike in this session's runs (2026-11-27, dim 768, rel. error: gpipe 10% at 1 ms vs
# 8-14% at 10 ms, 1f1b 2-6% vs 1-6%, interleaved 23% vs 10-18%, the zero-bubble family 53-87% vs
# 49-83%); 10 ms is the default for its equal ranks.
DEFAULT_CPU_PERIOD_MS = 10.0
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/cpu")  # cgroup v2, then v1's cpu controller


def _limit_cpu(share: float, tag: str, period_ms: float = DEFAULT_CPU_PERIOD_MS) -> None:
    """Give this process (all its threads, the ones it starts later included) ``share`` of one core
    with a CFS bandwidth quota in a cgroup of its own (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``):
    ranks that together ask for no more than the host's cores then never compete for them, so each is
    a device of fixed speed, as a GPU is. Exits with one line where cgroups cannot be written."""
    period = max(round(period_ms * 1000), round(1000 / share))  # the kernel's smallest quota is 1 ms
    quota = round(share * period)
    for root, files in zip(CGROUP_ROOTS, ({"cpu.max": f"{quota} {period}"},
                                          {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(quota)})):
        if not os.path.exists(os.path.join(root, "cgroup.procs")):
            continue
        group = os.path.join(root, f"apogee-bubble-{tag}")
        try:
            os.makedirs(group, exist_ok=True)
            for name, value in files.items():
                with open(os.path.join(group, name), "w") as f:
                    f.write(value)
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            return
        except OSError:
            continue
    raise SystemExit("--cpu-quota: cannot create a CPU-limited cgroup under /sys/fs/cgroup (needs a writable "
                     "cgroup v1 cpu or v2 hierarchy, usually root); run without --cpu-quota")


def _cgroups_writable() -> bool:
    probe = f"apogee-bubble-probe-{os.getpid()}"
    for root in CGROUP_ROOTS:
        try:
            os.mkdir(os.path.join(root, probe))
            os.rmdir(os.path.join(root, probe))
            return True
        except OSError:
            continue
    return False


def _rank(rank: int, world: int, port: int, schedules: list, m: int, steps: int, dim: int, seq: int,
          cpu_quota: float = 0.0, cpu_period_ms: float = DEFAULT_CPU_PERIOD_MS, dump: str = "",
          fixed_s: float = 0.0) -> None:
    if cpu_quota:
        _limit_cpu(cpu_quota, f"{os.getppid()}-{rank}", cpu_period_ms)
    _configure(dim, seq)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _instrument()
    pingpong = _pingpong(rank, world, 4 * _ACT_ELEMS)
    out = print if rank == 0 else (lambda *a, **k: None)
    out(f"pp={world}, m={m} micro-batches of {MICRO_BATCH}x{SEQ} tokens, {ARGS.n_layers} layers, dim {ARGS.dim}; "
        f"{len(os.sched_getaffinity(0))} CPU cores, gloo, torch {torch.__version__}, {steps} timed steps (median)"
        + (f"; fixed block costs: F = I = W = {fixed_s * 1e3:g} ms + the real compute (--fixed-ms)" if fixed_s else ""))
    out("ping-pong one-way, median (min), 4 B / " + f"{4 * _ACT_ELEMS // 1024} KiB (an activation or its gradient): "
        + ", ".join(f"{a}<->{b} {t[0] * 1e6:.0f} ({t[2] * 1e6:.0f}) / {t[1] * 1e6:.0f} ({t[3] * 1e6:.0f}) us"
                    for (a, b), t in sorted(pingpong.items())), flush=True)
    rows, diag = [], []
    for schedule in schedules:
        if schedule not in available_schedules():
            rows.append(f"{schedule:17} (not in torch {torch.__version__})")
            continue
        v = stages_per_rank(schedule, 0)
        if ARGS.n_layers < world * v:
            rows.append(f"{schedule:17} (needs {world * v} layers)")
            continue
        logs, joint = _run_schedule(rank, world, schedule, m, steps, fixed_s)
        if rank:
            continue
        if dump:
            with open(f"{dump}.{schedule}.json", "w") as f:
                json.dump(logs, f)
        steps_stats = [_analyse_step([logs[r][s] for r in range(world)], world, pingpong) for s in range(steps)]

        def med(key):
            if any(st[key] is None for st in steps_stats):
                return None
            return [statistics.median(st[key][r] for st in steps_stats) for r in range(world)]

        idle, p2p, comm, est = med("idle"), med("p2p"), med("comm"), med("est")
        mean = statistics.mean(idle)
        formula = theory(schedule, world, m, v)
        kinds = _kind_costs(logs)
        orders = [[c[:3] for c in logs[r][0][0]] for r in range(world)]
        sim = []  # per step: the executed orders replayed with that step's own action durations
        for s in range(steps):
            took = {(c[0], c[1], c[2]): c[4] - c[3] for r in range(world) for c in logs[r][s][0]}
            sim.append(statistics.mean(_simulate(orders, lambda k, st, mb: took[k, st, mb], world * v, joint)))
        th = statistics.mean(_simulate(orders, unit_cost, world * v, joint))  # the schedule's own bubble
        noisy = _noisy_equal_devices(logs, orders, world * v, joint)
        comm_mean = statistics.mean(comm) if comm is not None else None
        cells = [f"{schedule:17}", f"{v:>1}", " ".join(f"{x:5.3f}" for x in idle).rjust(6 * world), f"{mean:5.3f}",
                 " n/a " if formula is None else f"{formula:5.3f}"]
        if math.isnan(th) or comm_mean is None:
            cells += [" n/a ", f"{comm_mean:5.3f}" if comm_mean is not None else " n/a ", "  n/a ", "   n/a", "  -  "]
        else:
            target = th + comm_mean
            err = abs(mean - target) / target if target else float("inf")
            per_stage = sum(abs(i - (th + c)) <= TOLERANCE * (th + c) for i, c in zip(idle, comm))
            cells += [f"{th:5.3f}", f"{comm_mean:5.3f}", f"{target:6.3f}", f"{err:6.1%}",
                      f"{'PASS' if err <= TOLERANCE else 'MISS'} (stages within: {per_stage}/{world})"]
        rows.append("  ".join(cells))
        fbw = " ".join(f"{kinds[k] * 1e3:5.1f}" if k in kinds else "    -" for k in "FBIWL")
        diag.append("  ".join([
            f"{schedule:17}", fbw, f"{statistics.mean(p2p):5.3f}",
            f"{statistics.mean(p2p) - (comm_mean or 0):5.3f}",
            f"{mean - statistics.mean(p2p):6.3f}", f"{statistics.mean(est):5.3f}",
            f"{statistics.median(sim):5.3f}", f"{noisy:5.3f}",
            "  n/a " if comm_mean is None else f"{abs(mean - noisy - comm_mean) / (noisy + comm_mean):6.1%}",
            f"{statistics.mean(statistics.mean(s['msgs']) for s in steps_stats):4.0f}",
            xfer(steps_stats),
            f"{statistics.median(s['span'] for s in steps_stats):6.3f}"]))
        # Each schedule's figures as soon as they exist: a later schedule that fails keeps them.
        print(f"  {rows[-1]}\n  {diag[-1]}", file=sys.stderr, flush=True)
    if rank == 0:
        head = ["schedule".ljust(17), "v", "idle per stage (rank 0..p-1)".rjust(6 * world), " mean", "formula",
                "theor", " comm", "th+comm", "rel err", "verdict on the mean (<= 10%)"]
        print("  ".join(head))
        print("\n".join(rows))
        print()
        print("  ".join(["schedule".ljust(17), "    F     B     I     W     L (ms per micro-batch and chunk)",
                         "  p2p", "nbr w", " other", "pp est", "  sim", "noisy", "vs n+c", "msgs", "recv/send ms",
                         "step s"]))
        print("\n".join(diag))
        print("idle = 1 - compute / span; comm = measured transfer part of p2p (timestamps, see the docstring); "
              "formula = the paper's bubble;\ntheor = the bubble of the schedule's own action order (joint actions "
              "start together) with every stage's F = I = W (B = I + W) and free communication;\n"
              "p2p = time in p2p calls, nbr w = of which waiting for the neighbour, other = idle - p2p (schedule "
              "overhead); pp est = min ping-pong time x messages / span;\n"
              "recv/send ms = median measured transfer part of one received / sent message; "
              "sim = bubble of the executed orders replayed with each action's measured duration and free "
              "communication (median over steps); noisy = the expected bubble of these orders on equal devices "
              "whose action times vary as measured (see _noisy_equal_devices); vs n+c = |mean idle - (noisy + comm)| "
              "/ (noisy + comm);\n"
              "msgs = p2p messages per rank per step; all fractions are means over ranks", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--schedules", default=",".join(available_schedules()))
    parser.add_argument("--port", type=int, default=29650)
    parser.add_argument("--dim", type=int, default=256, help="model width: more compute per action shrinks the "
                        "schedule's fixed host overhead and the communication relative to it")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--cpu-quota", default="auto", metavar="CORES",
                        help="cap each rank at this many cores with a cgroup CPU quota (e.g. 0.5; 0: no cap); "
                        "'auto' (default): host cores / pp where there are fewer cores than ranks and cgroups "
                        "can be written, so that ranks never compete for cores")
    parser.add_argument("--cpu-period-ms", type=float, default=DEFAULT_CPU_PERIOD_MS,
                        help="CFS period of the quota: a capped rank runs quota x period, then waits (default "
                        f"{DEFAULT_CPU_PERIOD_MS:g}; 1-2 ms periods leave the ranks unequally slow)")
    parser.add_argument("--fixed-ms", type=float, default=0.0, metavar="MS",
                        help="give every block's forward, input-gradient and weight-gradient work MS milliseconds "
                        "of fixed cost on top of its real compute (equal, noise-free stages; use a small --dim); "
                        "0 (default): real compute only")
    parser.add_argument("--dump", default="", metavar="PREFIX",
                        help="also write each schedule's raw timestamps to PREFIX.<schedule>.json: per rank, per "
                        "timed step, (compute actions [kind, stage, micro-batch, start, end], p2p ops)")
    a = parser.parse_args()
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (taskset, cgroup cpusets)
    if a.fixed_ms < 0:
        raise SystemExit(f"--fixed-ms must be >= 0 (got {a.fixed_ms:g})")
    if a.cpu_quota == "auto":
        # Fixed costs are sleeps: the ranks leave the cores free meanwhile and need no cap.
        quota = cores / a.pp if cores < a.pp and not a.fixed_ms else 0.0
        if quota and not _cgroups_writable():
            print(f"note: {a.pp} ranks on {cores} cores and no writable cgroup to cap them (--cpu-quota): "
                  "ranks compete for cores, which shrinks the measured bubble", flush=True)
            quota = 0.0
    else:
        try:
            quota = float(a.cpu_quota or 0)
        except ValueError:
            raise SystemExit(f"--cpu-quota must be a number of cores or 'auto' (got {a.cpu_quota!r})") from None
    if quota < 0 or quota * a.pp > cores:
        raise SystemExit(f"--cpu-quota {quota:g} x {a.pp} ranks exceeds this host's {cores} cores")
    if quota:
        print(f"each rank capped at {quota:g} of a core (cgroup CPU quota, {a.cpu_period_ms:g} ms period): {a.pp} "
              f"ranks on {cores} cores never compete", flush=True)
    try:
        mp.start_processes(_rank, args=(a.pp, a.port, a.schedules.split(","), a.microbatches, a.steps, a.dim,
                                        a.seq, quota, a.cpu_period_ms, a.dump, a.fixed_ms / 1e3), nprocs=a.pp,
                       start_method="spawn")
    finally:
        for root in CGROUP_ROOTS:  # the ranks' groups, empty now that they have exited
            for rank in range(a.pp):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(root, f"apogee-bubble-{os.getpid()}-{rank}"))


if __name__ == "__main__":
    main()
