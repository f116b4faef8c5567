"""Pipeline parallelism with ``torch.distributed.pipelining``: stages by layer, torch's schedules.

The model is split into ``pp x stages_per_rank`` contiguous stages by layer. Stage 0 also owns the
token embedding, the last stage the final norm and the output projection; layers are balanced by
compute, counting the output projection (a vocab x dim matmul) against the last stage.

Each stage is the plain ``Transformer`` with the modules it does not own removed (set to None), so
its forward stays the model's own. A rank keeps one more view, the union of its stages under the
full model's parameter names (``layers.<global index>`` ...): the optimizer, gradient clipping,
seeded initialisation and checkpoints all see that one module and need nothing pipeline-specific.
Stage modules and the union share the same submodules, so whatever TP, recompute, compile and FSDP
do to a block is seen by both.

Stage placement follows torch's conventions: ``single`` (one stage per rank, GPipe and 1F1B),
``loop`` (rank r holds stages r, r + pp, r + 2 pp, ...: interleaved 1F1B and interleaved zero
bubble) and ``v`` (rank r holds stages r and 2 pp - 1 - r: ZB-V and DualPipeV, whose first and
last stages therefore share rank 0).

Tied embeddings: the first and last stages each hold a copy of the shared weight under its one
name and sum their gradients after every step (``tie_across_stages``, ``TiedGrads``); the V
placements, whose two ends share rank 0 in separate FSDP units, do not support it yet.

Batches: the schedule's micro-batches replace gradient accumulation. A rank's share of the global
batch (``global_batch / dp`` sequences) is split into ``pp_microbatches`` micro-batches of
``train.micro_batch`` sequences each; the loss function divides each micro-batch's mean loss by
their number (as the trainer divides by its accumulation steps) and the schedule does not rescale
gradients (``scale_grads=False``), so the gradients are those of the mean over the global batch.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from apogee.models.flavors import ModelArgs
from apogee.models.llama import Transformer
from apogee.parallel.balance import balanced_stage_sizes

# name -> (torch.distributed.pipelining class, stage placement)
SCHEDULES: dict[str, tuple[str, str]] = {
    "gpipe": ("ScheduleGPipe", "single"),
    "1f1b": ("Schedule1F1B", "single"),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zero-bubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}
# Schedules that split backward into input and weight gradients: torch does not support them
# with torch.compile.
_SPLIT_BACKWARD = ("zero-bubble", "zbv", "dualpipev")


def available_schedules() -> list[str]:
    """The schedules the installed torch provides (zero bubble and DualPipeV are recent)."""
    import torch.distributed.pipelining as pipelining

    return [name for name, (cls, _) in SCHEDULES.items() if hasattr(pipelining, cls)]


def stages_per_rank(schedule: str, setting: int) -> int:
    """``parallel.pp_stages_per_rank``; 0 picks 1 for single-stage schedules and 2 for the others."""
    if setting:
        return setting
    return 1 if SCHEDULES[schedule][1] == "single" else 2


def stage_ids(pp_rank: int, pp: int, per_rank: int, style: str) -> list[int]:
    """The stages rank ``pp_rank`` runs, in order."""
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def stage_owner(stage: int, pp: int, style: str) -> int:
    """The pp rank that runs ``stage`` (the inverse of ``stage_ids``)."""
    if style == "v" and stage >= pp:
        return 2 * pp - 1 - stage
    return stage % pp


def split_layers(args: ModelArgs, n_stages: int, seq_len: int) -> list[range]:
    """Contiguous layer ranges, one per stage, each at least one layer, balancing compute.

    A layer costs its parameters plus its attention (2 x seq_len x dim multiply-adds per token);
    the last stage's output projection costs vocab x dim, in the same units (the embedding lookup
    is free). Minimise the most loaded stage; surplus layers come off the most loaded stages.
    """
    kv_dim = args.n_kv_heads * args.head_dim
    layer = 2 * args.dim * args.dim + 2 * args.dim * kv_dim + 3 * args.dim * args.ffn_hidden + 2 * seq_len * args.dim
    caps = balanced_stage_sizes(args.n_layers, n_stages, args.vocab_size * args.dim / layer if args.vocab_size else 0.0)
    ranges, start = [], 0
    for count in caps:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def check_config(cfg, parallel, args: ModelArgs) -> None:
    """Pipeline settings a schedule cannot run with, as one-line ``ConfigError``s naming the key."""
    from apogee.config import ConfigError

    name = parallel.pp_schedule
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    available = available_schedules()
    if name not in available:
        raise ConfigError(
            f"parallel.pp_schedule={name!r} needs torch.distributed.pipelining.{SCHEDULES[name][0]}, which torch "
            f"{torch.__version__} lacks; choose one of {', '.join(available)}"
        )
    if parallel.pp_stages_per_rank < 0 or parallel.pp_microbatches < 0:
        raise ConfigError("parallel.pp_stages_per_rank and parallel.pp_microbatches must be >= 0 (0: automatic)")
    if parallel.pp == 1:
        return
    style = SCHEDULES[name][1]
    v = stages_per_rank(name, parallel.pp_stages_per_rank)
    if style == "single" and v != 1:
        raise ConfigError(f"parallel.pp_schedule={name} runs one stage per rank: set parallel.pp_stages_per_rank=1 "
                          f"(or choose interleaved-1f1b for {v} virtual stages)")
    if style == "loop" and v < 2:
        raise ConfigError(f"parallel.pp_schedule={name} interleaves virtual stages: set parallel.pp_stages_per_rank >= 2")
    if style == "v" and v != 2:
        raise ConfigError(f"parallel.pp_schedule={name} places exactly 2 stages per rank (V shape): set parallel.pp_stages_per_rank=2")
    n_stages = parallel.pp * v
    if args.n_layers < n_stages:
        raise ConfigError(
            f"model.n_layers={args.n_layers} cannot fill parallel.pp x parallel.pp_stages_per_rank = {n_stages} "
            f"pipeline stages (each needs a layer); lower parallel.pp or parallel.pp_stages_per_rank"
        )
    if args.tie_embeddings and style == "v":
        raise ConfigError(f"model.tie_embeddings=true is not supported with parallel.pp_schedule={name} (its first and "
                          "last stages are separate FSDP units on one rank); choose 1f1b, gpipe, interleaved-1f1b or "
                          "zero-bubble, or set model.tie_embeddings=false")
    t = cfg.train
    local = t.global_batch // parallel.dp
    n_mb = parallel.pp_microbatches or local // t.micro_batch
    if n_mb * t.micro_batch != local:
        raise ConfigError(
            f"parallel.pp_microbatches={n_mb} x train.micro_batch={t.micro_batch} must equal this rank's share of "
            f"the batch, train.global_batch / dp = {local}; change train.micro_batch or set parallel.pp_microbatches=0"
        )
    need = {
        "1f1b": (n_mb >= n_stages, f"at least the {n_stages} stages"),
        "interleaved-1f1b": (n_mb % parallel.pp == 0, f"a multiple of parallel.pp={parallel.pp}"),
        "zero-bubble": (n_mb % parallel.pp == 0, f"a multiple of parallel.pp={parallel.pp}"),
        "zbv": (n_mb >= n_stages, f"at least the {n_stages} stages"),
        "dualpipev": (n_mb >= n_stages, f"at least the {n_stages} stages"),
    }.get(name, (True, ""))
    if not need[0]:
        raise ConfigError(
            f"parallel.pp_schedule={name} needs the number of micro-batches ({n_mb}, parallel.pp_microbatches or "
            f"train.global_batch / (dp x train.micro_batch)) to be {need[1]}; change train.micro_batch or train.global_batch"
        )
    if t.compile and name in _SPLIT_BACKWARD:
        raise ConfigError(f"parallel.pp_schedule={name} splits backward, which torch cannot compile; set train.compile=false")


def _stage_view(model: Transformer, layers: range, *, first: bool, last: bool) -> Transformer:
    """A Transformer that shares ``model``'s submodules for ``layers`` (and embedding / head)."""
    stage = Transformer.__new__(Transformer)
    nn.Module.__init__(stage)
    stage.args = model.args
    stage.tok_embeddings = model.tok_embeddings if first else None
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    stage.norm = model.norm if last else None
    stage.output = model.output if last else None
    stage.register_buffer("rope", model.rope, persistent=False)
    return stage


