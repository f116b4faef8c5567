"""Seconds from a rank's death to the first completed step after the automatic restart, against a
cold start of the same job, under ``apogee launch``'s supervisor (torchrun's elastic agent).

Cold start: ``job_started`` (launcher) -> ``first_step`` of attempt 0. Recovery: ``fault_injected``
(``kill`` of one rank, SIGKILL) -> ``first_step`` of attempt 1, which includes the agent noticing the
death, stopping the other ranks, a new rendezvous, new processes (imports, process groups, model
build), and loading + verifying the latest checkpoint. All from ``RUN_DIR/events.jsonl``.

Two runs: "from storage" (``checkpoint.memory_interval = 0``: the restart loads the latest durable
checkpoint) and "from memory snapshot" (``memory_interval`` > 0: the restart loads the in-memory
snapshot, newer than the durable one; ``--lose-memory``: the killed rank's RAM is lost too, so its
shard comes from the peer copy). ``steps_recomputed`` is the work lost on top of the restart.

    python benchmarks/recovery.py --nproc 2 --flavor tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from apogee.config import load_config  # noqa: E402
from apogee.resilience.events import read_events  # noqa: E402
from apogee.resilience.supervisor import supervise  # noqa: E402
from apogee.train.trainer import load_corpus  # noqa: E402


def run(args, memory_interval: int) -> dict:
    """One supervised job with a kill; the recovery figures from its events."""
    run_dir = Path(tempfile.mkdtemp(prefix="apogee-recovery-"))
    cfg = load_config(None, {
        "run": {"dir": str(run_dir), "log_interval": 100},
        "model": {"flavor": args.flavor},
        "data": {"max_bytes": 300_000},
        "train": {"steps": args.steps, "global_batch": 8, "micro_batch": 2, "seq_len": 32, "warmup_steps": 2},
        "eval": {"interval": 0, "batches": 1},
        "checkpoint": {"interval": args.durable_interval, "memory_interval": memory_interval},
        "parallel": {"dp_shard": args.nproc, "tp": 1},
        "resilience": {"max_restarts": 1, "inject": [f"kill:rank={args.nproc - 1},step={args.kill_step}"]
                       + (["lose-memory:rank=%d" % (args.nproc - 1)] if memory_interval and args.lose_memory else [])},
    })
    load_corpus(cfg, progress=False)
    supervise(cfg, args.nproc, poll_s=0.1)
    events = read_events(run_dir)
    t = lambda name, **match: next(e["t"] for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items()))  # noqa: E731
    restart = next(e for e in events if e["event"] == "restart")
    restored = next((e for e in events if e["event"] == "snapshot_restored"), None)
    result = {
        "resumed_from": "memory snapshot" if restored else "storage",
        "cold_start_to_first_step_s": round(t("first_step", attempt=0) - t("job_started"), 2),
        "kill_to_first_step_after_restart_s": round(t("first_step", attempt=1) - t("fault_injected"), 2),
        "kill_to_rank_exit_detected_s": round(t("rank_exited") - t("fault_injected"), 2),
        # The restart event is written once the state is loaded: what comes before is restart + load.
        "kill_to_state_loaded_s": round(restart["t"] - t("fault_injected"), 2),
        "resumed_from_step": restart["step"], "killed_at_step": args.kill_step,
        "steps_recomputed": args.kill_step - restart["step"],
    }
    if restored:
        result["snapshot_restore_s"] = restored["seconds"]
        result["snapshot_sources"] = restored["sources"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--flavor", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill-step", type=int, default=7)
    parser.add_argument("--durable-interval", type=int, default=5, help="checkpoint.interval of both runs")
    parser.add_argument("--memory-interval", type=int, default=2, help="checkpoint.memory_interval of the memory run")
    parser.add_argument("--lose-memory", action="store_true", help="the killed rank loses its RAM: restore from the peer copy")
    args = parser.parse_args()
    result = {"nproc": args.nproc, "flavor": args.flavor,
              "from_storage": run(args, 0), "from_memory_snapshot": run(args, args.memory_interval)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
