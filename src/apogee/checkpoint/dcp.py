"""Checkpoints with ``torch.distributed.checkpoint``: every rank writes its own shards, in parallel.

Layout: ``RUN_DIR/checkpoints/step-NNNNNNNN/`` plus ``RUN_DIR/checkpoints/latest`` (the name of the
newest durable checkpoint). A save is durable before anything points at it:

1. every rank writes its DCP shards into ``step-N.tmp/`` (DCP fsyncs each file);
2. every rank checksums (CRC-32) and fsyncs its share of the files; rank 0 gathers the sums and
   writes ``manifest.json`` (step, config hash, layout, trainer state and data position, per-file
   sizes and checksums; see ``manifest.py``), fsyncs it and the directory;
3. rank 0 renames ``step-N.tmp`` to ``step-N`` and fsyncs the parent; only then does it move the
   ``latest`` pointer (write, fsync, rename, fsync) and apply retention.

A crash at any point leaves the previous checkpoint the latest. With ``async_save`` step 1 is
``dcp.async_save``: the state is staged (copied) to host memory while training waits, then written
by a background thread whose collectives run on a gloo process group of their own, created once;
steps 2-3 run in that thread once the write completed. The previous save is awaited before the
next one starts and at the end of training.

A load verifies the manifest's sizes and checksums first (each rank a share of the files, the
verdict agreed by all). ``resume=auto`` falls back to the previous good checkpoint, in one logged
line and one event, and moves the bad one aside as ``step-N.corrupt``. Nothing is unpickled beyond
plain data: DCP's ``.metadata`` is read with an allow-list unpickler, non-tensor items (optimizer
hyper-parameters) with ``torch.load(weights_only=True)``, and the trainer state lives in the
manifest's JSON.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from apogee.checkpoint.manifest import (
    MANIFEST,
    Manifest,
    checksum_share,
    data_files,
    fsync_dir,
    read_manifest_problem,
    verify_share,
    write_durable,
)

# DCP warns on every save and load without a process group, also from its background thread; one
# process is a supported case here (this filter matches that one message only).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_DIR = re.compile(r"^step-(\d{8})\.tmp$")
LATEST = "latest"

EventSink = Callable[..., None]  # emit(kind, **fields)

# Flattened optimizer state: keys name parameters (``optim.state.<fqn>.exp_avg``,
# ``optim.param_groups.<fqn>.lr``), so pipeline ranks, whose parameter groups hold different
# parameters, each save their own groups instead of DCP keeping one rank's copy.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or loaded, in one line that names it and the reason."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (renamed, with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one (None if there is none)."""
    pointer = root / LATEST
    with contextlib.suppress(OSError):
        name = pointer.read_text().strip()
        if STEP_DIR.match(name) and (root / name / MANIFEST).is_file():
            return root / name
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def config_hash(cfg_dict: dict) -> str:
    """Hash of the settings that shape the trajectory (model, data, train), not of paths or layout."""
    keep = {s: cfg_dict.get(s, {}) for s in ("model", "data", "train")}
    keep["data"] = {k: v for k, v in keep["data"].items() if k != "cache_dir"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ safe reading
_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided & co
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a pickle) allowing only DCP's own dataclasses, dtypes and sizes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module.startswith(_SAFE_MODULE_PREFIXES) or module == "torch.distributed.checkpoint":
            obj = super().find_class(module, name)
            if isinstance(obj, type) or (isinstance(obj, dict) and name.startswith("_")):
                return obj  # a DCP class or one of its encoding tables
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which apogee does not load")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner ``torch.load``s non-tensor items with ``weights_only=False``; not here."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state: dict, path: Path, *, process_group=None) -> None:
    """``dcp.load`` with the allow-list metadata reader and weights-only non-tensor items."""
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
             process_group=process_group)


def saved_keys(path: Path) -> set[str]:
    return set(SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata)


# --------------------------------------------------------------------------------- helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _all_gather(obj: Any, group=None) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _broadcast(obj: Any, group=None) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _no_events(kind: str, **fields: Any) -> None:
    pass


