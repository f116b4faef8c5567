"""In-memory snapshots (apogee/checkpoint/snapshot.py), in one process: the file format rejects torn
and corrupted files, the choice needs every rank's shard of one lineage newer than the durable
checkpoint, a restore is bit-exact, and a corrupted or torn snapshot makes the run resume from storage."""

from __future__ import annotations

import threading

import pytest
import torch

from apogee.checkpoint.dcp import Checkpointer
from apogee.checkpoint.snapshot import (
    MemorySnapshots, SnapshotError, choose, decode, encode, file_name, peer_of, source_of,
)
from apogee.config import ConfigError
from apogee.resilience.faults import FaultInjector, parse_fault
from helpers import tiny_config


def test_peers_cross_nodes_and_invert():
    # 2 nodes x 4 ranks: the same local rank on the other node.
    assert [peer_of(r, 8, 4) for r in range(8)] == [4, 5, 6, 7, 0, 1, 2, 3]
    # 3 nodes x 2: the next node, around the ring.
    assert [peer_of(r, 6, 2) for r in range(6)] == [2, 3, 4, 5, 0, 1]
    # One node is one failure domain: the next rank. One rank: nobody.
    assert [peer_of(r, 4, 4) for r in range(4)] == [1, 2, 3, 0]
    assert peer_of(0, 1, 1) is None and source_of(0, 1, 1) is None
    for world, local in ((8, 4), (6, 2), (4, 4), (2, 2)):
        assert all(source_of(peer_of(r, world, local), world, local) == r for r in range(world))


def test_format_detects_torn_and_corrupted_files():
    blob = encode({"step": 4, "rank": 1}, b"x" * 1000)
    header, payload = decode(blob)
    assert header["step"] == 4 and bytes(payload) == b"x" * 1000
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF
    with pytest.raises(SnapshotError, match="corrupted"):
        decode(flipped)
    with pytest.raises(SnapshotError, match="truncated"):
        decode(blob[:-1])
    with pytest.raises(SnapshotError, match="torn"):
        decode(blob[:5])
    broken_header = bytearray(blob)
    broken_header[25] ^= 0x01
    with pytest.raises(SnapshotError):
        decode(broken_header)


def entry(step, origin, kind, lineage="a", seq=None):
    return {"step": step, "origin": origin, "kind": kind, "lineage": lineage, "seq": step if seq is None else seq}


def test_choice_needs_every_rank_one_lineage_and_newer_than_durable():
    # Rank 1 lost its RAM: its shard at step 4 survives only as rank 0's copy.
    inventories = [[entry(4, 0, "own"), entry(4, 1, "copy"), entry(2, 0, "own")], []]
    c = choose(inventories, 2, durable_step=0)
    assert (c.step, c.donors, c.kinds) == (4, {0: 0, 1: 0}, {0: "own", 1: "copy"})
    # Both ranks hold their own: no transfer.
    both = [[entry(4, 0, "own"), entry(4, 1, "copy")], [entry(4, 1, "own"), entry(4, 0, "copy")]]
    assert choose(both, 2, 0).donors == {0: 0, 1: 1}
    # Not newer than the durable checkpoint: storage.
    assert choose(both, 2, durable_step=4) is None
    # A step held for only some ranks is not a snapshot; the older complete one is.
    partial = [[entry(6, 0, "own"), entry(4, 0, "own")], [entry(4, 1, "own")]]
    assert choose(partial, 2, 0).step == 4
    # Two lineages (a restart overwrote some ranks' step 6) never mix.
    mixed = [[entry(6, 0, "own", "new", 0)], [entry(6, 1, "own", "old", 3)]]
    assert choose(mixed, 2, 0) is None


