"""In-memory snapshots: every ``checkpoint.memory_interval`` steps each rank keeps its own shard of the
training state in RAM, and a copy of one peer's shard, so that a lost rank (or node) is recovered
from memory, without reading storage, losing at most that interval.

Why files in a RAM-backed directory (``checkpoint.memory_dir``, default ``/dev/shm``) and not
Python objects: torchrun's elastic agent restarts every worker process when one dies, so memory
inside a worker does not survive; a tmpfs outlives the process but not the node, which is exactly
the failure domain a peer copy on another node protects against.

Layout on each node: ``MEMORY_DIR/apogee-<run token>/rank-RRRRR/`` is rank R's "RAM". It holds
``step-S.rank-R.own.snap`` (R's shard) and ``step-S.rank-Q.copy.snap`` (the shard of the rank Q
whose peer R is). The run token lives in ``RUN_DIR/memory-snapshots.id``: a new run directory never
sees an old run's snapshots. Peers: the same local rank on the next node, ``(rank + local_world) %
world``, so a whole node can go; on a single node (one failure domain) the next rank.

A snapshot (``after_step``): the training thread copies the rank's local tensors (``DTensor``'s
local shard: model, flattened optimizer state as in durable checkpoints, RNG) to host memory and
goes on; a background thread serialises them (``torch.save``, loaded back with
``weights_only=True``), writes the own file (temporary name, then rename: a crash never leaves a
torn snapshot under a real name), sends the same bytes to the peer over a gloo group of its own
(never the training group), writes the peer's copy the same way, and all ranks agree that it is
complete before each drops its older files; so the previous snapshot stays until the new one is
complete everywhere. At most one snapshot is in flight: the next snapshot step waits for it before
staging its own (so every rank runs the persists' collectives in the same order, one snapshot after
another). The steps in between do not wait: a persist slower than a step stalls training only if it
is still running when the next snapshot is due. Whatever needs no snapshot in flight waits itself:
``restore`` and ``inventory`` (the trainer's anomaly rollback calls ``restore``), ``close``, and kill
drills (``settle_before``).

A restart (``restore``): every rank lists the snapshots it holds (header and CRC-32 verified, the
same run token, world, layout and config), one all-gather, and all pick the newest snapshot that
is held for every rank (own or copy, all of one lineage) and newer than the latest durable
checkpoint. A rank without its own copy receives it from the lowest rank holding it. Every rank
checks its shard against the live model and optimizer (keys, shapes, dtypes) and all agree before
anything is loaded; otherwise the trainer resumes from storage as before.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from apogee.checkpoint.dcp import _OPTIM_OPTIONS, _all_gather, _broadcast, _rank, _world, config_hash, latest_checkpoint
from apogee.checkpoint.manifest import write_durable

MAGIC = b"APOGSNP1"
FORMAT = 1
TOKEN_FILE = "memory-snapshots.id"
SNAP = re.compile(r"^step-(\d{8})\.rank-(\d{5})\.(own|copy)\.snap$")
_HEAD = struct.Struct("<8sQI")  # magic, header length, CRC-32 of the header


class SnapshotError(ValueError):
    """A snapshot file that cannot be trusted, in one line."""


# ----------------------------------------------------------------------------- pairing
def peer_of(rank: int, world: int, local_world: int) -> int | None:
    """Who keeps a copy of ``rank``'s shard: the same local rank on the next node; on one node the
    next rank; nobody when there is one rank."""
    if world <= 1:
        return None
    step = local_world if 0 < local_world < world and world % local_world == 0 else 1
    return (rank + step) % world


def source_of(rank: int, world: int, local_world: int) -> int | None:
    """Whose shard ``rank`` keeps a copy of (the inverse of ``peer_of``)."""
    if world <= 1:
        return None
    step = local_world if 0 < local_world < world and world % local_world == 0 else 1
    return (rank - step) % world


# ----------------------------------------------------------------------------- file format
def encode(header: dict, payload: bytes | memoryview) -> bytearray:
    """``MAGIC | header length | CRC-32(header) | header JSON | payload``; the header carries the
    payload's size and CRC-32, so one file is verifiable on its own."""
    header = {**header, "payload_size": len(payload), "payload_crc32": zlib.crc32(payload)}
    raw = json.dumps(header, sort_keys=True).encode()
    out = bytearray(_HEAD.pack(MAGIC, len(raw), zlib.crc32(raw)))  # writable: sent without a copy
    out += raw
    out += payload
    return out