def _no_faults(point: str, step: int, **ctx: Any) -> None:
    pass


# torch 2.11 and 2.12: DefaultStager._stage closes its StateDictStager after every save, which empties
# the copier table the next save needs (KeyError: <class 'type'>, pytorch/pytorch#183413; seen on an
# H100 with torch 2.11); there a stager serves one save. torch 2.13 keeps it, and its host buffers.
STAGER_REUSABLE = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"


def _background_stager():
    """Copies the state into reused host buffers on a background thread (on CUDA: pinned buffers,
    a side stream, non-blocking copies), so the copy overlaps the next step's compute."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=True, use_non_blocking_copy=cuda))


class Checkpointer:
    """Durable, verified DCP checkpoints under ``root``; optionally persisted in the background.

    ``faults`` is the engine's one fault-injection hook (``resilience.faults``), called at the named
    points ``during_save`` (shards written, no manifest yet) and ``after_save`` (durable); ``events``
    receives ``checkpoint_invalid`` and ``checkpoint_fallback`` records for ``RUN_DIR/events.jsonl``.
    """

    def __init__(self, root: Path, *, keep: int, keep_every: int = 0, async_save: bool = False,
                 config_hash: str = "", layout: dict | None = None,
                 events: EventSink | None = None, faults: Callable[..., None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.root = root
        self.keep = keep
        self.keep_every = keep_every
        self.async_save = async_save
        self.config_hash = config_hash
        self.layout = layout or {"world_size": _world()}
        self.events = events if events is not None else _no_events
        self.faults = faults if faults is not None else _no_faults
        self.log = log if log is not None else (lambda msg: None)
        # Checkpoint collectives get a gloo group of their own, created once (by every rank, here):
        # a background persist must not interleave with training's collectives on the default group,
        # and DCP's async path needs a CPU backend even when training uses NCCL.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stager = None
        self._pending: concurrent.futures.Future | None = None
        self._staging: concurrent.futures.Future | None = None
        self.blocked_s: list[float] = []  # seconds each save held training up (for benchmarks)

    # ---------------------------------------------------------------------------------- save
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Checkpoint ``step``. Synchronous: durable on return. Async: staged on return, durable
        once ``wait()`` (called by the next save and by ``close``) returns."""
        start = time.perf_counter()
        self.wait()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir(parents=True)
        _barrier(self.group)
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS),
            # Per-rank key: each rank's generator is its own (the rest is deduplicated across ranks).
            f"rng.rank{_rank()}": torch.get_rng_state(),
        }
        trainer = json.loads(json.dumps(trainer_state))  # a snapshot, and proof that it is plain JSON
        if self.async_save:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="apogee-ckpt")
            if self._stager is None or not STAGER_REUSABLE:
                if self._stager is not None:
                    self._stager.close()  # the previous save is durable (waited for above)
                self._stager = _background_stager()
            response = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group,
                                      async_stager=self._stager)
            # The host copy runs behind the next forward/backward (which read the parameters but do
            # not change them); wait_staged(), before the optimizer writes them, is the only wait.
            self._staging = response.staging_completion
            self._pending = self._executor.submit(self._finish, response.upload_completion, step, tmp, final, trainer)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
            self._finish(None, step, tmp, final, trainer)
        self.blocked_s.append(time.perf_counter() - start)
        return final

    def wait_staged(self) -> None:
        """Block until the pending async save has copied the state to host memory. Call before
        anything changes the parameters or optimizer state (the optimizer step, a load)."""
        if self._staging is None:
            return
        start = time.perf_counter()
        staging, self._staging = self._staging, None
        staging.result()
        self.blocked_s[-1] += time.perf_counter() - start  # the save's share of training's time

    def _finish(self, upload: concurrent.futures.Future | None, step: int, tmp: Path, final: Path, trainer: dict) -> Path:
        """Steps 2-3: checksums and manifest, rename, ``latest``; in the persisting thread if async."""
        if upload is not None:
            upload.result()  # every rank's shards and DCP's .metadata are written
        self.faults("during_save", step)
        rank, world = _rank(), _world()
        names = data_files(tmp)
        shares = _all_gather(checksum_share(tmp, names, rank, world, fsync=True), self.group)
        if rank == 0:
            files = {name: info for share in shares for name, info in share.items()}
            manifest = Manifest(step=step, config_hash=self.config_hash, layout=self.layout, trainer=trainer, files=files)
            write_durable(tmp / MANIFEST, manifest.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            write_durable(self.root / LATEST, final.name + "\n")
            self._prune(current=final)
            self.log(f"checkpoint saved: {final}")
        _barrier(self.group)
        self.faults("after_save", step, path=final)
        return final

    def wait(self) -> Path | None:
        """Block until the pending async save is durable; re-raises its failure."""
        self.wait_staged()
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        return pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _prune(self, current: Path) -> None:
        """Keep the newest ``keep`` plus every ``keep_every``-th step; drop stale ``.tmp`` dirs."""
        for child in self.root.iterdir():
            if TMP_DIR.match(child.name):
                shutil.rmtree(child, ignore_errors=True)
        if self.keep <= 0:
            return
        found = list_checkpoints(self.root)
        for step, path in found[: -self.keep]:
            if path == current or (self.keep_every > 0 and step % self.keep_every == 0):
                continue
            shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------------------------- load
    def verify(self, path: Path) -> tuple[Manifest | None, str | None]:
        """Every rank checks its share of the files; all agree on the verdict (collective)."""
        manifest, problem = read_manifest_problem(path)
        if manifest is not None:
            problem = verify_share(path, manifest, _rank(), _world())
        problems = [p for p in _all_gather(problem, self.group) if p]
        return manifest, (problems[0] if problems else None)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Verify ``path`` and load it into the (already parallelised) model and optimizer; returns
        the trainer state from the manifest. Raises ``CheckpointError`` if it does not verify."""
        manifest, problem = self.verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} failed verification: {problem}")
        return self._load_verified(path, manifest, model, optimizer)

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[Path, dict] | None:
        """Load the newest checkpoint that verifies, falling back past bad ones; None if none does."""
        candidates: list[Path] = []
        if _rank() == 0:
            latest = latest_checkpoint(self.root)
            candidates = ([latest] if latest else []) + [p for _, p in reversed(list_checkpoints(self.root)) if p != latest]
            candidates = [str(p) for p in candidates]
        candidates = [Path(p) for p in _broadcast(candidates, self.group)]
        for i, path in enumerate(candidates):
            manifest, problem = self.verify(path)
            if problem is None:
                if i > 0 and _rank() == 0:
                    write_durable(self.root / LATEST, path.name + "\n")
                return path, self._load_verified(path, manifest, model, optimizer)
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else "a fresh start (step 0)"
            if _rank() == 0:
                self.log(f"checkpoint {path.name} is unusable ({problem}); falling back to {nxt}")
                self.events("checkpoint_fallback", checkpoint=str(path), problem=problem, fallback=nxt)
                quarantine = path.with_name(path.name + ".corrupt")
                shutil.rmtree(quarantine, ignore_errors=True)
                path.rename(quarantine)
            _barrier(self.group)
        return None

    def _load_verified(self, path: Path, manifest: Manifest, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        if self.config_hash and manifest.config_hash != self.config_hash and _rank() == 0:
            self.log(f"note: {path.name} was written under a different model/data/train config "
                     f"(hash {manifest.config_hash}, now {self.config_hash})")
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS)
        rng_key = f"rng.rank{_rank()}"
        if rng_key in saved_keys(path):
            state[rng_key] = torch.get_rng_state()
        safe_load(state, path, process_group=self.group)
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTIM_OPTIONS)
        if rng_key in state:
            torch.set_rng_state(state[rng_key])
        return copy.deepcopy(manifest.trainer)
