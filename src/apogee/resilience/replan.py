"""Re-plan the parallel layout when an elastic job starts on another world size (after a shrink).

The rule (``replan``): keep the model-parallel degrees (``tp``, ``cp``, ``pp``) and let the
data-parallel axes absorb the change: ``dp_replicate`` is kept when it still divides the world,
``dp_shard`` fills the rest. Where that layout is impossible (a model-parallel degree larger than
the new world, a global batch the new data-parallel size does not divide, ...), every other
factorisation of the world into the five axes is tried, nearest first (the fewest halvings of
tp/cp/pp, then of dp_replicate), and the first one the engine's own ``validate`` accepts wins.

Why this rule and not the planner's ``plan_layout``: the planner ranks layouts by predicted
throughput over every knob (micro-batch, recompute, ZeRO stage, schedule), from the flavor alone
(without ``[model]`` overrides) and for a described cluster; a restart it drives may change
micro-batch and recompute, i.e. numerics and memory, in ways a resumed job did not ask for, and on
CPU its predictions mean nothing. Keeping tp/cp/pp keeps each rank's slice of every layer (the
memory and communication the job was sized for, tp inside a node) and changes only how the batch
is split, so the global batch, the data order and the loss curve continue as before (up to the
reduction order of the data-parallel sum). The result is checked by ``apogee.config.validate``,
the same check ``apogee train`` applies, so the engine never meets a layout it rejects.

What the planner is asked is whether a candidate fits: on a GPU, ``memory_check`` prices each valid
candidate with the planner's memory model (``apogee.planner.export.engine_memory_gib``, the same model
``apogee plan`` ranks with) and passes over those predicted to exceed the device's memory, since a
smaller world gives each rank a larger share of the sharded model state. A shrink whose every layout is
predicted not to fit is refused rather than restarted into running out of memory.

Only ``[parallel]`` changes (plus ``pp_microbatches`` back to automatic, and fault drills that name
an excluded rank or one the smaller world no longer has): the global batch, micro-batch and seed stay, so the
resumed job takes exactly the batches the larger one would have taken.
"""

from __future__ import annotations

import math
from typing import Callable

from apogee.config import Config, ConfigError, ParallelConfig, validate
from apogee.resilience.faults import parse_faults

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
MODEL_AXES = ("tp", "cp", "pp")  # how each layer and the layer stack are cut: kept if at all possible


