"""Checkpoints that cannot lie (one process): manifest, verification, fallback, retention, safe loading."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from apogee.checkpoint.dcp import (
    CheckpointError,
    Checkpointer,
    SafeFileSystemReader,
    latest_checkpoint,
    list_checkpoints,
)
from apogee.checkpoint.manifest import MANIFEST, Manifest
from apogee.config import ConfigError, load_config
from apogee.resilience.faults import parse_fault


def model_and_optim(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model(torch.randn(3, 8)).sum().backward()
    optim.step()
    return model, optim


class Events(list):
    def __call__(self, kind, **fields):
        self.append({"event": kind, **fields})


def saver(root, **kw):
    events = Events()
    return Checkpointer(root, keep=kw.pop("keep", 0), events=events, config_hash="abc", **kw), events


def test_manifest_lists_every_file_and_the_trainer_state(tmp_path):
    model, optim = model_and_optim()
    ck, _ = saver(tmp_path)
    path = ck.save(3, model, optim, {"step": 3, "sampler": {"consumed": 24, "seed": 1, "seq_len": 8}})
    manifest = Manifest.read(path)
    assert manifest.step == 3 and manifest.trainer["sampler"]["consumed"] == 24
    assert manifest.config_hash == "abc" and manifest.layout["world_size"] == 1
    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != MANIFEST}
    assert {k: v["size"] for k, v in manifest.files.items()} == on_disk and ".metadata" in on_disk
    assert (tmp_path / "latest").read_text().strip() == path.name
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage,expect", [("truncate", "truncated"), ("flip", "corrupted"), ("delete", "missing"),
                                           ("manifest", "manifest")])
def test_damage_is_detected_and_load_falls_back(tmp_path, damage, expect):
    model, optim = model_and_optim()
    ck, events = saver(tmp_path)
    good = ck.save(1, model, optim, {"step": 1})
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    optim.step()  # change the parameters before the second save
    bad = ck.save(2, model, optim, {"step": 2})
    victim = next(bad.glob("*.distcp"))
    if damage == "truncate":
        os.truncate(victim, victim.stat().st_size - 1)
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 1
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        (bad / MANIFEST).write_text("{not json")
    assert expect in ck.verify(bad)[1]
    with pytest.raises(CheckpointError, match="failed verification"):
        ck.load(bad, *model_and_optim(1))

    fresh, fresh_optim = model_and_optim(1)
    path, trainer = ck.load_latest(fresh, fresh_optim)
    assert path == good and trainer == {"step": 1}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert [e["event"] for e in events] == ["checkpoint_fallback"]
    assert events[0]["fallback"] == good.name and expect in events[0]["problem"]
    assert (tmp_path / "step-00000002.corrupt").is_dir() and latest_checkpoint(tmp_path) == good


def test_no_good_checkpoint_means_a_fresh_start(tmp_path):
    model, optim = model_and_optim()
    ck, events = saver(tmp_path)
    path = ck.save(1, model, optim, {"step": 1})
    (path / ".metadata").unlink()
    assert ck.load_latest(model, optim) is None
    assert events[0]["fallback"].startswith("a fresh start")


def test_retention_keeps_last_k_plus_every_mth(tmp_path):
    model, optim = model_and_optim()
    ck, _ = saver(tmp_path, keep=2, keep_every=4)
    for step in range(1, 10):
        ck.save(step, model, optim, {"step": step})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 9]
    assert latest_checkpoint(tmp_path).name == "step-00000009"


def test_async_save_is_a_snapshot_and_durable_after_wait(tmp_path):
    model, optim = model_and_optim()
    ck, _ = saver(tmp_path, async_save=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = ck.save(5, model, optim, {"step": 5})
    ck.wait_staged()  # the host copy is done: the trainer's optimizer step may now write the parameters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the save persists
    ck.close()
    assert (path / MANIFEST).is_file()
    fresh, fresh_optim = model_and_optim(1)
    assert ck.load(path, fresh, fresh_optim) == {"step": 5}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("reusable", [False, True])
def test_async_saves_survive_a_stager_that_closes_itself(tmp_path, monkeypatch, reusable):
    # torch 2.11 / 2.12 (pytorch/pytorch#183413): DefaultStager._stage closes its StateDictStager after
    # each save; reusing that stager fails the next save. Emulated here on any torch.
    from torch.distributed.checkpoint.staging import DefaultStager

    import apogee.checkpoint.dcp as dcp_module

    original = DefaultStager._stage

    def closing_stage(self, state_dict, **kwargs):
        staged = original(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return staged

    monkeypatch.setattr(DefaultStager, "_stage", closing_stage)
    monkeypatch.setattr(dcp_module, "STAGER_REUSABLE", reusable)
    model, optim = model_and_optim()
    ck, _ = saver(tmp_path, async_save=True)
    ck.save(1, model, optim, {"step": 1})
    ck.wait()
    if reusable:  # what a reused stager meets on those versions
        with pytest.raises(KeyError):
            ck.save(2, model, optim, {"step": 2})
            ck.wait()
        return
    for step in (2, 3):
        ck.save(step, model, optim, {"step": step})
    ck.close()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]


def test_metadata_unpickler_refuses_foreign_globals(tmp_path):
    model, optim = model_and_optim()
    ck, _ = saver(tmp_path)
    path = ck.save(1, model, optim, {"step": 1})
    SafeFileSystemReader(str(path)).read_metadata()  # a real one loads

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="does not load"):
        SafeFileSystemReader(str(path)).read_metadata()


def test_fault_specs_and_config():
    f = parse_fault("kill:rank=1,step=6")
    assert (f.kind, f.rank, f.step, f.point) == ("kill", 1, 6, "after_step")
    assert parse_fault("corrupt-checkpoint:step=3,mode=truncate").options == {"mode": "truncate"}
    for bad in ("kill:rank=1", "explode:step=1", "kill:step=x", "hang:rank=0,step=2,when=now", "nan:rank=0"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    cfg = load_config(None, {"resilience": {"inject": "kill:rank=0,step=2"}, "parallel": {"dp_shard": 1}})
    assert cfg.resilience.inject == ("kill:rank=0,step=2",)
    with pytest.raises(ConfigError, match="resilience.inject"):
        load_config(None, {"resilience": {"inject": ["kill:step=2,rank=x"]}})
    with pytest.raises(ConfigError, match="world size"):
        load_config(None, {"resilience": {"inject": ["kill:rank=9,step=2"]}, "parallel": {"dp_shard": 2}})
    with pytest.raises(ConfigError, match="max_restarts"):
        load_config(None, {"resilience": {"max_restarts": -1}})
    assert "inject" in load_config(None, ["resilience.inject=[\"hang:rank=0,step=1\"]"]).to_toml()
