"""Typed, frozen configuration: TOML presets plus ``--set section.key=value`` overrides.

Each component owns one section. Everything a rank needs is validated here, before any process
starts, and every rejection is one line that names the key to change.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from apogee.models.flavors import FLAVORS, ModelArgs, get_flavor

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the setting to fix."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "debug"
    dir: str = ""  # default: runs/<name>
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 10
    expandable_segments: bool = True  # CUDA's allocator grows segments in place (less fragmentation); see trainer
    # Stop (after checkpointing) once this step is done; 0 runs to train.steps. For batch systems
    # with time limits (re-queue and resume) and for drills; like Megatron's --exit-interval.
    stop_at_step: int = 0

    @property
    def path(self) -> Path:
        return Path(self.dir or f"runs/{self.name}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    flavor: str = "debug"
    # Optional overrides of the flavor's shape (0 keeps the flavor's value).
    dim: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    vocab_size: int = 0  # 0: the flavor's, else the tokenizer's rounded up to a multiple of 64
    tie_embeddings: str = ""  # "" keeps the flavor's; "true" | "false"

    def args(self) -> ModelArgs:
        """The flavor with this section's overrides applied (vocab may still be 0: see resolve_vocab)."""
        base = get_flavor(self.flavor)
        changes = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size")}
        changes = {k: v for k, v in changes.items() if v}
        if self.tie_embeddings:
            changes["tie_embeddings"] = self.tie_embeddings == "true"
        return dataclasses.replace(base, **changes)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "stdlib"  # stdlib | text | jsonl | parquet | bin
    path: str = ""
    tokenizer: str = "byte"  # byte | char | bpe | path to tokenizer.json
    bpe_vocab_size: int = 8192
    text_key: str = "text"
    glob: str = "**/*.txt"
    max_bytes: int = 0  # 0: the source's default (stdlib: 8 MiB), else a cap on corpus bytes
    bin_dtype: str = "uint16"
    val_fraction: float = 0.1  # the last fraction of the token stream is held out for validation
    cache_dir: str = ""  # default: ~/.cache/apogee/data

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "apogee" / "data"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 300
    seed: int = 1234
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 4  # sequences per forward/backward on one rank
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    compile: bool = False
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    interval: int = 50  # 0 disables periodic evaluation (the last step is always evaluated)
    batches: int = 4  # global batches (train.global_batch sequences each) per evaluation


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    interval: int = 100  # 0: only at the end; -1: never (benchmarks: no multi-GB write at the end)
    resume: str = "auto"  # auto (latest in the run directory, if any) | never | a checkpoint directory
    keep: int = 3  # newest checkpoints kept; 0 keeps all
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: off)
    async_save: bool = False  # stage to host memory, persist in the background (apogee/checkpoint/dcp.py)
    # In-memory snapshots (apogee/checkpoint/snapshot.py): every memory_interval steps each rank keeps
    # its shard, and a copy of a peer's (the next node's rank), in memory_dir, a RAM-backed directory
    # that outlives a restarted worker but not the node; a restart loads the newest one held for every
    # rank instead of reading storage when it is newer than the latest durable checkpoint. 0: off.
    memory_interval: int = 0
    memory_dir: str = "/dev/shm"


