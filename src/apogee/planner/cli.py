"""``apogee plan`` and ``apogee simulate``: the planner's command line (wired in by ``apogee.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from apogee.planner import placement
from apogee.planner.cluster import GIB
from apogee.planner.errors import PlannerError
from apogee.planner.estimate import Estimate
from apogee.planner.export import write_config
from apogee.planner.search import complete_layout, search
from apogee.planner.spec import RunSpec, run_from_dict

RUN_HELP = """\
RUN.toml describes the run:
  [model]   flavor = "llama3-70b"   or the shape: layers, hidden, heads, kv_heads, ffn_hidden, vocab,
            seq_len (+ experts, top_k, shared_experts, moe_ffn_hidden, dense_layers; head_dim where a
            head is not hidden / heads wide; mlp = swiglu|gelu)
  [cluster] gpu = "h100-80gb", gpus = 1024, gpus_per_node = 8   (or file = "cluster.toml"; also
            node_mtbf_hours, checkpoint_write_gbs, restart_s, intra_busbw_gbs, inter_gbs_per_gpu)
  [layout]  any of tp, pp, dp, cp, ep, microbatch, virtual_stages, pp_schedule, recompute,
            sequence_parallel, zero (apogee: 0 replicated, 2 FSDP2 keeping gathered weights, 3 or
            "fsdp" FSDP2; megatron: 0-3), grad_reduce (micro_batch|step), dp_replicate (HSDP
            replicas at apogee's zero 2/3, dividing dp), pp_split (even|embedding_loss: Megatron's
            embedding- and loss-aware split, never searched), expert_tp (experts split fewer ways
            than tp, folded over the tensor ranks; searched at tp and 1), ep_dispatch
            (all_to_all|deepep, never searched); keys left out are searched; compile (true:
            apogee's train.compile, never searched)
  [train]   global_batch (sequences), precision (bf16|fp8), seq_len, stack ("apogee", the default:
            this engine's eager kernels and measured cuBLAS efficiency; or "megatron")
Flags --gpu/--gpus/--gpus-per-node/--flavor/--global-batch/--set override or replace the file.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run description TOML (optional when --flavor and --gpus are given)")
    p.add_argument("--flavor", help="model flavor (apogee.models.flavors), replaces [model]")
    p.add_argument("--gpu", help="accelerator type: a100-40gb, a100-80gb, h100-80gb, h100-96gb, h200, h800, b200, cpu")
    p.add_argument("--gpus", type=int, help="number of accelerators")
    p.add_argument("--gpus-per-node", type=int, help="accelerators per node (default 8)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any run-description key, e.g. --set layout.tp=8 (repeatable)")
    p.add_argument("--objective", choices=("throughput", "goodput"), default="throughput",
                   help="rank layouts by step time or by step time / goodput (default throughput)")


def register(subparsers) -> None:
    """Add ``plan`` and ``simulate`` to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "plan", help="search parallel layouts and rank them by predicted throughput",
        description="Search every valid layout (tp, pp, dp, cp, ep, micro-batch, virtual stages, schedule, "
                    "recompute, ZeRO stage) that fits in memory, rank by predicted throughput (or goodput), "
                    "print the top K with the reasons the first wins and its rank placement.\n\n" + RUN_HELP,
        formatter_class=fmt)
    _add_common(p)
    p.add_argument("--top", type=int, default=5, help="how many layouts to show (default 5)")
    p.add_argument("--write-config", metavar="OUT.toml", help="write the best layout as an apogee training config")
    p.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    p.set_defaults(func=cmd_plan)

    s = subparsers.add_parser(
        "simulate", help="predict step time, MFU, memory and goodput of one layout",
        description="Predict one layout: step time, tokens/s and TFLOP/s per GPU, MFU, memory per GPU by "
                    "component, communication per axis and how much overlaps, pipeline bubble, the "
                    "Young/Daly checkpoint interval and expected goodput. [layout] keys left out are chosen "
                    "by the same search as `plan` and shown.\n\n" + RUN_HELP,
        formatter_class=fmt)
    _add_common(s)
    s.add_argument("--json", action="store_true",
                   help="print JSON (step_time_s, tokens_per_s_per_gpu, model_tflops_per_gpu, "
                        "hardware_tflops_per_gpu, mfu, memory_gib_per_gpu, fits, checkpoint_interval_s, goodput, ...)")
    s.add_argument("--write-config", metavar="OUT.toml", help="write the simulated layout as an apogee training config")
    s.set_defaults(func=cmd_simulate)


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_from_args(args) -> RunSpec:
    from apogee.planner.cluster import load_toml

    d: dict = {}
    base_dir = None
    if args.run:
        from pathlib import Path

        d = load_toml(Path(args.run))
        base_dir = Path(args.run).parent
    d = {k: dict(v) for k, v in d.items()}
    if args.flavor:
        d["model"] = {"flavor": args.flavor}
    cl = d.setdefault("cluster", {})
    for flag, key in (("gpu", "gpu"), ("gpus", "gpus"), ("gpus_per_node", "gpus_per_node")):
        if getattr(args, flag) is not None:
            cl[key] = getattr(args, flag)
    if args.global_batch is not None:
        d.setdefault("train", {})["global_batch"] = args.global_batch
    for item in args.set:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise PlannerError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. layout.tp=8")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        d.setdefault(section, {})[name] = _parse_value(value)
    if not args.run and "model" not in d:
        raise PlannerError("give a RUN.toml or --flavor (and --gpu/--gpus)")
    cl.setdefault("gpu", "h100-80gb")
    if "gpus" not in cl:
        raise PlannerError("the cluster size is missing: set [cluster] gpus in RUN.toml or pass --gpus")
    return run_from_dict(d, base_dir=base_dir)


def _fmt_mem(e: Estimate) -> str:
    g = e.memory.gib()
    return (f"params {g['params']:.1f}  grads {g['grads']:.1f}  optimizer {g['optimizer']:.1f}  "
            f"activations {g['activations']:.1f}  buffers {g['buffers']:.1f}  = {g['total']:.1f} GiB "
            f"of {e.capacity_gib:.0f}" + ("" if e.fits else "  (DOES NOT FIT)"))


def _reasons(best: Estimate, others: list[Estimate]) -> list[str]:
    out = [f"compute {best.compute_s:.3f}s of {best.step_time_s:.3f}s; bubble {best.bubble_fraction:.1%}; "
           f"exposed comm " + ", ".join(f"{k} {v:.3f}s" for k, v in best.comm_exposed_s.items() if v > 0)
           + (f"; waiting on the host {best.host_wait_s:.3f}s" if best.host_wait_s > 0 else "")]
    for o in others[:3]:
        d = {"bubble": o.bubble_fraction * o.compute_s - best.bubble_fraction * best.compute_s,
             "exposed comm": sum(o.comm_exposed_s.values()) - sum(best.comm_exposed_s.values()),
             "compute (recompute, GEMM shapes)": o.compute_s - best.compute_s,
             "waiting on the host's dispatch": o.host_wait_s - best.host_wait_s}
        k = max(d, key=d.get)
        out.append(f"beats [{o.layout.short()}] by {o.step_time_s / best.step_time_s - 1:.1%}: mostly {k} "
                   f"(+{d[k]:.3f}s there)")
    return out


def _print_estimate(e: Estimate, run: RunSpec) -> None:
    print(f"layout      {e.layout.short()}   ({'pinned: ' + ', '.join(sorted(run.fixed)) if run.fixed else 'all searched'})")
    print(f"step time   {e.step_time_s:.3f} s   tokens/s/GPU {e.tokens_per_s_per_gpu:,.0f}")
    print(f"TFLOP/s/GPU model {e.model_tflops_per_gpu:.1f}   hardware {e.hardware_tflops_per_gpu:.1f}   MFU {e.mfu:.1%}")
    print(f"memory/GPU  {_fmt_mem(e)}")
    print(f"pipeline    bubble {e.bubble_fraction:.1%}")
    if e.host_wait_s > 0:
        print(f"host        the GPUs wait {e.host_wait_s * 1e3:.1f} ms a step on the host's dispatch of the eager "
              f"step (more tokens a micro-batch, or layout.compile, hide it)")
    print("comm (s)    " + "  ".join(f"{k} {e.comm_s[k]:.3f} (exposed {e.comm_exposed_s[k]:.3f})"
                                     for k in e.comm_s if e.comm_s[k] > 0) or "none")
    print(f"checkpoint  every {e.checkpoint_interval_s / 60:.1f} min (write {e.checkpoint_write_s:.1f} s, "
          f"job MTBF {run.cluster.mtbf_s / 3600:.1f} h)   expected goodput {e.goodput:.1%}")
    # 1 J/token = 1e12 J per trillion tokens = 277.8 MWh
    print(f"energy      {e.power_kw:,.1f} kW (accelerators at TDP; cluster.node_power_w, pue)   "
          f"{e.energy_j_per_token:.3g} J/token, {e.energy_j_per_useful_token:.3g} per useful token = "
          f"{e.energy_j_per_useful_token * 1e12 / 3.6e9:,.0f} MWh per trillion tokens")


def cmd_simulate(args) -> int:
    try:
        run = run_from_args(args)
        est = complete_layout(run, objective=args.objective)
        if args.write_config:
            write_config(run, est.layout, args.write_config)
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        d = est.to_json()
        d["memory_gib_per_gpu"] = est.memory.gib()
        print(json.dumps(d, indent=1))
    else:
        _print_estimate(est, run)
    return 0


def cmd_plan(args) -> int:
    try:
        run = run_from_args(args)
        t0 = time.perf_counter()
        res = search(run, top=max(1, args.top), objective=args.objective)
        dt = time.perf_counter() - t0
        if not res.ranked:
            from apogee.planner.search import plan_layout

            plan_layout(run, objective=args.objective)  # raises with the hint
        if args.write_config:
            write_config(run, res.ranked[0].layout, args.write_config)
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"search_s": dt, "considered": res.considered, "rejected_memory": res.rejected_memory,
                          "ranked": [e.to_json() for e in res.ranked]}, indent=1))
        return 0
    print(f"searched {res.considered} layouts in {dt:.2f} s ({res.rejected_memory} over memory)\n")
    w = max([52] + [len(e.layout.short()) + 1 for e in res.ranked])  # the layout column fits the longest
    print(f"{'#':>2}  {'layout':<{w}}{'step s':>9}{'tok/s/GPU':>11}{'MFU':>7}{'GiB':>7}{'bubble':>8}{'goodput':>9}"
          f"{'J/token':>9}")
    for i, e in enumerate(res.ranked, 1):
        print(f"{i:>2}  {e.layout.short():<{w}}{e.step_time_s:>9.3f}{e.tokens_per_s_per_gpu:>11,.0f}{e.mfu:>7.1%}"
              f"{e.memory.total / GIB:>7.1f}{e.bubble_fraction:>8.1%}{e.goodput:>9.1%}{e.energy_j_per_token:>9.3g}")
    best = res.ranked[0]
    print("\nwhy #1:")
    for line in _reasons(best, res.ranked[1:]):
        print("  " + line)
    print(f"  memory: {_fmt_mem(best)}")
    print("\nplacement:")
    for line in placement.describe(best.layout, run.cluster):
        print("  " + line)
    if args.write_config:
        print(f"\nwrote {args.write_config}")
    return 0
