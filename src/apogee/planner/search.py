"""Search every valid layout under the memory limit and rank them by predicted throughput or goodput.

Pruning keeps a 1T-on-3072-GPU search to seconds without dropping a layout that could win:
  - sequence parallel is on whenever tp > 1 (same communication volume, less memory; Korthikanti 2022);
  - Megatron-LM: ZeRO 0 is dominated by ZeRO 1 (reduce-scatter + all-gather moves what an all-reduce
    moves), and the first stage that fits wins (a higher one only adds communication);
  - apogee (zero 0, 2, 3; estimate.APOGEE_ZERO): zero 3 is dominated by zero 2 (more gathers, the same
    optimizer work), but zero 0 is not (it all-reduces fp32 gradients and runs Adam on every
    parameter), so a fitting zero 0 does not end the try;
  - apogee's HSDP (dp_replicate replicas of FSDP over dp / dp_replicate x cp, zero 2 and 3): every divisor
    of dp that leaves a shard group; a replica count that fits at zero 2 is not tried at zero 3;
  - apogee's grad_reduce: both values are tried where they differ (FSDP with gradient accumulation and no
    pipeline): reducing every micro-batch holds less memory, once a step moves fewer bytes;
  - GPipe is dominated by 1F1B (same bubble, more memory);
  - memory is checked (cheap) before time (less cheap), and recompute is tried cheapest-first:
    a costlier recompute only survives if nothing cheaper fits at that (tp, pp, dp, cp, ep, mb, v).
Keys the run description pins are taken as given, including the dominated choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from apogee.planner.cluster import GIB
from apogee.planner.errors import PlannerError
from apogee.planner.estimate import APOGEE_ZERO, Estimate, check_layout, estimate
from apogee.planner.memory import memory_per_gpu, reduces_each_micro_batch
from apogee.planner.spec import GRAD_REDUCE, RECOMPUTE, Layout, RunSpec

MAX_MICROBATCH = 16
MAX_VIRTUAL = 32  # Megatron-LM allows one layer per virtual stage


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class PlanResult:
    ranked: list[Estimate]  # fitting layouts, best first
    considered: int
    rejected_memory: int
    best_nonfitting: Estimate | None = None
    first_invalid: str | None = None  # why the first candidate check_layout refused was invalid


def candidate_values(run: RunSpec, choices: dict | None = None) -> dict[str, list]:
    """The values each layout key may take: pinned keys give one, ``choices`` may restrict the others."""
    m, cl = run.model, run.cluster
    fixed = run.fixed
    g = cl.gpus
    vals: dict[str, list] = {
        "tp": [d for d in _divisors(min(g, cl.gpus_per_node)) if m.heads % d == 0 and g % d == 0],
        # Divisors of the layers (even stages), and powers of two, which need not divide them (the engine's
        # balanced split; e.g. Llama 3 405B's 126 layers on pp = 16).
        "pp": sorted(d for d in set(_divisors(m.layers)) | {2**k for k in range(m.layers.bit_length())}
                     if d <= m.layers and g % d == 0),
        "cp": [d for d in _divisors(g) if d == 1 or (m.seq_len % (2 * d) == 0 and m.seq_len // d >= 1024)],
        "ep": [d for d in _divisors(m.experts) if g % d == 0] if m.experts else [1],
        "pp_schedule": ["1f1b", "interleaved-1f1b", "zero-bubble"],
        "recompute": list(RECOMPUTE),
        "zero": [1, 2, 3] if run.stack == "megatron" else list(APOGEE_ZERO),
    }
    for k, v in (choices or {}).items():
        vals[k] = list(v)
    for k, v in fixed.items():
        vals[k] = [v]
    return vals


def _replica_values(run: RunSpec, dp: int, cp: int, zero: int) -> list[int]:
    """HSDP's replica counts for a layout: 1 (plain FSDP, or no sharding), and under apogee's FSDP (zero 2,
    3) every divisor of dp that leaves more than one rank to shard over (the pinned value where given)."""
    if "dp_replicate" in run.fixed:
        return [run.fixed["dp_replicate"]]
    if run.stack != "apogee" or zero < 2:
        return [1]
    return [r for r in _divisors(dp) if dp // r * cp > 1]


def _grad_reduce_values(run: RunSpec, lay: Layout, n_micro: int) -> list[str]:
    """The parallel.grad_reduce values that make different runs of ``lay``: both where its micro-batches
    (more than one) would each reduce by default (memory.reduces_each_micro_batch; memory against
    traffic, neither dominates), else the default alone (the pinned value where given)."""
    if "grad_reduce" in run.fixed:
        return [run.fixed["grad_reduce"]]
    if n_micro > 1 and reduces_each_micro_batch(lay, run.stack):
        return list(GRAD_REDUCE)
    return [lay.grad_reduce]


@dataclass
class _Tally:
    """What the search has priced so far."""
    results: list[Estimate] = field(default_factory=list)  # the layouts that fit
    considered: int = 0
    rejected: int = 0
    best_nonfit: Estimate | None = None
    first_invalid: str | None = None

    def invalid(self, why: str) -> None:
        self.first_invalid = self.first_invalid or why

    def price(self, run: RunSpec, lay: Layout) -> bool:
        """Checks and prices ``lay``; whether it is valid and fits."""
        why = check_layout(run.model, lay, run.cluster, run.global_batch, run.stack)
        if why:
            self.invalid(why)
            return False
        self.considered += 1
        mem = memory_per_gpu(run.model, lay, run.cluster, global_batch=run.global_batch, precision=run.precision,
                             stack=run.stack)
        if mem.total > run.cluster.accel.mem_gib * GIB:
            self.rejected += 1
            if self.best_nonfit is None or mem.total < self.best_nonfit.memory.total:
                self.best_nonfit = estimate(run, lay, memory=mem)
            return False
        self.results.append(estimate(run, lay, memory=mem))
        return True


def _virtual_stage_values(m, pp: int, sched: str, vals: dict, pp_split: str | None) -> list[int]:
    """Interleaving depths: even chunks where pp divides the layers, else any depth with a layer a stage;
    under Megatron's embedding- and loss-aware split, chunks of even slots (layers + 2)."""
    if sched != "interleaved-1f1b":
        return [1]
    if vals.get("virtual_stages"):
        return vals["virtual_stages"]
    if pp_split == "embedding_loss":
        return [v for v in range(2, MAX_VIRTUAL + 1) if (m.layers + 2) % (pp * v) == 0]
    return [v for v in range(2, MAX_VIRTUAL + 1)
            if (m.layers // pp) % v == 0 or (m.layers % pp and pp * v <= m.layers)]


def _expert_values(eps: list[int], tp: int, dp: int, cp: int, pinned: int | None) -> list[tuple[int, int]]:
    """(ep, expert_tp) pairs worth pricing: the experts split like the rest of the block (expert_tp 0: tp
    ways, the expert groups over dp x cp), and with tp > 1 whole experts folded over the tensor ranks too
    (expert_tp 1, Megatron's MoE recipes); the pinned expert_tp alone where given."""
    pairs = []
    for ep in eps:
        for etp in [pinned] if pinned is not None else ([0, 1] if tp > 1 and ep > 1 else [0]):
            if (tp * dp * cp) % (ep * (etp or tp)) == 0:
                pairs.append((ep, etp))
    return pairs


def _try_data_parallel(run: RunSpec, shape: Layout, zeros: list, n_micro: int, tally: _Tally) -> bool:
    """Prices ``shape`` (every key but zero, dp_replicate and grad_reduce set) at each zero level, HSDP
    replica count and grad_reduce value worth trying (the module doc's pruning); whether any fitted."""
    fixed = run.fixed
    found = False
    fitted_replicas: set[int] = set()  # replica counts that fitted sharded
    for z in zeros:
        replicas = _replica_values(run, shape.dp, shape.cp, z)
        fitted = False
        for r in replicas:  # ascending: fewer shards, more state per rank
            if z >= 2 and r in fitted_replicas and "zero" not in fixed:
                continue  # fitted at a lower stage, which gathers less
            first = dataclasses.replace(shape, zero=z, dp_replicate=r)
            for gr in _grad_reduce_values(run, first, n_micro):
                if tally.price(run, first if gr == first.grad_reduce else dataclasses.replace(first, grad_reduce=gr)):
                    fitted = found = True
                    if z >= 2:
                        fitted_replicas.add(r)
            if z >= 2 and r not in fitted_replicas:
                break  # more replicas hold more state: they cannot fit either
        # A higher stage only adds communication: Megatron's stops at the first that fits, apogee's once
        # every replica count has fitted.
        done = fitted if run.stack == "megatron" else (z >= 2 and fitted_replicas >= set(replicas))
        if done and "zero" not in fixed:
            break
    return found


def search(run: RunSpec, *, top: int = 5, objective: str = "throughput", choices: dict | None = None,
           max_considered: int = 2_000_000) -> PlanResult:
    """Enumerate layouts; return the fitting ones ranked (best first)."""
    if objective not in ("throughput", "goodput"):
        raise PlannerError(f"objective must be throughput or goodput (got {objective!r})")
    m, cl, fixed = run.model, run.cluster, run.fixed
    vals = candidate_values(run, choices)
    tally = _Tally()
    base = {k: fixed[k] for k in ("dp_overlap", "tp_overlap", "compile", "pp_split", "cp_comm", "ep_dispatch")
            if k in fixed}

    for tp in vals["tp"]:
        for pp in vals["pp"]:
            for cp in vals["cp"]:
                if cl.gpus % (tp * pp * cp):
                    continue
                dp = cl.gpus // (tp * pp * cp)
                if "dp" in fixed and fixed["dp"] != dp:
                    tally.invalid(f"layout.dp={fixed['dp']} but cluster.gpus / (tp x pp x cp) = {dp} at tp={tp} "
                                  f"pp={pp} cp={cp}")
                    continue
                if run.global_batch % dp:
                    tally.invalid(f"train.global_batch={run.global_batch} is not divisible by dp={dp} (cluster.gpus "
                                  f"/ (tp x pp x cp) at tp={tp} pp={pp} cp={cp})")
                    continue
                per_rank = run.global_batch // dp
                mbs = vals.get("microbatch") or [d for d in _divisors(per_rank) if d <= MAX_MICROBATCH]
                sps = vals.get("sequence_parallel") or [tp > 1]
                # One data rank: every zero level is the same run (nothing to split).
                zeros = vals["zero"] if dp * cp > 1 else vals["zero"][:1]
                scheds = vals["pp_schedule"] if pp > 1 else ["1f1b"]
                if pp > 1 and "pp_schedule" in fixed:
                    scheds = [fixed["pp_schedule"]]
                experts = _expert_values(vals["ep"], tp, dp, cp, fixed.get("expert_tp"))
                if not experts:
                    pinned = fixed.get("expert_tp")
                    tally.invalid(f"layout.ep x layout.expert_tp must divide tp*dp*cp = {tp * dp * cp} at tp={tp} "
                                  f"pp={pp} cp={cp}: no ep of {vals['ep']} does with expert_tp "
                                  f"{pinned if pinned is not None else f'{tp} or 1'}")
                for ep, etp in experts:
                    for mb in mbs:
                        if per_rank % mb:
                            continue
                        for sched in scheds:
                            for v in _virtual_stage_values(m, pp, sched, vals, base.get("pp_split")):
                                for sp in sps:
                                    for rc in vals["recompute"]:
                                        shape = Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, expert_tp=etp,
                                                       microbatch=mb, virtual_stages=v, pp_schedule=sched,
                                                       recompute=rc, sequence_parallel=sp, **base)
                                        found = _try_data_parallel(run, shape, zeros, per_rank // mb, tally)
                                        if found and "recompute" not in fixed:
                                            break  # costlier recompute cannot be faster
                                        if tally.considered > max_considered:
                                            raise PlannerError("search space too large: pin some [layout] keys")
    results = tally.results
    key = (lambda e: e.step_time_s / max(e.goodput, 1e-9)) if objective == "goodput" else (lambda e: e.step_time_s)
    results.sort(key=key)
    if run.model.flavor:
        # A flavor's plan becomes an engine config: keep only layouts the engine accepts, checked
        # best-first so that only the top of the ranking pays for validation.
        from apogee.planner.export import engine_rejection

        wanted = max(top, 1) if top else len(results)
        accepted = []
        for e in results:
            if len(accepted) == wanted:
                break
            if engine_rejection(run, e.layout) is None:
                accepted.append(e)
        results = accepted
    return PlanResult(ranked=results[:max(top, 1)] if top else results, considered=tally.considered,
                      rejected_memory=tally.rejected, best_nonfitting=tally.best_nonfit,
                      first_invalid=tally.first_invalid)


def plan_layout(run: RunSpec, **kw) -> Estimate:
    """The best fitting layout for ``run`` (the orchestrator's re-plan entry point)."""
    res = search(run, top=1, **kw)
    if not res.ranked and not res.considered:
        raise _no_valid_layout(res)
    if not res.ranked:
        hint = ""
        if res.best_nonfitting is not None:
            b = res.best_nonfitting
            hint = (f"; the smallest needs {b.memory.total / GIB:.1f} GiB per GPU ({b.layout.short()}) "
                    f"of {b.capacity_gib:.0f}")
        raise PlannerError(
            f"no layout fits in memory among {res.considered} considered{hint}: add GPUs, shorten "
            f"model.seq_len, or unpin [layout] keys")
    return res.ranked[0]


def complete_layout(run: RunSpec, **kw) -> Estimate:
    """``simulate``: the pinned layout, with the keys left out chosen by the search.

    Returns the best fitting completion, or (``fits`` False) the one that needs the least memory.
    """
    res = search(run, top=1, **kw)
    if res.ranked:
        return res.ranked[0]
    if res.best_nonfitting is not None:
        return res.best_nonfitting
    if set(run.fixed) >= {"tp", "pp", "dp"}:
        lay = Layout(**run.fixed)
        estimate(run, lay)  # raises the reason it is invalid
    raise _no_valid_layout(res)


def _no_valid_layout(res: PlanResult) -> PlannerError:
    reason = f" (e.g. {res.first_invalid})" if res.first_invalid else ""
    return PlannerError(f"no valid layout for this model on this cluster{reason}: check [layout] against model and "
                        "cluster")