def _factorisations(n: int, k: int):
    """Every ordered k-tuple of positive integers whose product is n."""
    if k == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorisations(n // d, k - 1):
                yield (d, *rest)


def _distance(old: dict[str, int], new: dict[str, int]) -> tuple:
    """How far a candidate is from the configured layout: model-parallel changes first, then
    dp_replicate; each in halvings (log2 of the ratio)."""
    def d(axis):
        return abs(math.log2(new[axis] / old[axis]))

    return (round(sum(d(a) for a in MODEL_AXES), 6), round(d("dp_replicate"), 6),
            tuple(-new[a] for a in MODEL_AXES))  # ties: the larger model-parallel degree (tp, cp, pp)


def for_world(cfg: Config, world: int, gone: frozenset[int] = frozenset()) -> Config:
    """The config without the fault drills that name an excluded rank (``gone``: that chip left with
    its node) or a rank outside ``world``. The ranks keep injecting from the original list (its
    positions name the fire-once markers, ``faults.py``), skipping the same drills."""
    specs = cfg.resilience.inject
    inject = [spec for spec, fault in zip(specs, parse_faults(specs)) if fault.rank < world and fault.rank not in gone]
    return cfg if len(inject) == len(specs) else cfg.replace(resilience={"inject": inject})


MemoryCheck = Callable[[Config, ParallelConfig], "str | None"]


def replan(cfg: Config, world: int, gone: frozenset[int] = frozenset(), fits: MemoryCheck | None = None
           ) -> tuple[Config, ParallelConfig]:
    """The config re-planned for ``world`` ranks and its resolved layout (see the module doc); ``fits``
    (``memory_check``) passes over layouts predicted not to fit the device's memory. Raises
    ``ConfigError`` (one line, naming what to change) when no layout fits."""
    cfg = for_world(cfg, world, gone)
    p = cfg.parallel
    old = {a: max(v, 1) for a, v in p.degrees().items()}  # dp_shard=-1 (fill) plays no part in the distance
    candidates = sorted((dict(zip(AXES, c)) for c in _factorisations(world, len(AXES))),
                        key=lambda c: _distance(old, c))
    first_problem = None
    for degrees in candidates:
        same_split = degrees["pp"] == p.pp and degrees["dp_shard"] * degrees["dp_replicate"] == p.dp
        parallel = {**degrees, "pp_microbatches": p.pp_microbatches if same_split else 0}  # 0: automatic
        candidate = cfg.replace(parallel=parallel)
        try:
            resolved = validate(candidate, world)
        except ConfigError as exc:
            first_problem = first_problem or str(exc)
            continue
        too_big = fits(candidate, resolved) if fits is not None else None
        if too_big is None:
            return candidate, resolved
        first_problem = first_problem or too_big
    raise ConfigError(f"no parallel layout fits the elastic world of {world} ranks (first try: {first_problem}); "
                      f"change parallel.* or train.global_batch / train.micro_batch")


def memory_check(device) -> MemoryCheck | None:
    """On a CUDA device, the planner's memory model against the device's memory
    (``apogee.planner.export.engine_memory_gib``): a re-planned layout it predicts not to fit is passed
    over, and a shrink left with no other is not made. The configured layout itself is never checked:
    the job already chose it. None elsewhere (ranks on host memory: no check). The vocabulary is the
    model's, else the tokenizer's size before the corpus is read (bpe: data.bpe_vocab_size; byte and
    char: 256; a tokenizer file: 256, an undercount of its output layer)."""
    if device.type != "cuda":
        return None
    import torch

    return capacity_check(torch.cuda.get_device_properties(device).total_memory / 2**30)


def capacity_check(capacity: float) -> MemoryCheck:
    """``memory_check`` against ``capacity`` GiB per device."""
    from apogee.planner.export import engine_memory_gib
    from apogee.train.trainer import model_vocab  # lazy: the trainer imports this module

    def check(cfg: Config, parallel: ParallelConfig) -> str | None:
        # The tokenizer's size before the corpus is read; capped by an explicit model vocabulary, which
        # model_vocab takes as given (the estimate must not fail its check against the tokenizer's).
        tokenizer = cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else 256
        vocab = model_vocab(cfg, min(tokenizer, cfg.model.args().vocab_size or tokenizer))
        need = engine_memory_gib(cfg, parallel, vocab=vocab, bf16=cfg.train.dtype != "fp32")
        if need is not None and need > capacity:
            return (f"{layout_name(parallel)} needs {need:.1f} GiB per GPU by the planner's memory model, over the "
                    f"device's {capacity:.1f} GiB")
        return None

    return check


def layout_name(parallel: ParallelConfig) -> str:
    return " x ".join(f"{a}{getattr(parallel, a)}" for a in AXES if getattr(parallel, a) > 1) or "single rank"


def fit_world(cfg: Config, world: int, *, elastic=None, log: Callable[[str], None] = print,
              events: Callable[..., object] | None = None, fits: MemoryCheck | None = None
              ) -> tuple[Config, ParallelConfig]:
    """Called by every rank at start: the config and layout to run ``world`` ranks with (the fault
    drills of excluded ranks left out, see ``for_world``).

    The configured layout when it fits; otherwise, in an elastic job (``elastic``: the
    ``elastic.Elastic`` that ``apogee launch --nnodes MIN:MAX`` with MIN < MAX hands its ranks), the
    re-planned one, announced in one log line and a ``replanned`` event that names the exclusions
    that shrank the world. A fixed-size job keeps the configured layout's error.

    After an exclusion shrank the world, the configured layout (one that fills an axis with -1 fits
    any world) must also pass ``fits``, as the shrink decision (``replan_problem``) required of it."""
    original = cfg
    shrunk = elastic is not None and bool(elastic.gone_ranks)
    if shrunk:
        cfg = for_world(cfg, world, elastic.gone_ranks)  # an excluded chip's drills left with it
    try:
        parallel = validate(cfg, world)
    except ConfigError:
        if elastic is None or not elastic.is_elastic:
            raise
    else:
        if not (shrunk and fits is not None and fits(cfg, parallel) is not None):
            return cfg, parallel
    before = cfg.parallel.degrees()
    new_cfg, parallel = replan(cfg, world, fits=fits)
    message = (f"elastic: world size {world} does not fit the configured layout "
               f"({' x '.join(f'{a}={v}' for a, v in before.items() if v != 1) or 'all 1'}); "
               f"re-planned as {layout_name(parallel)} (resilience/replan.py: keep tp/cp/pp, data parallel absorbs it), "
               f"global batch {cfg.train.global_batch} unchanged")
    log(message)
    if events is not None:
        events("replanned", world=world, before=before, after=parallel.degrees(), layout=layout_name(parallel),
               global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
               dropped_faults=sorted(set(original.resilience.inject) - set(new_cfg.resilience.inject)),
               excluded=list(elastic.excluded))
    return new_cfg, parallel


def replan_problem(cfg: Config, world: int, fits: MemoryCheck | None = None) -> str | None:
    """None if ``replan`` finds a layout for ``world`` ranks, else why not (the shrink decision)."""
    try:
        replan(cfg, world, fits=fits)
    except ConfigError as exc:
        return str(exc)
    return None
