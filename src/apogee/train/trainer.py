"""The training loop, as named steps a variant can override one at a time.

``Trainer(cfg).fit()`` runs in every rank: ``build`` (process group, mesh, data, model, optimizer,
resume), then per step ``forward_backward`` over the micro-batches, ``optimizer_step``, and on
their intervals ``evaluate``, ``log`` and ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from apogee.checkpoint.dcp import Checkpointer, config_hash, latest_checkpoint
from apogee.checkpoint.snapshot import MemorySnapshots
from apogee.config import Config, write_config
from apogee.data.prepare import PreparedCorpus, prepare_corpus
from apogee.data.sampler import Batch, TrainSampler, split_tokens, val_batches
from apogee.models.init import init_weights
from apogee.models.llama import Transformer
from apogee.parallel.apply import parallelize_stages
from apogee.parallel.context import load_balanced_positions
from apogee.parallel.mesh import Mesh
from apogee.parallel.pipeline import Pipeline, stages_per_rank
from apogee.resilience.hooks import RankHooks
from apogee.resilience.replan import fit_world, memory_check, replan_problem
from apogee.telemetry.energy import EnergyMeter, energy_record
from apogee.telemetry.metrics import MetricsWriter, log, memory_gib
from apogee.telemetry.mfu import peak_flops
from apogee.train.cpu_cores import pin_cpu_rank
from apogee.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr


def pick_device(setting: str) -> torch.device:
    """``run.device``: auto uses CUDA when present, one device per local rank."""
    use_cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    if use_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_expandable_segments(device: torch.device) -> None:
    """``run.expandable_segments``: CUDA's caching allocator grows a segment in place instead of caching
    blocks of fixed sizes, so memory freed between micro-batches is reused whatever its shape (torchtitan
    sets the same through PYTORCH_ALLOC_CONF). On an H100, one GPU, it lowered the reserved peak by 1.8-2.3 GiB
    at the same step time (benchmarks/planner_vs_measured_gpu.py). It applies to segments allocated from now
    on, so it is set before the model is built."""
    if device.type != "cuda":
        return
    # The torch._C setter where torch has it (2.13 deprecates the torch.cuda one), else torch.cuda's.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")


def process_group_backend(device: torch.device, cpu_offload: bool) -> str:
    """gloo on CPU, NCCL on CUDA; with FSDP2 CPU offload also gloo for CPU tensors (the offloaded
    gradients' norm, a tied embedding's gradient sum), which NCCL cannot carry (as torchtitan does)."""
    if device.type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def model_vocab(cfg: Config, tokenizer_vocab: int) -> int:
    """The flavor's vocabulary, an explicit ``model.vocab_size``, or the tokenizer's rounded up to
    a multiple of 64 (tensor-core friendly, and divisible by any tensor-parallel degree <= 64)."""
    args = cfg.model.args()
    vocab = args.vocab_size or -(-tokenizer_vocab // 64) * 64
    if vocab < tokenizer_vocab:
        raise ValueError(
            f"the model vocabulary ({vocab}) is smaller than the tokenizer's ({tokenizer_vocab}); "
            f"set model.vocab_size >= {tokenizer_vocab}"
        )
    return vocab


def load_corpus(cfg: Config, *, progress: bool) -> PreparedCorpus:
    d = cfg.data
    return prepare_corpus(
        source=d.source, path=d.path or None, tokenizer=d.tokenizer, bpe_vocab_size=d.bpe_vocab_size,
        text_key=d.text_key, glob=d.glob, max_bytes=d.max_bytes or None, bin_dtype=d.bin_dtype,
        cache_dir=d.cache_path, progress=progress,
    )


@dataclass
class TrainResult:
    run_dir: str
    step: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: str | None
    stopped: str | None = None  # why the job stopped before train.steps (repeated anomalies)
    exclusion: dict | None = None  # a straggler's node leaves (resilience/elastic.py): for the supervisor


class Trainer:
    def __init__(self, cfg: Config, elastic=None):
        self.cfg = cfg
        self.run_dir = cfg.run.path
        self.elastic = elastic  # apogee launch's node range and exclusions (resilience/elastic.py), or None
        self.energy: EnergyMeter | None = None

    # ----------------------------------------------------------------------------------- build
    def build(self) -> None:
        cfg = self.cfg
        self.device = pick_device(cfg.run.device)
        if cfg.run.expandable_segments:
            use_expandable_segments(self.device)
        # A process group the caller made (several runs in one launch) stays the caller's to destroy.
        # CPU offload is FSDP2's: one process alone gets a 1-rank process group (in-process store) for it.
        alone_offloading = cfg.parallel.cpu_offload and "WORLD_SIZE" not in os.environ
        self.owns_process_group = ("WORLD_SIZE" in os.environ or alone_offloading) and not dist.is_initialized()
        if self.owns_process_group:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(process_group_backend(self.device, cfg.parallel.cpu_offload),
                                    device_id=self.device if self.device.type == "cuda" else None,
                                    **({"store": dist.HashStore(), "rank": 0, "world_size": 1} if alone_offloading else {}))
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0
        # Heartbeats, events and the fault-drill hook (apogee/resilience): the trainer's one contact.
        fits = memory_check(self.device)  # the planner's memory model, on a GPU (resilience/replan.py)
        self.hooks = RankHooks(self.run_dir, cfg.resilience.inject, rank=self.rank, world=self.world_size,
                               log=lambda msg: log(msg), resilience=cfg.resilience, device=self.device,
                               elastic=self.elastic, replans=lambda world: replan_problem(cfg, world, fits))
        self.hooks.beat("build", 0)
        if self.device.type == "cpu":
            # Ranks on one host share its cores: each gets cores of its own (apogee.train.cpu_cores) and as
            # many threads; oversubscribed threads slow every rank down.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(pin_cpu_rank(int(os.environ.get("LOCAL_RANK", "0")), local))
        # An elastic job on another world size (after a shrink) re-plans the layout (resilience/replan.py).
        self.cfg, parallel = fit_world(cfg, self.world_size, elastic=self.elastic, log=lambda msg: log(msg, enabled=self.is_main),
                                       events=self.hooks.events if self.is_main else None, fits=fits)
        cfg = self.cfg
        self.mesh = Mesh.build(parallel, self.device.type)
        self.grad_accum = cfg.train.global_batch // (cfg.train.micro_batch * parallel.dp)
        self.use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and self.device.type == "cuda")
        torch.manual_seed(cfg.train.seed + self.rank)

        self.build_data()
        self.build_model()
        self.optimizer = build_optimizer(self.model, cfg.train)
        ck = cfg.checkpoint
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", keep=ck.keep, keep_every=ck.keep_every, async_save=ck.async_save,
            config_hash=config_hash(cfg.to_dict()), layout={"world_size": self.world_size, **parallel.degrees()},
            events=self.hooks.events if self.is_main else None, faults=self.hooks.faults,
            log=lambda msg: log(msg, enabled=self.is_main),
        )
        self.snapshots = MemorySnapshots(cfg, layout=self.checkpointer.layout, device=self.device, events=self.hooks.events,
                                         faults=self.hooks.faults, log=lambda msg: log(msg, enabled=self.is_main))
        self.step = 0
        self.resume()
        if self.is_main:
            write_config(cfg, self.run_dir / "config.toml")
            self.corpus.tokenizer.save(self.run_dir / "tokenizer")
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=self.is_main, resume_step=self.step)
        peak = peak_flops(self.device, "bf16" if self.use_bf16 else "fp32")
        self.peak_flops_total = peak * self.world_size if peak else None
        self.energy = self.build_energy_meter()

    def build_data(self) -> None:
        # Rank 0 tokenises (once, cached); the others then read the cache.
        if self.is_main:
            self.corpus = load_corpus(self.cfg, progress=True)
        if dist.is_initialized():
            dist.barrier()
        if not self.is_main:
            self.corpus = load_corpus(self.cfg, progress=False)
        train_tokens, self.val_tokens = split_tokens(self.corpus.tokens, self.cfg.data.val_fraction)
        self.sampler = TrainSampler(train_tokens, seq_len=self.cfg.train.seq_len, seed=self.cfg.train.seed)
        for first, count in self.hooks.skips.windows():  # batches an anomaly skipped, in any attempt
            self.sampler.skip(first, count)

    def build_model(self) -> None:
        args = self.cfg.model.args().with_vocab(model_vocab(self.cfg, self.corpus.vocab_size))
        self.model_args = args
        with torch.device("meta"):
            model = Transformer(args)
        param_dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        done = parallelize_stages(
            model, self.mesh, param_dtype=param_dtype, compile=self.cfg.train.compile, seq_len=self.cfg.train.seq_len
        )
        self.model = done.model  # under pp: this rank's stages, under the full model's parameter names
        # FSDP2's CPU offload keeps the sharded parameters (and so gradients and optimizer state) on the host.
        param_device = torch.device("cpu") if self.cfg.parallel.cpu_offload else self.device
        init_weights(self.model, self.cfg.train.seed, self.device, param_device)
        self.cp_positions = None
        if self.mesh.cp is not None:
            # A cp rank holds two mirrored chunks of every sequence (the load-balanced causal split):
            # its rotary table keeps the rows of those global positions, so the plain model rotates
            # each local token by its place in the whole sequence.
            p = self.mesh.parallel
            self.cp_positions = load_balanced_positions(self.cfg.train.seq_len, p.cp, self.mesh.cp_rank, self.device)
            self.model.rope = self.model.rope[:, self.cp_positions]
        self.pipeline = None
        if done.stages:
            p = self.mesh.parallel
            self.pipeline = Pipeline(
                self.model, done.stages, schedule=p.pp_schedule, n_stages=p.pp * stages_per_rank(p.pp_schedule, p.pp_stages_per_rank),
                n_microbatches=self.grad_accum, group=self.mesh.pp.get_group(), device=self.device, loss_fn=self.pipeline_loss,
            )
        self.flops_per_token = args.flops_per_token(self.cfg.train.seq_len)

    def resume(self) -> None:
        """Load the checkpoint to continue from: verified against its manifest, and with
        ``resume=auto`` the newest one that verifies (a restarted attempt always resumes)."""
        self.hooks.beat("resume", 0)
        setting = self.cfg.checkpoint.resume
        restarted = self.hooks.attempt > 0
        if setting == "never" and not restarted:
            return
        if setting == "auto" or restarted:
            # An in-memory snapshot newer than the latest durable checkpoint, else storage.
            found = self.snapshots.restore(self.model, self.optimizer) or self.checkpointer.load_latest(self.model, self.optimizer)
            path, state = found if found else (None, None)
        else:
            path = Path(setting)
            state = self.checkpointer.load(path, self.model, self.optimizer)
        if restarted and self.is_main:
            self.hooks.events("restart", attempt=self.hooks.attempt, checkpoint=str(path) if path else None,
                              step=int(state["step"]) if state else 0)
        if path is None:
            return
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.hooks.anomalies.load_state_dict(state.get("anomaly"))
        log(f"resumed from {path} at step {self.step}", enabled=self.is_main)

    def trainer_state(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "anomaly": self.hooks.anomalies.state_dict()}

    def recover(self, anomaly, first_window: int) -> str | None:
        """An anomaly at ``anomaly.step`` (all ranks agree): its gradients were dropped. Record the
        step's global windows in the skip list, roll back to the newest good state (in-memory
        snapshot or durable checkpoint) in this process (model, optimizer, RNG, data position, moving average) and go on; the sampler then
        steps over those windows. Returns a message instead when this step failed too often.

        In-process rather than exiting for the supervisor to restart: no restart is spent from
        ``resilience.max_restarts``, plain ``apogee train`` recovers too, and a rollback costs one
        verified checkpoint load rather than a new process group, build and load."""
        gb = self.cfg.train.global_batch
        count = self.hooks.skips.at_step(anomaly.step) + 1
        entry = {"step": anomaly.step, "reason": anomaly.reason, "loss": anomaly.loss, "grad_norm": anomaly.grad_norm,
                 "average": anomaly.average, "first_window": first_window, "count": gb,
                 "windows": list(range(first_window, first_window + gb)),
                 "token_offsets": self.sampler.window_starts(first_window, gb).tolist(), "attempt": self.hooks.attempt}
        self.hooks.skips.add(entry)  # durable before the rollback: a crash from here on skips it too
        self.sampler.skip(first_window, gb)
        limit = self.cfg.resilience.max_anomalies
        if count >= limit:
            message = (f"stopping: {count} anomalies at step {anomaly.step} (last: {anomaly.reason}, loss {anomaly.loss:.4g}, "
                       f"grad norm {anomaly.grad_norm:.4g}) reached resilience.max_anomalies={limit}; "
                       f"skipped batches in {self.hooks.skips.path}")
            if self.is_main:
                self.hooks.events("anomaly_stop", step=anomaly.step, reason=anomaly.reason, count=count)
            log(message, enabled=self.is_main)
            return message
        self.checkpointer.wait()  # an async save in flight is of a good step: make it the latest
        # The newest good state: an in-memory snapshot newer than the durable checkpoint (restore first
        # lets one being written finish), else storage.
        found = self.snapshots.restore(self.model, self.optimizer) or self.checkpointer.load_latest(self.model, self.optimizer)
        back = int(found[1]["step"]) if found else self.step
        where = (found[0] if isinstance(found[0], str) else found[0].name) if found else None
        if found:
            self.step = back
            self.sampler.load_state_dict(found[1]["sampler"])
            self.hooks.anomalies.load_state_dict(found[1].get("anomaly"))
            self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=self.is_main, resume_step=self.step)
        if self.is_main:
            self.hooks.events("anomaly", step=anomaly.step, reason=anomaly.reason, loss=anomaly.loss,
                              grad_norm=anomaly.grad_norm, average=anomaly.average, rollback_to=back,
                              checkpoint=str(found[0]) if found else None, skipped_windows=[first_window, gb], count=count)
        log(f"anomaly at step {anomaly.step}: {anomaly.reason} (loss {anomaly.loss:.4g}, grad norm {anomaly.grad_norm:.4g}); "
            f"step not applied; " + (f"rolled back to {where}" if found else "no checkpoint yet, no rollback")
            + f"; skipping global windows {first_window}..{first_window + gb - 1}", enabled=self.is_main)
        return None

    # ------------------------------------------------------------------------------- the steps
    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy of one micro-batch (a DTensor under loss parallel)."""
        inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
        with self.autocast():
            logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))

    def autocast(self):
        """bf16 autocast on GPU, and activation offloading where configured: the forward's context."""
        stack = contextlib.ExitStack()
        if self.use_bf16:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.mesh.parallel.activation_offload:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda"))
        return stack

    def loss_context(self):
        """Cross-entropy over vocabulary-sharded logits needs loss_parallel for forward and backward."""
        if self.mesh.tp is not None and self.mesh.parallel.loss_parallel:
            return loss_parallel()
        return contextlib.nullcontext()

    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The pipeline schedule's loss (last stage): one micro-batch's mean, divided by the number of
        micro-batches as gradient accumulation divides it (the schedule does not rescale)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1)) / self.grad_accum

    def cp_local(self, batch: Batch) -> Batch:
        """This context-parallel rank's tokens of every sequence (all of them without cp)."""
        if self.cp_positions is None:
            return batch
        index = self.cp_positions.to(batch.inputs.device)
        return Batch(batch.inputs[:, index], batch.targets[:, index])

    def forward_backward(self, batch: Batch) -> float:
        """Accumulate gradients over this rank's micro-batches; returns the mean loss of the step."""
        batch = self.cp_local(batch)
        if self.pipeline is not None:
            # The schedule's micro-batches (grad_accum of them) replace the accumulation loop.
            with self.autocast(), self.loss_context():
                return self.mean_over_data_ranks(self.pipeline.step(batch.inputs, batch.targets))
        mb = self.cfg.train.micro_batch
        total = torch.zeros((), device=self.device)
        for i in range(self.grad_accum):
            micro = Batch(batch.inputs[i * mb : (i + 1) * mb], batch.targets[i * mb : (i + 1) * mb])
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.gradient_sync(last=i == self.grad_accum - 1)
            with self.loss_context():
                loss = self.loss(micro) / self.grad_accum
                loss.backward()
            total += _local(loss.detach())
        return self.mean_over_data_ranks(total)

    def gradient_sync(self, *, last: bool) -> None:
        """FSDP2's reductions for one micro-batch's backward (parallel.grad_reduce)."""
        p = self.mesh.parallel
        if p.grad_reduce == "step" or p.dp_shard * p.cp == 1:
            # One reduction, after the last micro-batch. Where nothing is sharded (replicas only) the
            # gradients are whole either way, so reducing every micro-batch would only add traffic.
            self.model.set_requires_gradient_sync(last)
        elif p.dp_replicate > 1:
            # Reduce-scatter every micro-batch (sharded accumulation); the all-reduce across replicas
            # only once, after the last (FSDP2 adds the earlier micro-batches' shards before it).
            self.model.set_requires_all_reduce(last)

    def optimizer_step(self, loss: float = 0.0, compute_s: float = 0.0):
        """Clip, check the step for anomalies (all ranks agree) and apply it unless it is one.
        Returns (lr, grad norm, the anomaly or None)."""
        lr = lr_at(self.step + 1, self.cfg.train)
        set_lr(self.optimizer, lr)
        grad_norm = clip_grad_norm(self.model, self.cfg.train.grad_clip, pp=self.mesh.parallel.pp,
                                   counted_elsewhere=self.pipeline.counted_elsewhere if self.pipeline else [])
        anomaly = self.hooks.check_step(self.step + 1, loss, grad_norm, compute_s)
        if anomaly is None:
            self.checkpointer.wait_staged()  # an async save's host copy must finish first
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # an anomaly's gradients are dropped unapplied
        if anomaly is None:
            self.step += 1
        return lr, grad_norm, anomaly

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        t = self.cfg.train
        total, count = torch.zeros((), device=self.device), 0
        batches = val_batches(
            self.val_tokens, seq_len=t.seq_len, global_batch=t.global_batch, micro_batch=t.micro_batch,
            batches=self.cfg.eval.batches, dp_rank=self.mesh.dp_rank, dp_size=self.mesh.dp_size,
        )
        if self.pipeline is not None:
            # One schedule run per grad_accum micro-batches (a rank's share of a global batch).
            batches, group = list(batches), self.grad_accum
            batches = [
                Batch(torch.cat([b.inputs for b in batches[i : i + group]]), torch.cat([b.targets for b in batches[i : i + group]]))
                for i in range(0, len(batches), group)
            ]
        for batch in map(self.cp_local, batches):
            with self.autocast(), self.loss_context():
                total += self.pipeline.eval(batch.inputs, batch.targets) if self.pipeline is not None else _local(self.loss(batch))
            count += 1
        self.model.train()
        return self.mean_over_data_ranks(total / count)

    def mean_over_data_ranks(self, value: torch.Tensor) -> float:
        # Over data and context parallel ranks: each holds an equal share of the tokens.
        if self.mesh.dp_cp is not None and self.mesh.dp_cp.size() > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.AVG, group=self.mesh.dp_cp.get_group())
        return float(value)

    def checkpoint(self) -> Path:
        # The checkpointer logs "checkpoint saved" once it is durable (later, with async_save).
        self.hooks.beat("checkpoint", self.step)
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.trainer_state())

    def build_energy_meter(self) -> EnergyMeter | None:
        """This rank's GPU energy meter where every rank has one (NVML), else None on all ranks: a partial
        figure would mislead, and unmetered runs then pay no collective at their log steps."""
        meter = EnergyMeter.for_device(self.device)  # None on CPU, without nvidia-ml-py or the counter
        if self.device.type != "cuda" or not (dist.is_initialized() and self.world_size > 1):
            return meter
        metered = torch.tensor([float(meter is not None)], device=self.device)
        dist.all_reduce(metered)
        if int(metered.item()) == self.world_size:
            return meter
        if meter is not None:
            meter.close()
        return None

    def energy_window(self, seconds: float, tokens: float) -> dict:
        """Power per GPU and energy per token of the window, summed over every rank's GPU."""
        if self.energy is None:
            return {}
        joules = self.energy.lap()
        if dist.is_initialized() and self.world_size > 1:
            drawn = torch.tensor([joules], dtype=torch.float64, device=self.device)
            dist.all_reduce(drawn)
            joules = drawn.item()
        return energy_record(joules, seconds, self.world_size, tokens)

    def log(self, *, loss: float, lr: float, grad_norm: float, tokens_per_s: float, val_loss: float | None,
            energy: dict) -> None:
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops_total if self.peak_flops_total else None
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.step * self.cfg.train.global_batch * self.cfg.train.seq_len,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "mem_gib": memory_gib(self.device),
            "epoch": round(self.sampler.epoch, 4),
            **energy,
        }
        if val_loss is not None:
            record["val_loss"] = val_loss
        self.metrics.write(record)

    # -------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        try:
            return self.run_loop()
        finally:
            if self.energy is not None:  # its sampler thread, also when the run failed
                self.energy.close()

    def run_loop(self) -> TrainResult:
        self.build()
        cfg = self.cfg
        tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
        loss = val_loss = None
        saved = stopped = exclusion = None
        window_start, window_steps = time.perf_counter(), 0
        if self.energy is not None:
            self.energy.lap()  # the window starts with the loop, as the throughput's
        while self.step < cfg.train.steps:
            batch = self.sampler.next_batch(
                global_batch=cfg.train.global_batch, dp_rank=self.mesh.dp_rank, dp_size=self.mesh.dp_size
            )
            first_window = self.sampler.consumed - cfg.train.global_batch
            self.hooks.beat("forward_backward", self.step)
            # This rank's own compute (stragglers): CPU time excludes the waits inside collectives.
            clock = time.process_time if self.device.type == "cpu" else time.perf_counter
            started = clock()
            loss = self.forward_backward(batch)
            self.hooks.inject("compute", self.step + 1, compute_s=clock() - started)  # drill: slow
            compute_s = clock() - started
            loss = self.hooks.inject("after_backward", self.step + 1, loss=loss, model=self.model)["loss"]  # nan, spike
            lr, grad_norm, anomaly = self.optimizer_step(loss, compute_s)
            if anomaly is not None:
                stopped = self.recover(anomaly, first_window)
                if stopped:
                    break
                continue
            self.snapshots.after_step(self.step, self.model, self.optimizer, self.trainer_state)
            self.hooks.at("after_step", self.step)
            window_steps += 1
            last = self.step == cfg.train.steps
            stopping = self.step == cfg.run.stop_at_step
            do_eval = last or (cfg.eval.interval > 0 and self.step % cfg.eval.interval == 0)
            every = cfg.checkpoint.interval
            do_save = every >= 0 and (last or (every > 0 and self.step % every == 0))
            do_log = last or do_eval or self.step == 1 or self.step % cfg.run.log_interval == 0
            if do_log:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                window_s = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / window_s
                energy = self.energy_window(window_s, window_steps * tokens_per_step)  # before evaluating, too
            if do_eval:
                self.hooks.beat("evaluate", self.step)
            val_loss = self.evaluate() if do_eval else None
            if do_log:
                self.log(loss=loss, lr=lr, grad_norm=grad_norm, val_loss=val_loss, tokens_per_s=tokens_per_s,
                         energy=energy)
            if do_save or stopping:
                saved = self.checkpoint()
            if do_log or do_save:
                # Throughput counts training steps only, not evaluation or checkpoint time.
                window_start, window_steps = time.perf_counter(), 0
                if self.energy is not None and (do_eval or do_save):
                    self.energy.lap()  # what evaluating and saving drew stays out, as their time does
            if stopping:
                log(f"stopping at step {self.step} (run.stop_at_step); run again to resume", enabled=self.is_main)
                break
            if self.hooks.shrink.pending and not last:  # a straggler's node leaves: durable checkpoint, exit
                saved = saved if do_save else self.checkpoint()
                self.checkpointer.wait()
                exclusion = self.hooks.shrink.leave(self.step, saved)
                break
        self.checkpointer.close()  # an async save in flight becomes durable before the job ends
        self.snapshots.close()  # and the RAM the in-memory snapshots hold is freed
        if saved is None and self.step > 0:
            saved = latest_checkpoint(self.run_dir / "checkpoints")
        result = TrainResult(str(self.run_dir), self.step, loss, val_loss, str(saved) if saved else None, stopped, exclusion)
        self.hooks.beat("done", self.step)
        if dist.is_initialized():
            dist.barrier()
            if self.owns_process_group:
                dist.destroy_process_group()
        return result


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (loss-parallel losses are replicated)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