def split_model(model: Transformer, *, pp_rank: int, pp: int, schedule: str, per_rank: int, seq_len: int
                ) -> tuple[Transformer, list[tuple[int, Transformer]]]:
    """Split a (meta-device) model: returns this rank's union of stages, pruned in place from
    ``model``, and its stages as ``(stage id, module)`` pairs."""
    n_stages = pp * per_rank
    ranges = split_layers(model.args, n_stages, seq_len)
    ids = stage_ids(pp_rank, pp, per_rank, SCHEDULES[schedule][1])
    stages = [(s, _stage_view(model, ranges[s], first=s == 0, last=s == n_stages - 1)) for s in ids]
    owned = {str(i) for s in ids for i in ranges[s]}
    for key in [k for k in model.layers if k not in owned]:
        del model.layers[key]
    if 0 not in ids and not (model.args.tie_embeddings and n_stages - 1 in ids):
        # A tied model's last stage keeps the embedding module, unused, as the holder of the output
        # weight under its single-process name (see tie_across_stages).
        model.tok_embeddings = None
    if n_stages - 1 not in ids:
        model.norm = None
        model.output = None
    return model, stages


def tie_across_stages(model: Transformer, pp: int) -> None:
    """Tied embeddings when the first and last stages sit on different ranks (Megatron's scheme).

    Each of the two ranks holds a copy of the [vocab, dim] weight: the first stage as the embedding,
    the last as the output projection. Both copies are named ``tok_embeddings.weight`` (the last
    stage's union keeps an unused embedding module pointing at the output weight), so they start
    equal (initialisation is seeded by name), are saved and loaded under the single-process names,
    and, once ``TiedGrads`` sums their gradients, take the same optimizer step and stay equal.
    Call after TP and FSDP have replaced the output weight (it points the holder at the new one).
    """
    if pp > 1 and model.args.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.tok_embeddings.weight = model.output.weight