@dataclass(frozen=True, kw_only=True)
class ResilienceConfig:
    """``apogee launch``'s supervision (apogee/resilience/) and the fault drills."""

    max_restarts: int = 3  # restarts of all ranks from the latest durable checkpoint before giving up
    hang_timeout_s: float = 60.0  # no heartbeat from any rank for this long, once training: a hang
    startup_timeout_s: float = 600.0  # the same, while ranks are still starting (build, resume)
    inject: tuple[str, ...] = ()  # fault drills, e.g. ["kill:rank=1,step=6"] (apogee/resilience/faults.py)
    # Anomalies (apogee/resilience/anomalies.py): a non-finite loss or grad norm, or a loss above
    # spike_factor x its moving average (after anomaly_warmup good steps; 0: no spike check), rolls
    # back to the last checkpoint and skips the step's batch; max_anomalies at one step stop the job.
    spike_factor: float = 3.0
    anomaly_warmup: int = 10
    max_anomalies: int = 3
    # Stragglers (apogee/resilience/stragglers.py): own compute above straggler_factor x the peers'
    # median for straggler_steps steps in a row is reported.
    straggler_factor: float = 1.3
    straggler_steps: int = 5
    # Elastic shrink (apogee/resilience/elastic.py): a reported straggler's node leaves the job after a
    # durable checkpoint; the other nodes re-rendezvous (apogee launch --nnodes MIN:MAX), re-plan the
    # layout for the smaller world (resilience/replan.py) and resume with the same global batch.
    # A job that cannot shrink (one node, MIN nodes, no layout fits) says so once and keeps the rank.
    exclude_stragglers: bool = False


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Degrees of each parallel axis. Their product is the world size; -1 fills what is left."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = True  # with tp > 1
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocab-sharded logits
    # Pipeline (apogee/parallel/pipeline.py): gpipe | 1f1b | interleaved-1f1b | zero-bubble | zbv | dualpipev
    # (the last three where the installed torch has them).
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # 0: global_batch / (dp x micro_batch); they replace gradient accumulation
    pp_stages_per_rank: int = 0  # virtual stages; 0: 1 for gpipe / 1f1b, 2 for the others
    recompute: str = "none"  # activation recomputation: none | selective | full (apogee/parallel/recompute.py)
    # Memory-wall options (apogee/parallel/fsdp.py). reshard_after_forward: "default" frees each
    # block's gathered parameters after forward (ZeRO-3) except the last block's; "never" keeps them
    # until backward (ZeRO-2-like: more memory, no second all-gather); "always" frees every block's.
    reshard_after_forward: str = "default"
    # Gradient accumulation under FSDP2 (the trainer's micro-batch loop; pp = 1): "micro_batch"
    # reduce-scatters each micro-batch's gradients and accumulates the shards (torchtitan's default: sharded
    # gradient memory, one reduce-scatter per micro-batch; HSDP all-reduces across replicas only after the
    # last); "step" turns gradient sync off until the last micro-batch (one reduction per step, but every
    # gradient held whole in fp32 until then). Under pp > 1 torch's pipeline schedule reduces once per step.
    grad_reduce: str = "micro_batch"
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded params, grads and the optimizer step on CPU
    activation_offload: bool = False  # saved activations go to (pinned) CPU memory during forward

    def degrees(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp")}

    def resolved(self, world_size: int) -> "ParallelConfig":
        """Fill the one axis given as -1 so that the product equals ``world_size``; check the rest."""
        degrees = self.degrees()
        unknown = [k for k, v in degrees.items() if v == -1]
        bad = [k for k, v in degrees.items() if v == 0 or v < -1]
        if bad:
            raise ConfigError(f"parallel.{bad[0]} must be a positive degree or -1 (fill), got {degrees[bad[0]]}")
        if len(unknown) > 1:
            raise ConfigError(f"only one parallel degree may be -1, got {', '.join('parallel.' + k for k in unknown)}")
        known = 1
        for k, v in degrees.items():
            if v != -1:
                known *= v
        if unknown:
            if world_size % known:
                raise ConfigError(
                    f"world size {world_size} is not divisible by the fixed parallel degrees (product {known}); "
                    f"change --nproc or the parallel.* degrees"
                )
            return dataclasses.replace(self, **{unknown[0]: world_size // known})
        if known != world_size:
            listing = " x ".join(f"{k}={v}" for k, v in degrees.items() if v > 1) or "all 1"
            raise ConfigError(
                f"parallel degrees multiply to {known} ({listing}) but the world size is {world_size}; "
                f"set --nproc {known} or change parallel.*"
            )
        return self

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some keys changed, e.g. ``cfg.replace(train={"steps": 10})``."""
        return _build(_merge(self.to_dict(), sections))


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]
_SECTION_TYPES = typing.get_type_hints(Config)


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"unknown config section [{section}]; sections are: {', '.join(_SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        out.setdefault(section, {}).update(values)
    return out


def _coerce(section: str, key: str, value: Any, kind: type) -> Any:
    where = f"{section}.{key}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a TOML array of strings (one string: one item)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return tuple(items)
    raise AssertionError(f"unsupported config type {kind} for {where}")


def _build(raw: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for section, cls in _SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        values = raw.get(section, {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown key {section}.{key}; keys of [{section}] are: {', '.join(sorted(known))}")
        sections[section] = cls(**{k: _coerce(section, k, v, hints[k]) for k, v in values.items()})
    return Config(**sections)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.steps=10", "parallel.tp=2"]`` -> ``{"train": {"steps": "10"}, ...}`` (typed later)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r} must look like section.key=value (e.g. train.steps=100)")
        out.setdefault(section, {})[name] = _parse_scalar(value.strip())
    return out


def _parse_scalar(text: str) -> Any:
    """Read a --set value the way TOML would, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_dict(sections: dict[str, dict[str, Any]], world_size: int | None = None) -> Config:
    """A validated Config from plain sections (defaults for the rest), as a TOML file would give."""
    cfg = _build(_merge({}, sections))
    validate(cfg, world_size)
    return cfg


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a built-in preset (``debug``, ``llama-1b``, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
    raise ConfigError(f"config file {name_or_path!r} not found; give a TOML path or a preset: {presets}")


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a preset or TOML file (None: the ``debug`` preset), apply overrides, validate the result."""
    source = resolve_config_path(str(path) if path is not None else "debug")
    try:
        raw = tomllib.loads(source.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    merged = _merge({}, raw)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        merged = _merge(merged, extra)
    cfg = _build(merged)
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: int | None = None) -> ParallelConfig:
    """Reject impossible settings before any rank starts. Returns the resolved parallel degrees."""
    if cfg.model.flavor not in FLAVORS:
        raise ConfigError(f"unknown model.flavor {cfg.model.flavor!r}; choose one of: {', '.join(sorted(FLAVORS))}")
    args = cfg.model.args()
    if args.dim % args.n_heads:
        raise ConfigError(f"model.dim={args.dim} is not divisible by model.n_heads={args.n_heads}")
    if args.n_heads % args.n_kv_heads:
        raise ConfigError(f"model.n_heads={args.n_heads} is not a multiple of model.n_kv_heads={args.n_kv_heads}")
    if args.head_dim % 2:
        raise ConfigError(f"head dimension {args.head_dim} must be even for rotary embeddings; change model.dim")
    if cfg.model.tie_embeddings not in ("", "true", "false"):
        raise ConfigError(f"model.tie_embeddings must be true or false, got {cfg.model.tie_embeddings!r}")

    if cfg.data.source not in ("stdlib", "text", "jsonl", "parquet", "bin"):
        raise ConfigError(f"data.source must be stdlib, text, jsonl, parquet or bin, got {cfg.data.source!r}")
    if cfg.data.source != "stdlib":
        if not cfg.data.path:
            raise ConfigError(f"data.path is required for data.source={cfg.data.source!r}")
        if not Path(cfg.data.path).expanduser().exists():
            raise ConfigError(f"data.path {cfg.data.path!r} does not exist")
    if cfg.data.tokenizer not in ("byte", "char", "bpe") and not Path(cfg.data.tokenizer).expanduser().exists():
        raise ConfigError(f"data.tokenizer must be byte, char, bpe or a tokenizer.json path, got {cfg.data.tokenizer!r}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {cfg.data.val_fraction}")
    if cfg.data.bin_dtype not in ("uint16", "uint32"):
        raise ConfigError(f"data.bin_dtype must be uint16 or uint32, got {cfg.data.bin_dtype!r}")

    t = cfg.train
    for key in ("steps", "global_batch", "micro_batch", "seq_len"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.seq_len > args.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds the {cfg.model.flavor} flavor's context {args.max_seq_len}")
    if t.schedule not in ("cosine", "wsd", "constant"):
        raise ConfigError(f"train.schedule must be cosine, wsd or constant, got {t.schedule!r}")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr (got lr={t.lr}, min_lr={t.min_lr})")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device must be auto, cpu or cuda, got {cfg.run.device!r}")
    if cfg.run.stop_at_step < 0:
        raise ConfigError(f"run.stop_at_step must be >= 0, got {cfg.run.stop_at_step}")
    if cfg.run.log_interval < 1:
        raise ConfigError(f"run.log_interval must be at least 1, got {cfg.run.log_interval}")
    if cfg.checkpoint.interval < -1 or cfg.eval.interval < 0 or cfg.eval.batches < 1:
        raise ConfigError("checkpoint.interval must be >= -1, eval.interval >= 0 and eval.batches >= 1")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).is_dir():
        raise ConfigError(f"checkpoint.resume must be auto, never or a checkpoint directory, got {cfg.checkpoint.resume!r}")
    if cfg.checkpoint.keep < 0 or cfg.checkpoint.keep_every < 0:
        raise ConfigError("checkpoint.keep and checkpoint.keep_every must be >= 0 (0: keep all / off)")
    ck = cfg.checkpoint
    if ck.memory_interval < 0:
        raise ConfigError(f"checkpoint.memory_interval must be >= 0 (0: off), got {ck.memory_interval}")
    if ck.memory_interval > 0 and not Path(ck.memory_dir).is_dir():
        raise ConfigError(f"checkpoint.memory_dir {ck.memory_dir!r} is not a directory; in-memory snapshots need a "
                          f"RAM-backed one (e.g. /dev/shm): set checkpoint.memory_dir, or checkpoint.memory_interval=0")
    r = cfg.resilience
    if r.max_restarts < 0:
        raise ConfigError(f"resilience.max_restarts must be >= 0, got {r.max_restarts}")
    if r.hang_timeout_s <= 0 or r.startup_timeout_s <= 0:
        raise ConfigError("resilience.hang_timeout_s and resilience.startup_timeout_s must be > 0 seconds")
    if r.spike_factor != 0 and r.spike_factor <= 1:
        raise ConfigError(f"resilience.spike_factor must be > 1 (0: no spike check), got {r.spike_factor}")
    if r.anomaly_warmup < 0 or r.max_anomalies < 1:
        raise ConfigError("resilience.anomaly_warmup must be >= 0 and resilience.max_anomalies >= 1")
    if r.straggler_factor <= 1 or r.straggler_steps < 1:
        raise ConfigError("resilience.straggler_factor must be > 1 and resilience.straggler_steps >= 1")
    from apogee.resilience.faults import parse_faults  # plain Python, no torch

    try:
        faults = parse_faults(r.inject)
    except ValueError as exc:
        raise ConfigError(f"resilience.inject: {exc}") from None
    for fault in faults:
        if fault.kind == "lose-memory":
            if ck.memory_interval == 0:
                raise ConfigError("resilience.inject: lose-memory wipes in-memory snapshots; it needs checkpoint.memory_interval > 0")
            if not any(f.kind in ("kill", "kill-during-save") and f.rank == fault.rank for f in faults):
                raise ConfigError(f"resilience.inject: lose-memory:rank={fault.rank} acts when rank {fault.rank} is killed; "
                                  f"add kill:rank={fault.rank},step=S")

    p = cfg.parallel
    if world_size is None:
        if -1 in p.degrees().values():
            return p  # resolved once the world size is known
        world_size = 1
        for v in p.degrees().values():
            world_size *= v
    p = p.resolved(world_size)
    for fault in faults:
        if fault.rank >= world_size:
            raise ConfigError(f"resilience.inject: {fault.kind} names rank {fault.rank}, but the world size is {world_size}")
    if p.cp > 1 and t.seq_len % (2 * p.cp):
        raise ConfigError(
            f"train.seq_len={t.seq_len} is not divisible by 2 x parallel.cp={2 * p.cp} "
            f"(context parallel splits each sequence into 2 x cp chunks)"
        )
    if p.grad_reduce not in ("micro_batch", "step"):
        raise ConfigError(f"parallel.grad_reduce must be micro_batch or step, got {p.grad_reduce!r}")
    if p.reshard_after_forward not in ("default", "always", "never"):
        raise ConfigError(f"parallel.reshard_after_forward must be default, always or never, got {p.reshard_after_forward!r}")
    if p.cpu_offload and p.dp * p.cp == 1 and p.tp * p.pp > 1:
        # One rank alone offloads its whole model (FSDP2 over a 1-rank mesh); beside tp or pp it needs
        # a data axis to shard over.
        raise ConfigError("parallel.cpu_offload with tp or pp needs parallel.dp_shard, dp_replicate or cp > 1 "
                          "(alone on one rank it offloads the whole model)")
    if p.recompute not in ("none", "selective", "full"):
        raise ConfigError(f"parallel.recompute must be none, selective or full, got {p.recompute!r}")
    if args.n_heads % p.tp:
        raise ConfigError(f"model heads ({args.n_heads}) are not divisible by parallel.tp={p.tp}")
    if args.n_kv_heads % p.tp:
        raise ConfigError(f"model kv heads ({args.n_kv_heads}) are not divisible by parallel.tp={p.tp}")
    if args.ffn_hidden % p.tp:
        raise ConfigError(f"model.ffn_hidden={args.ffn_hidden} is not divisible by parallel.tp={p.tp}")
    if p.tp > 1 and p.sequence_parallel and (t.seq_len // p.cp) % p.tp:
        raise ConfigError(
            f"train.seq_len={t.seq_len} / parallel.cp={p.cp} is not divisible by parallel.tp={p.tp} "
            f"(needed by sequence parallel)"
        )
    if t.global_batch % (t.micro_batch * p.dp):
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x "
            f"data-parallel size {p.dp} (dp_replicate x dp_shard); change train.global_batch or train.micro_batch"
        )
    from apogee.parallel.pipeline import check_config  # lazy: it imports torch

    check_config(cfg, p, args)
    return p


def write_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cfg.to_toml())
    tmp.replace(path)
