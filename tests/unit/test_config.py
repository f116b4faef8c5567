import pytest

from apogee.config import ConfigError, load_config, parse_overrides, validate


def error(overrides, world_size=None, config=None):
    with pytest.raises(ConfigError) as exc:
        cfg = load_config(config, overrides)
        validate(cfg, world_size)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "train.lr=0.01", "parallel.tp=2", "run.dir=/tmp/x", "train.compile=true"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 0.01
    assert cfg.train.compile is True
    assert cfg.run.path.as_posix() == "/tmp/x"
    assert validate(cfg, 4).dp_shard == 2  # -1 fills the world


def test_presets_load():
    for name in ("debug", "shakespeare-char", "llama-1b"):
        load_config(name, ["data.path=pyproject.toml"])


def test_unknown_key_names_the_key():
    assert "train.stepz" in error(["train.stepz=3"])


def test_unknown_section():
    assert "[trian]" in error(["trian.steps=3"])


def test_wrong_type_names_the_key():
    assert "train.steps must be an integer" in error(["train.steps=abc"])
    assert "train.compile must be true or false" in error(["train.compile=maybe"])


def test_world_size_must_equal_product_of_degrees():
    msg = error(["parallel.dp_shard=2", "parallel.tp=2"], world_size=8)
    assert "world size is 8" in msg and "--nproc 4" in msg


def test_heads_not_divisible_by_tp():
    assert "parallel.tp=3" in error(["parallel.tp=3", "parallel.dp_shard=1"], world_size=3)


def test_batch_not_divisible_by_micro_batch_times_dp():
    msg = error(["train.global_batch=10", "train.micro_batch=4", "parallel.dp_shard=2", "parallel.tp=1"], world_size=2)
    assert "train.global_batch=10" in msg and "train.micro_batch=4" in msg


def test_missing_data_path():
    assert "data.path" in error(["data.source=text"])
    assert "does not exist" in error(["data.source=text", "data.path=/nonexistent/corpus.txt"])


def test_unknown_flavor_and_missing_config_file():
    assert "model.flavor" in error(["model.flavor=gpt5"])
    assert "not found" in error([], config="no-such-preset")


def test_seq_len_beyond_context():
    assert "train.seq_len" in error(["train.seq_len=100000"])


def test_set_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["steps"])
    assert parse_overrides(["a.b=[1, 2]", "a.c=x y"]) == {"a": {"b": [1, 2], "c": "x y"}}


def test_round_trip_through_written_toml(tmp_path):
    from apogee.config import write_config

    cfg = load_config(None, ["train.steps=5", "model.flavor=tiny"])
    write_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_process_group_backend_carries_cpu_tensors_under_cpu_offload():
    import torch

    from apogee.train.trainer import process_group_backend

    assert process_group_backend(torch.device("cpu"), cpu_offload=False) == "gloo"
    assert process_group_backend(torch.device("cpu"), cpu_offload=True) == "gloo"
    assert process_group_backend(torch.device("cuda", 0), cpu_offload=False) == "nccl"
    # Offloaded gradients are CPU tensors: their norm's all-reduce and the tied-embedding sum go over gloo.
    assert process_group_backend(torch.device("cuda", 0), cpu_offload=True) == "cuda:nccl,cpu:gloo"


def test_checkpoint_interval_minus_one_never_saves(tmp_path, cache_dir):
    # Benchmarks of multi-GB models skip the write at the end; -2 is a typo, not a setting.
    from helpers import tiny_config

    from apogee.train.trainer import Trainer

    with pytest.raises(ConfigError, match="checkpoint.interval"):
        tiny_config(tmp_path / "bad", cache_dir, checkpoint={"interval": -2})
    result = Trainer(tiny_config(tmp_path / "run", cache_dir, steps=3, checkpoint={"interval": -1})).fit()
    assert result.step == 3 and result.checkpoint is None
    assert not any((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_cpu_offload_alone_on_one_rank_or_beside_a_data_axis():
    assert validate(load_config(None, {"parallel": {"dp_shard": 1, "tp": 1, "cpu_offload": True}}), 1).dp == 1
    assert "cpu_offload with tp or pp" in error({"parallel": {"dp_shard": 1, "tp": 2, "cpu_offload": True}}, 2)
    assert validate(load_config(None, {"parallel": {"dp_shard": 2, "tp": 2, "cpu_offload": True}}), 4).tp == 2