def decode(blob: bytes | memoryview) -> tuple[dict, memoryview]:
    """(header, payload) of a snapshot, or ``SnapshotError`` saying what is wrong."""
    blob = memoryview(blob)
    if len(blob) < _HEAD.size:
        raise SnapshotError(f"{len(blob)} bytes, shorter than a snapshot header (torn)")
    magic, length, crc = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise SnapshotError("not an apogee snapshot (bad magic)")
    raw = blob[_HEAD.size : _HEAD.size + length]
    if len(raw) != length or zlib.crc32(raw) != crc:
        raise SnapshotError("header fails its CRC-32 (torn or corrupted)")
    header = json.loads(bytes(raw))
    payload = blob[_HEAD.size + length :]
    if len(payload) != header.get("payload_size"):
        raise SnapshotError(f"payload is {len(payload)} bytes, header says {header.get('payload_size')} (truncated)")
    if zlib.crc32(payload) != header.get("payload_crc32"):
        raise SnapshotError("payload fails its CRC-32 (corrupted)")
    return header, payload


def write_atomic(path: Path, blob: bytes | memoryview) -> None:
    """Temporary name, then rename: a reader sees the whole file or none. No fsync: tmpfs has no
    stable storage, and what this protects against is a dying process, not a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def file_name(step: int, origin: int, kind: str) -> str:
    return f"step-{step:08d}.rank-{origin:05d}.{kind}.snap"


def ram_backed(path: Path) -> str | None:
    """The file system type of ``path`` if it is known and not RAM-backed, else None."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    target = str(path.resolve())
    best = max((m for m in mounts if target == m[0] or target.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    if best is None or best[1] in ("tmpfs", "ramfs"):
        return None
    return best[1]


# ----------------------------------------------------------------------------- choosing
@dataclass(frozen=True)
class Choice:
    step: int
    lineage: str
    seq: int
    donors: dict[int, int]  # origin rank -> the rank that provides its shard (itself: a local read)
    kinds: dict[int, str]  # origin rank -> "own" or "copy" (what the donor holds)


def choose(inventories: list[list[dict]], world: int, durable_step: int) -> Choice | None:
    """The newest snapshot newer than ``durable_step`` held for every rank, all of one lineage
    (one process group's life and sequence number: never a mix of two trajectories), and for each
    rank who provides its shard: the rank itself if it holds it, else the lowest rank that does."""
    holders: dict[tuple, dict[int, list[tuple[int, str]]]] = {}
    for holder, entries in enumerate(inventories):
        for e in entries:
            key = (e["step"], e["lineage"], e["seq"])
            holders.setdefault(key, {}).setdefault(e["origin"], []).append((holder, e["kind"]))
    complete = [k for k, by_origin in holders.items() if k[0] > durable_step and set(by_origin) == set(range(world))]
    if not complete:
        return None
    step, lineage, seq = max(complete)
    donors, kinds = {}, {}
    for origin, held in holders[(step, lineage, seq)].items():
        held = sorted(held, key=lambda h: (h[0] != origin, h[0]))
        donors[origin], kinds[origin] = held[0]
    return Choice(step, lineage, seq, donors, kinds)


# ----------------------------------------------------------------------------- state
def _host(value: Any) -> Any:
    """A private host copy of a tensor's local shard (a DTensor's ``to_local``); other values as is."""
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model), get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS)