def test_lose_memory_parses_and_needs_a_kill(tmp_path, cache_dir):
    assert parse_fault("lose-memory:rank=1").step == 0
    assert parse_fault("lose-memory:rank=1,step=5").step == 5
    with pytest.raises(ValueError, match="rank=R"):
        parse_fault("lose-memory:step=5")
    with pytest.raises(ConfigError, match="add kill:rank=1"):
        tiny_config(tmp_path, cache_dir, checkpoint={"memory_interval": 2}, resilience={"inject": ["lose-memory:rank=1"]})
    with pytest.raises(ConfigError, match="checkpoint.memory_interval > 0"):
        tiny_config(tmp_path, cache_dir, resilience={"inject": ["kill:rank=0,step=3", "lose-memory:rank=0"]})
    with pytest.raises(ConfigError, match="checkpoint.memory_dir"):
        tiny_config(tmp_path, cache_dir, checkpoint={"memory_interval": 2, "memory_dir": str(tmp_path / "absent")})
    # The kill of rank 0 wipes the memory directory before the (here intercepted) SIGKILL.
    ram = tmp_path / "ram"
    ram.mkdir()
    (ram / "step-00000002.rank-00000.own.snap").write_bytes(b"x")
    injector = FaultInjector(["kill:rank=0,step=3", "lose-memory:rank=0"], rank=0, run_dir=tmp_path)
    injector.provide(memory_dir=ram)
    killed = []
    import apogee.resilience.faults as faults

    real_kill = faults.os.kill
    faults.os.kill = lambda pid, sig: killed.append(sig)
    try:
        injector("after_step", 2)
        assert ram.exists() and not killed
        injector("after_step", 3)
    finally:
        faults.os.kill = real_kill
    assert killed and not ram.exists()


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def train(model, optimizer, steps):
    for _ in range(steps):
        loss = model(torch.randn(3, 4)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def setup(tmp_path, cache_dir):
    (tmp_path / "shm").mkdir(exist_ok=True)
    cfg = tiny_config(tmp_path / "run", cache_dir, checkpoint={"memory_interval": 2, "memory_dir": str(tmp_path / "shm")})
    events = []
    torch.manual_seed(0)
    model = Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snaps = MemorySnapshots(cfg, layout={"world_size": 1}, events=lambda kind, **f: events.append((kind, f)))
    return cfg, model, optimizer, snaps, events


def test_restore_is_bit_exact(tmp_path, cache_dir):
    cfg, model, optimizer, snaps, events = setup(tmp_path, cache_dir)
    train(model, optimizer, 4)
    snaps.after_step(4, model, optimizer, lambda: {"step": 4, "sampler": {"consumed": 32}})
    snaps.wait()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_adam = [optimizer.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    want_rng = torch.get_rng_state()
    train(model, optimizer, 3)  # the run goes on, then "dies"

    torch.manual_seed(123)
    fresh = Model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    again = MemorySnapshots(cfg, layout={"world_size": 1}, events=lambda kind, **f: events.append((kind, f)))
    label, state = again.restore(fresh, fresh_opt)
    assert label == "memory snapshot step-00000004" and state == {"step": 4, "sampler": {"consumed": 32}}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    for p, w in zip(fresh.parameters(), want_adam):
        assert torch.equal(fresh_opt.state[p]["exp_avg_sq"], w)
        assert float(fresh_opt.state[p]["step"]) == 4
    assert torch.equal(torch.get_rng_state(), want_rng)
    restored = [f for kind, f in events if kind == "snapshot_restored"]
    assert restored and restored[0]["step"] == 4 and restored[0]["sources"] == {0: "own"}
    again.close()
    assert not again.root.exists()  # the job's end frees the RAM


@pytest.mark.parametrize("damage", ["flip", "truncate", "torn"])
def test_damaged_snapshot_is_ignored_and_storage_is_used(damage, tmp_path, cache_dir):
    cfg, model, optimizer, snaps, events = setup(tmp_path, cache_dir)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", keep=2)
    train(model, optimizer, 2)
    checkpointer.save(2, model, optimizer, {"step": 2})
    durable = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, optimizer, 2)
    snaps.after_step(4, model, optimizer, lambda: {"step": 4})
    snaps.wait()
    own = snaps.holder / file_name(4, 0, "own")
    if damage == "torn":
        # A snapshot write that died before its rename: only the temporary file exists.
        own.rename(own.with_name(own.name + ".tmp"))
    elif damage == "flip":
        raw = bytearray(own.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        own.write_bytes(raw)
    else:
        own.write_bytes(own.read_bytes()[:-100])

    fresh = Model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    again = MemorySnapshots(cfg, layout={"world_size": 1}, events=lambda kind, **f: events.append((kind, f)))
    assert again.restore(fresh, fresh_opt) is None
    path, state = checkpointer.load_latest(fresh, fresh_opt)
    assert state["step"] == 2 and path.name == "step-00000002"
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, durable[k]), k
    invalid = [f for kind, f in events if kind == "snapshot_invalid"]
    assert bool(invalid) == (damage != "torn")  # a torn write never had a real name: nothing to report
    assert not any(again.holder.iterdir())  # bad and torn files are removed


def gated_persist(snaps, monkeypatch):
    """Make ``snaps``' background persists wait for ``release`` (a persist slower than any step), and
    record the steps they finish; ``entered`` is set when the training thread starts waiting."""
    release, entered, persisted = threading.Event(), threading.Event(), []
    real_persist, real_wait = snaps._persist, snaps.wait

    def persist(header, state):
        assert release.wait(60), "the test never released the persist"  # a hang guard, not a timing
        ok = real_persist(header, state)
        persisted.append(header["step"])
        return ok

    def wait():
        if snaps._pending is not None:
            entered.set()
        return real_wait()

    monkeypatch.setattr(snaps, "_persist", persist)
    monkeypatch.setattr(snaps, "wait", wait)
    return release, entered, persisted


def test_only_a_snapshot_step_waits_for_the_persist_in_flight(tmp_path, cache_dir, monkeypatch):
    cfg, model, optimizer, snaps, _ = setup(tmp_path, cache_dir)  # memory_interval = 2
    release, entered, persisted = gated_persist(snaps, monkeypatch)
    train(model, optimizer, 2)
    snaps.after_step(2, model, optimizer, lambda: {"step": 2})
    first = snaps._pending
    assert first is not None and not first.done() and len(snaps.blocked_s) == 1
    train(model, optimizer, 1)
    # Step 3: no snapshot due. It returns with step 2's persist still pending, without waiting.
    snaps.after_step(3, model, optimizer, lambda: {"step": 3})
    assert snaps._pending is first and not first.done() and persisted == []
    assert not entered.is_set() and len(snaps.blocked_s) == 1
    # Drills: a kill at step 2 does not wait for step 2's own snapshot.
    snaps.settle_before(2)
    assert snaps._pending is first and not entered.is_set()

    # Step 4 is due: it waits for step 2's persist before staging its own (at most one in flight).
    train(model, optimizer, 1)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    step4 = threading.Thread(target=snaps.after_step, args=(4, model, optimizer, lambda: {"step": 4}))
    step4.start()
    assert entered.wait(60)
    assert not first.done() and persisted == [] and snaps.seq == 1  # step 4 not staged: it is waiting
    release.set()
    step4.join(60)
    assert not step4.is_alive()
    # (step 4's own persist, no longer gated, may or may not have finished by now)
    assert first.done() and first.result() is True and persisted[0] == 2
    assert snaps.seq == 2 and len(snaps.blocked_s) == 2
    assert snaps._pending is not first and snaps._pending_step == 4
    # A kill at step 5 settles step 4's snapshot first; then only step 4's file is left.
    snaps.settle_before(5)
    assert snaps._pending is None and persisted == [2, 4]
    assert sorted(p.name for p in snaps.holder.iterdir()) == [file_name(4, 0, "own")]

    fresh = Model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    again = MemorySnapshots(cfg, layout={"world_size": 1})
    label, state = again.restore(fresh, fresh_opt)
    assert label == "memory snapshot step-00000004" and state == {"step": 4}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    snaps.close()


def test_restore_waits_for_the_persist_in_flight(tmp_path, cache_dir, monkeypatch):
    # The anomaly rollback restores in the same process: a persist still running must finish first
    # (its collectives share the snapshot group; its files are what restore lists).
    cfg, model, optimizer, snaps, _ = setup(tmp_path, cache_dir)
    release, entered, persisted = gated_persist(snaps, monkeypatch)
    train(model, optimizer, 2)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    snaps.after_step(2, model, optimizer, lambda: {"step": 2})
    train(model, optimizer, 1)  # the step that goes wrong
    result = []
    rollback = threading.Thread(target=lambda: result.append(snaps.restore(model, optimizer)))
    rollback.start()
    assert entered.wait(60)
    assert persisted == [] and result == []
    release.set()
    rollback.join(60)
    assert not rollback.is_alive() and persisted == [2]
    label, state = result[0]
    assert label == "memory snapshot step-00000002" and state == {"step": 2}
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    snaps.close()


def test_kill_drills_settle_earlier_snapshots_first(tmp_path):
    settled, killed = [], []
    injector = FaultInjector(["kill:rank=0,step=3"], rank=0, run_dir=tmp_path)
    injector.provide(settle_snapshots=settled.append)
    import apogee.resilience.faults as faults

    real_kill = faults.os.kill
    faults.os.kill = lambda pid, sig: killed.append(sig)
    try:
        injector("after_step", 2)
        assert settled == [] and killed == []
        injector("after_step", 3)
    finally:
        faults.os.kill = real_kill
    assert settled == [3] and len(killed) == 1
