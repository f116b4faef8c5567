"""The ``apogee`` command: a thin entry point over the engine, the planner and the tools."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apogee.config import ConfigError, load_config

DESCRIPTION = """\
apogee trains Llama-style language models on one CPU or many GPUs, with FSDP2, tensor and
sequence parallelism on one DeviceMesh, and resumable distributed checkpoints.

  apogee train                      the default job: debug model, stdlib corpus, 4 CPU ranks
  apogee train CONFIG --nproc N     any preset or TOML file on N local ranks
  apogee generate RUN_DIR           sample from a run's latest checkpoint
  apogee launch CONFIG --nproc N    train under supervision: restarts, hang detection, fault drills
"""


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 4


def _check_local_gpus(cfg, nproc: int) -> None:
    """One rank per GPU: more local ranks than GPUs would fail later in every rank ('invalid device
    ordinal'); say it now, in one line naming the two ways out."""
    import torch

    if cfg.run.device == "cpu" or not (cfg.run.device == "cuda" or torch.cuda.is_available()):
        return
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        raise ConfigError(f"{nproc} local ranks but {gpus} GPU(s) here (run.device={cfg.run.device}): pass "
                          f"--nproc {gpus} or fewer, or --set run.device=cpu")


def _fit_default_world(cfg, nproc: int):
    """The config for the default rank count (the GPUs here, or 4 CPU ranks) when the user named none:
    a preset sized for 4 ranks (``debug`` asks tp=2) still runs on a 1-GPU machine, re-planned by the
    elastic rule (keep tp/cp/pp where possible, data parallel absorbs the rest) and said in one line.
    An explicit ``--nproc`` keeps the configured layout's error instead."""
    from apogee.config import validate
    from apogee.resilience.replan import layout_name, replan

    try:
        validate(cfg, nproc)
        return cfg
    except ConfigError:
        pass
    fitted, parallel = replan(cfg, nproc)
    print(f"apogee: {nproc} local rank(s) here do not fit the configured layout; training as "
          f"{layout_name(parallel)} (pass --nproc N to keep the config's layout)", file=sys.stderr)
    return fitted


def cmd_train(args: argparse.Namespace) -> int:
    from apogee.launch import launch_local, run_rank, under_torchrun

    cfg = load_config(args.config, args.set or [])
    if args.resume is not None:
        cfg = cfg.replace(checkpoint={"resume": args.resume})
    if under_torchrun():
        # torchrun started this process: join its job as one rank.
        run_rank(cfg)
        return 0
    nproc = args.nproc or _default_nproc()
    if not args.nproc:
        cfg = _fit_default_world(cfg, nproc)
    _check_local_gpus(cfg, nproc)
    from apogee.config import validate

    validate(cfg, nproc)  # reject a bad layout here, before any rank starts
    from apogee.train.trainer import load_corpus

    load_corpus(cfg, progress=True)  # tokenise once, with progress, before the ranks start
    result = launch_local(cfg, nproc)
    if result.stopped:  # repeated anomalies at one step (resilience.max_anomalies)
        print(f"apogee: error: {result.stopped}", file=sys.stderr)
        return 1
    print(f"\nrun directory: {result.run_dir}")
    print(f"final step {result.step}: train loss {_fmt(result.train_loss)}, val loss {_fmt(result.val_loss)}")
    if result.checkpoint and not args.no_sample:
        from apogee.generate import generate

        text = generate(Path(result.run_dir), args.prompt, tokens=args.sample_tokens, seed=cfg.train.seed)
        print(f"sample (prompt {args.prompt!r}):\n{args.prompt}{text}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from apogee.config import validate
    from apogee.resilience.supervisor import JobFailed, Nodes, supervise
    from apogee.train.trainer import load_corpus

    cfg = load_config(args.config, args.set or [])
    if args.inject:
        cfg = cfg.replace(resilience={"inject": [*cfg.resilience.inject, *args.inject]})
    nodes = Nodes.parse(args.nnodes)
    nproc = args.nproc or _default_nproc()
    _check_local_gpus(cfg, nproc)
    # An elastic world size is known only at rendezvous; a fixed one is checked now.
    validate(cfg, nproc * nodes.min) if nodes.min == nodes.max else validate(cfg)
    load_corpus(cfg, progress=True)  # tokenise once, before the ranks start
    try:
        result = supervise(cfg, nproc, nodes=nodes, rdzv_endpoint=args.rdzv_endpoint)
    except JobFailed as exc:
        print(f"apogee: error: {exc}", file=sys.stderr)
        return 1
    if result.exclusion and result.exclusion["self_node"] == result.exclusion["node"]:
        print(f"\nthis node left the job at step {result.step} (straggler rank {result.exclusion['rank']} excluded); "
              f"run directory: {result.run_dir}")
        return 0
    print(f"\nrun directory: {result.run_dir} (events: {Path(result.run_dir) / 'events.jsonl'})")
    print(f"final step {result.step}: train loss {_fmt(result.train_loss)}, val loss {_fmt(result.val_loss)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from apogee.generate import generate

    text = generate(
        Path(args.run_dir), args.prompt, tokens=args.tokens, temperature=args.temperature, top_k=args.top_k,
        seed=args.seed, device=args.device,
    )
    print(args.prompt + text)
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apogee", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model (default: the debug preset on 4 local CPU ranks)",
        description="Train from a preset or TOML file. Under torchrun each process joins the job as one "
        "rank; otherwise apogee starts --nproc local ranks itself through torchrun's launcher API. "
        "An existing checkpoint in the run directory is resumed unless checkpoint.resume=never.",
    )
    train.add_argument("config", nargs="?", default=None,
                       help="TOML file or preset name (debug, shakespeare-char, llama-1b, ...); default: debug")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override one config key, e.g. --set train.steps=50 (repeatable)")
    train.add_argument("--nproc", type=int, default=0,
                       help="local ranks to start (default: the number of GPUs, or 4 on CPU)")
    train.add_argument("--resume", metavar="CHECKPOINT_DIR", default=None,
                       help="resume from this checkpoint directory (default: the run's latest, if any)")
    train.add_argument("--prompt", default="def ", help="prompt for the sample printed at the end")
    train.add_argument("--sample-tokens", type=int, default=120, help="tokens to sample at the end")
    train.add_argument("--no-sample", action="store_true", help="do not sample at the end")
    train.set_defaults(func=cmd_train)

    launch = sub.add_parser(
        "launch",
        help="train under supervision: restart from the last durable checkpoint, detect hangs, run fault drills",
        description="Run a job through torchrun's elastic agent (c10d rendezvous) and supervise it: a rank "
        "that dies restarts all ranks from the latest durable checkpoint (up to resilience.max_restarts); "
        "no heartbeat for resilience.hang_timeout_s is a hang: every rank's stack is dumped, a diagnosis "
        "written to RUN_DIR/diagnosis/, and the ranks restarted. With resilience.exclude_stragglers=true and "
        "--nnodes MIN:MAX, a straggler's node leaves after a checkpoint and the other nodes go on with a "
        "re-planned layout. Events go to RUN_DIR/events.jsonl.",
    )
    launch.add_argument("config", help="TOML file or preset name")
    launch.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    launch.add_argument("--nproc", type=int, default=0, help="ranks per node (default: the number of GPUs, or 4 on CPU)")
    launch.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="nodes (elastic range), default 1")
    launch.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                        help="c10d rendezvous endpoint shared by every node (default: a free local port)")
    launch.add_argument("--inject", action="append", metavar="FAULT",
                        help="fault drill, repeatable: kill:rank=R,step=S | hang:rank=R,step=S | "
                        "corrupt-checkpoint:step=S[,mode=flip|truncate|delete] | kill-during-save:step=S[,rank=R] | "
                        "nan:step=S[,times=N] | spike:step=S[,factor=F,times=N] | slow:rank=R[,factor=F,step=S]")
    launch.set_defaults(func=cmd_launch)

    gen = sub.add_parser("generate", help="sample text from a run's latest checkpoint",
                         description="Load RUN_DIR's latest checkpoint into one process and sample.")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds config.toml)")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.set_defaults(func=cmd_generate)

    try:
        from apogee.planner.cli import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # `apogee` alone: `apogee train` would start training; show the map instead.
        if argv is None and len(sys.argv) == 1:
            parser.print_help()
            return 0
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"apogee: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apogee: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