def _mismatch(saved: dict, live: dict, what: str) -> str | None:
    if set(saved) != set(live):
        diff = sorted(set(saved) ^ set(live))
        return f"{what} keys differ from the live ones ({len(diff)}: {', '.join(diff[:3])})"
    for key, value in live.items():
        local = _local(value)
        if isinstance(local, torch.Tensor):
            got = saved[key]
            if not isinstance(got, torch.Tensor) or got.shape != local.shape or got.dtype != local.dtype:
                return f"{what} {key}: saved {getattr(got, 'shape', type(got).__name__)}, live {tuple(local.shape)} {local.dtype}"
    return None


class MemorySnapshots:
    """The trainer's handle: ``restore`` at start, ``after_step`` every step, ``close`` at the end.
    Disabled (every call a no-op) when ``checkpoint.memory_interval`` is 0."""

    def __init__(self, cfg, *, layout: dict, device: torch.device | None = None,
                 local_world: int | None = None, events: Callable[..., Any] | None = None,
                 faults: Any = None, log: Callable[[str], None] | None = None):
        ck = cfg.checkpoint
        self.interval = ck.memory_interval
        self.last_steps = {cfg.train.steps, cfg.run.stop_at_step}  # a durable save ends the job there
        self.rank, self.world = _rank(), _world()
        self.device = device or torch.device("cpu")
        self.events = events if (events is not None and self.rank == 0) else (lambda kind, **f: None)
        self.log = log or (lambda msg: None)
        self.checkpoints = cfg.run.path / "checkpoints"
        self.enabled = self.interval > 0
        self._pending: concurrent.futures.Future | None = None
        self._pending_step: int | None = None  # the step whose snapshot is in flight
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Seconds each snapshot step held training up: waiting for the previous persist (if it took
        # longer than checkpoint.memory_interval steps), then staging (benchmarks).
        self.blocked_s: list[float] = []
        if not self.enabled:
            return
        # Everything that must match for a shard to load as it was saved: the trajectory's config,
        # the layout and every parallel setting (pp schedules decide which layers a rank holds).
        self.fingerprint = hashlib.sha256(json.dumps(
            {"config": config_hash(cfg.to_dict()), "layout": layout, "parallel": cfg.to_dict()["parallel"],
             "world": self.world}, sort_keys=True, default=str).encode()).hexdigest()[:16]
        local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.peer = peer_of(self.rank, self.world, local_world)
        self.source = source_of(self.rank, self.world, local_world)
        # Snapshot collectives and transfers run in a background thread: a gloo group of their own,
        # so they never interleave with training's collectives (and work beside NCCL).
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        token, self.lineage, problem = self._agree_on_token(cfg.run.path, Path(ck.memory_dir))
        if problem:
            self.enabled = False
            self.log(f"in-memory snapshots disabled: {problem}")
            return
        self.root = Path(ck.memory_dir) / f"apogee-{token}"
        self.holder = self.root / f"rank-{self.rank:05d}"
        self.seq = 0
        if faults is not None and hasattr(faults, "provide"):
            # lose-memory drills wipe this rank's "RAM"; kill drills settle earlier snapshots first.
            faults.provide(memory_dir=self.holder, settle_snapshots=self.settle_before)
        if self.rank == 0:
            fstype = ram_backed(self.root)
            if fstype:
                self.log(f"note: checkpoint.memory_dir {ck.memory_dir} is on {fstype}, not RAM-backed")
            if self.peer is None:
                self.log("in-memory snapshots: one rank, no peer copies (a restarted process still finds its own)")
            elif local_world >= self.world:
                self.log("in-memory snapshots: a single node is one failure domain; peer copies go to the next "
                         "rank and protect against losing a rank, not the node")

    def _agree_on_token(self, run_dir: Path, memory_dir: Path) -> tuple[str, str, str | None]:
        """Rank 0 reads or creates the run token (``RUN_DIR/memory-snapshots.id``) and a lineage for
        this process group's life; every rank checks that it can use ``memory_dir``; all agree."""
        token = lineage = ""
        if self.rank == 0:
            path = run_dir / TOKEN_FILE
            try:
                token = path.read_text().strip()
            except FileNotFoundError:
                pass
            if not re.fullmatch(r"[0-9a-f]{16}", token):
                token = uuid.uuid4().hex[:16]
                run_dir.mkdir(parents=True, exist_ok=True)
                write_durable(path, token + "\n")
            lineage = uuid.uuid4().hex[:12]
        token, lineage = _broadcast((token, lineage), self.group)
        problem = None
        try:
            (memory_dir / f"apogee-{token}" / f"rank-{self.rank:05d}").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = (f"rank {self.rank} cannot use checkpoint.memory_dir {memory_dir} ({exc.strerror}); "
                       f"set checkpoint.memory_dir to a RAM-backed directory such as /dev/shm, or memory_interval=0")
        problems = _all_gather(problem, self.group)
        return token, lineage, next((p for p in problems if p), None)

    # ------------------------------------------------------------------------------- save
    def after_step(self, step: int, model, optimizer, trainer_state: Callable[[], dict]) -> None:
        """Every step, after the optimizer. Every ``memory_interval`` steps: wait for the snapshot in
        flight (at most one), stage a new one and persist it in the background. Other steps return at
        once, the persist in flight (if any) going on behind them."""
        if not self.enabled or step % self.interval or step in self.last_steps:
            return
        start = time.perf_counter()
        self.wait()  # one in flight at a time: its collectives finish before the next one's start
        model_sd, optim_sd = _state_dicts(model, optimizer)
        state = {"model": {k: _host(v) for k, v in model_sd.items()},
                 "optim": {k: _host(v) for k, v in optim_sd.items()},
                 "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        header = {"format": FORMAT, "step": step, "rank": self.rank, "world": self.world, "lineage": self.lineage,
                  "seq": self.seq, "fingerprint": self.fingerprint,
                  "trainer": json.loads(json.dumps(trainer_state()))}
        self.seq += 1
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="apogee-snapshot")
        self._pending, self._pending_step = self._executor.submit(self._persist, header, state), step
        self.blocked_s.append(time.perf_counter() - start)

    def _persist(self, header: dict, state: dict) -> bool:
        """Serialise, write the own file, exchange with the peers, agree, prune. Every rank runs the
        same collectives whatever fails locally (a failure is a flag, not a missing collective)."""
        step = header["step"]
        blob, problem = bytearray(), None
        try:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            blob = encode(header, buffer.getbuffer())
            del state, buffer
            self.holder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.holder / file_name(step, self.rank, "own"), blob)
        except Exception as exc:  # noqa: BLE001 - a local failure must not skip the collectives below
            problem, blob = f"writing the own snapshot: {type(exc).__name__}: {exc}", bytearray()
        keep = {file_name(step, self.rank, "own")}
        if self.group is not None and self.peer is not None:
            sizes = torch.tensor([len(blob)], dtype=torch.int64)
            all_sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(all_sizes, sizes, group=self.group)
            incoming = int(all_sizes[self.source])
            requests = []
            if len(blob):
                requests.append(dist.isend(torch.frombuffer(blob, dtype=torch.uint8), self.peer, group=self.group))
            received = torch.empty(incoming, dtype=torch.uint8)
            if incoming:
                requests.append(dist.irecv(received, self.source, group=self.group))
            for request in requests:
                request.wait()
            try:
                if not incoming:
                    raise SnapshotError(f"rank {self.source} sent no snapshot")
                copy = memoryview(received.numpy())
                got, _ = decode(copy)
                if (got["step"], got["rank"]) != (step, self.source):
                    raise SnapshotError(f"expected rank {self.source}'s step {step}, got rank {got['rank']}'s step {got['step']}")
                write_atomic(self.holder / file_name(step, self.source, "copy"), copy)
                keep.add(file_name(step, self.source, "copy"))
            except (SnapshotError, OSError) as exc:
                problem = problem or f"the copy of rank {self.source}: {exc}"
        problems = _all_gather(problem, self.group)
        if any(problems):
            # The previous snapshot stays: it is the newest complete one.
            first = next(p for p in problems if p)
            self.log(f"in-memory snapshot of step {step} is incomplete ({first}); keeping the previous one")
            self.events("snapshot_failed", step=step, problem=first)
            return False
        for child in self.holder.iterdir():  # complete everywhere: the older ones can go
            if child.name not in keep:
                child.unlink(missing_ok=True)
        return True

    def wait(self) -> bool | None:
        """Wait for the snapshot in flight: True if it is complete on every rank, False if not (the
        previous one stays), None if none was in flight; re-raises what its persist raised."""
        if self._pending is None:
            return None
        pending, self._pending, self._pending_step = self._pending, None, None
        return pending.result()

    def settle_before(self, step: int) -> None:
        """Wait for a snapshot staged before ``step``, not for one staged at ``step`` itself. Kill
        drills call it (``FaultInjector.provide``) before the process dies, so that a kill at step S
        finds every earlier snapshot complete, which training alone no longer guarantees; which
        snapshot a restart finds is then the same on every run. A snapshot of step S itself may
        still be in flight, as when a real crash strikes mid-persist."""
        if self._pending is not None and self._pending_step is not None and self._pending_step < step:
            self.wait()

    def close(self) -> None:
        """The job ended with a durable checkpoint: free the RAM this rank's snapshots hold."""
        if not self.enabled:
            return
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            shutil.rmtree(self.holder, ignore_errors=True)
            try:
                self.root.rmdir()  # the last rank of the node removes the run's directory
            except OSError:
                pass

    # ------------------------------------------------------------------------------- restore
    def inventory(self) -> tuple[list[dict], list[str]]:
        """The verified snapshots this rank holds, and a line for each file that fails. Call with no
        persist in flight (``restore`` waits first): a persist writes and prunes these files."""
        found, problems = [], []
        if not self.holder.is_dir():
            return found, problems
        for child in sorted(self.holder.iterdir()):
            match = SNAP.match(child.name)
            if not match:
                child.unlink(missing_ok=True)  # a temporary file of a write that died: torn
                continue
            try:
                header, _ = decode(child.read_bytes())
                if header.get("format") != FORMAT or header.get("fingerprint") != self.fingerprint:
                    continue  # another config or layout: not loadable here, not corrupt either
                if (header["step"], header["rank"]) != (int(match.group(1)), int(match.group(2))):
                    raise SnapshotError("header names another step or rank than the file")
            except (SnapshotError, OSError, ValueError, KeyError) as exc:
                problems.append(f"{child}: {exc}")
                child.unlink(missing_ok=True)
                continue
            found.append({"step": header["step"], "origin": header["rank"], "lineage": header["lineage"],
                          "seq": header["seq"], "kind": match.group(3), "file": child.name})
        return found, problems

    def restore(self, model, optimizer) -> tuple[str, dict] | None:
        """Load the newest usable snapshot newer than the latest durable checkpoint (collective);
        returns (a label for logs and events, the trainer state), or None to resume from storage."""
        if not self.enabled:
            return None
        self.wait()  # a persist in flight runs collectives on self.group: they must not interleave
        durable = -1
        if self.rank == 0:
            latest = latest_checkpoint(self.checkpoints)
            durable = int(latest.name.split("-")[1]) if latest else 0
        mine = self.inventory()
        rows = _all_gather((mine, durable), self.group)
        start = time.perf_counter()  # from here on every rank has arrived: the restore's own cost
        durable = rows[0][1]
        for _, problems in (row[0] for row in rows):
            for problem in problems:
                self.log(f"in-memory snapshot ignored: {problem}")
                self.events("snapshot_invalid", problem=problem)
        inventories = [row[0][0] for row in rows]
        choice = choose(inventories, self.world, durable)
        if choice is None:
            if any(inventories):
                self.log(f"no in-memory snapshot newer than the durable checkpoint (step {durable}) is held for "
                         f"every rank; resuming from storage")
            return None
        blob, problem = self._fetch(choice, mine[0])
        saved = None
        if problem is None:
            try:
                header, payload = decode(blob)
                if (header["step"], header["rank"], header["lineage"]) != (choice.step, self.rank, choice.lineage):
                    raise SnapshotError("received another rank's or step's snapshot")
                saved = torch.load(io.BytesIO(payload), weights_only=True)
                model_sd, optim_sd = _state_dicts(model, optimizer)
                problem = _mismatch(saved["model"], model_sd, "model") or _mismatch(saved["optim"], optim_sd, "optimizer")
            except Exception as exc:  # noqa: BLE001 - any failure here means: use storage instead
                problem = f"{type(exc).__name__}: {exc}"
        problems = [p for p in _all_gather(problem, self.group) if p]
        if problems:
            self.log(f"in-memory snapshot of step {choice.step} is unusable ({problems[0]}); resuming from storage")
            self.events("snapshot_invalid", step=choice.step, problem=problems[0])
            return None
        self._load(saved, model, optimizer, model_sd, optim_sd)
        sources = {r: ("own" if choice.donors[r] == r else f"peer: {choice.kinds[r]} held by rank {choice.donors[r]}")
                   for r in range(self.world)}
        seconds = round(time.perf_counter() - start, 3)
        self.events("snapshot_restored", step=choice.step, durable_step=durable, sources=sources, seconds=seconds)
        self.log(f"restored the in-memory snapshot of step {choice.step} in {seconds:.2f} s (durable checkpoint: step "
                 f"{durable}; " + ", ".join(f"rank {r}: {s}" for r, s in sources.items()) + ")")
        return f"memory snapshot step-{choice.step:08d}", header["trainer"]

    def _fetch(self, choice: Choice, mine: list[dict]) -> tuple[bytes | None, str | None]:
        """This rank's shard of ``choice``: read from its own RAM, or sent by the donor that holds it.
        A received shard is also written as this rank's own file (its RAM holds it again)."""
        by_origin = {e["origin"]: e for e in mine if (e["step"], e["lineage"], e["seq"]) == (choice.step, choice.lineage, choice.seq)}
        requests, outgoing, received = [], [], None
        sizes = _all_gather({o: (self.holder / e["file"]).stat().st_size for o, e in by_origin.items()}, self.group)
        for origin, donor in sorted(choice.donors.items()):
            if donor == origin:
                continue
            if donor == self.rank:
                data = torch.frombuffer(bytearray((self.holder / by_origin[origin]["file"]).read_bytes()), dtype=torch.uint8)
                outgoing.append(data)
                requests.append(dist.isend(data, origin, group=self.group))
            elif origin == self.rank:
                received = torch.empty(sizes[donor][origin], dtype=torch.uint8)
                requests.append(dist.irecv(received, donor, group=self.group))
        for request in requests:
            request.wait()
        if choice.donors[self.rank] == self.rank:
            return (self.holder / by_origin[self.rank]["file"]).read_bytes(), None
        blob = memoryview(received.numpy())
        try:
            decode(blob)
            self.holder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.holder / file_name(choice.step, self.rank, "own"), blob)
        except (SnapshotError, OSError) as exc:
            return None, f"the shard sent by rank {choice.donors[self.rank]}: {exc}"
        return blob, None

    def _load(self, saved: dict, model, optimizer, model_sd: dict, optim_sd: dict) -> None:
        """Copy the verified shard into the live (sharded) state, in place, as ``dcp.load`` does."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        with torch.no_grad():
            for key, value in model_sd.items():
                _local(value).copy_(saved["model"][key])
            for key, value in optim_sd.items():
                if isinstance(_local(value), torch.Tensor):
                    _local(value).copy_(saved["optim"][key])
                else:
                    optim_sd[key] = saved["optim"][key]
        set_model_state_dict(model, model_sd)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=_OPTIM_OPTIONS)
        torch.set_rng_state(saved["rng"])
        if "cuda_rng" in saved and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