class TiedGrads:
    """Sums the two copies' gradients of a tied embedding between the ranks holding the first and
    the last pipeline stage (one two-rank group per data/context/tensor coordinate). Middle stages
    take no part; ``counted_elsewhere`` names the copy the gradient norm must not count twice."""

    def __init__(self, model: Transformer, group: dist.ProcessGroup, first_rank: int, last_rank: int):
        pp = dist.get_world_size(group)
        ends = (dist.get_global_rank(group, first_rank), dist.get_global_rank(group, last_rank))
        pairs: list[tuple[int, int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(pairs, ends)
        # Every rank creates every pair's group, in the same order (new_group is collective).
        self.group, _ = dist.new_subgroups_by_enumeration(sorted({tuple(p) for p in pairs}))
        pp_rank = dist.get_rank(group)
        self.param = model.tok_embeddings.weight if pp_rank in (first_rank, last_rank) and pp > 1 else None
        self.counted_elsewhere = [self.param] if self.param is not None and pp_rank == last_rank else []

    def all_reduce(self) -> None:
        if self.param is None or self.param.grad is None:
            return
        grad = self.param.grad
        if isinstance(grad, DTensor) and grad.placements != self.param.placements:
            # The vocab-parallel embedding's gradient comes back replicated: shard it like the
            # output copy's (a local slice), so both ranks reduce the same block.
            grad = self.param.grad = grad.redistribute(self.param.device_mesh, self.param.placements)
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.group)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _no_self_warmup(stage, own_rank: int) -> None:
    """Drop the warm-up sends and receives a stage addresses to its own rank. Under the V schedules
    (zbv, dualpipev) neighbouring stages share a rank; torch 2.11's first step sends a warm-up tensor to
    each neighbour's rank, itself included, and gloo cannot send to itself ("Pair is not connected";
    torch 2.13 no longer sends these). A send to oneself warms nothing up, so dropping the pair (both
    ends are on this rank) changes nothing else."""
    make_ops = getattr(stage, "_get_init_p2p_neighbors_ops", None)
    if make_ops is None:
        return

    def without_self():
        return [op for op in make_ops() if op.group_peer != own_rank]

    stage._get_init_p2p_neighbors_ops = without_self


class Pipeline:
    """This rank's pipeline stages and the schedule that runs them over the pp process group."""

    def __init__(self, model: Transformer, stages: list[tuple[int, Transformer]], *, schedule: str, n_stages: int,
                 n_microbatches: int, group: dist.ProcessGroup, device: torch.device,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        from torch.distributed import pipelining

        for _, module in stages:
            module.rope = model.rope  # initialised on the union after the split
        self.group = group
        self.device = device
        self.modules = dict(stages)
        self.ids = [s for s, _ in stages]
        self.n_stages = n_stages
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.pp = dist.get_world_size(group)
        self.pp_rank = dist.get_rank(group)
        self.style = SCHEDULES[schedule][1]
        self.has_first = 0 in self.ids
        self.has_last = n_stages - 1 in self.ids
        self.tied = None
        if model.args.tie_embeddings:
            self.tied = TiedGrads(model, group, stage_owner(0, self.pp, self.style), stage_owner(n_stages - 1, self.pp, self.style))
        pipeline_stages = [
            pipelining.PipelineStage(module, s, n_stages, device, group=group) for s, module in stages
        ]
        for stage in pipeline_stages:
            _no_self_warmup(stage, dist.get_rank(group))
        cls = getattr(pipelining, SCHEDULES[schedule][0])
        first = pipeline_stages[0] if SCHEDULES[schedule][1] == "single" else pipeline_stages
        # Each micro-batch loss is already divided by n_microbatches: no rescaling of gradients.
        self.schedule = cls(first, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self._no_outputs = (
            {"return_outputs": False} if "return_outputs" in inspect.signature(self.schedule.step).parameters else {}
        )

    def _run(self, fn, inputs: torch.Tensor, targets: torch.Tensor, **extra) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        # Contiguous: a batch is a slice of one token window ([:, :-1]), and torch 2.11's stages check
        # the input's strides against the contiguous example they were built with.
        args = (inputs.to(self.device).contiguous(),) if self.has_first else ()
        target = targets.to(self.device) if self.has_last else None
        fn(*args, target=target, losses=losses, **extra)
        total = torch.zeros((), device=self.device)
        for loss in losses:
            total += _local(loss.detach()).float()
        # Only the last stage has the losses: every pp rank gets their sum, so all ranks log it.
        dist.all_reduce(total, group=self.group)
        return total

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward over the micro-batches; the sum of their (pre-divided) losses."""
        loss = self._run(self.schedule.step, inputs, targets, **self._no_outputs)
        if self.tied is not None:
            self.tied.all_reduce()
        return loss

    @property
    def counted_elsewhere(self) -> list[torch.Tensor]:
        """Parameters whose gradient another rank already counts in the global norm."""
        return self.tied.counted_elsewhere if self.tied is not None else []

    @torch.no_grad()
    def eval(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward only; the sum of the micro-batches' (pre-divided) losses, on every pp rank.

        Stage by stage, one micro-batch at a time, with plain point-to-point sends: torch's
        ``schedule.eval`` fails for the V-shaped schedules (2.13), and evaluation needs no overlap.
        """
        total = torch.zeros((), device=self.device)
        for x, y in zip(inputs.tensor_split(self.n_microbatches), targets.tensor_split(self.n_microbatches)):
            h = x.to(self.device) if self.has_first else None
            for s in range(self.n_stages):
                src, dst = stage_owner(s - 1, self.pp, self.style) if s else None, stage_owner(s, self.pp, self.style)
                if s and src != dst:
                    if self.pp_rank == src:
                        _send(h, dist.get_global_rank(self.group, dst), self.group)
                    elif self.pp_rank == dst:
                        h = _recv(dist.get_global_rank(self.group, src), self.group, self.device)
                if s in self.modules:
                    h = self.modules[s](h)
            if self.has_last:
                total += _local(self.loss_fn(h, y.to(self.device))).float()
        dist.all_reduce(total, group=self.group)
        return total


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _send(t: torch.Tensor, dst: int, group: dist.ProcessGroup) -> None:
    """Send a tensor preceded by its dtype and shape (up to 6 dimensions)."""
    t = t.contiguous()
    header = torch.tensor([_DTYPES.index(t.dtype), t.ndim, *t.shape] + [0] * (6 - t.ndim), dtype=torch.int64)
    dist.send(header.to(t.device), dst, group=group)
    dist.send(t, dst, group=group)


def _recv(src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    header = torch.empty(8, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    code, ndim, *shape = header.tolist()
    t = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=device)
    dist.recv(t, src, group=group)
    return t
