import pytest

from apogee.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    for command in ("train", "generate", "plan", "simulate"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([command, "--help"])
        assert exc.value.code == 0
        assert "usage: apogee " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--set", "train.stepz=3"], "unknown key train.stepz"),
        (["train", "no-such-preset"], "not found"),
        (["train", "--nproc", "3", "--set", "parallel.tp=2"], "world size 3"),
        (["generate", "/nonexistent/run"], "not an apogee run directory"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err


def test_train_command_end_to_end(tmp_path, cache_dir, capsys):
    """The README's main command path on 2 ranks: trains, checkpoints, reports, samples."""
    code = main([
        "train", "--nproc", "2",
        "--set", f"run.dir={tmp_path}", "--set", "run.device=cpu", "--set", "model.flavor=tiny", "--set", "train.steps=3",
        "--set", "train.seq_len=32", "--set", "train.global_batch=4", "--set", "train.micro_batch=2",
        "--set", "data.max_bytes=300000", "--set", f"data.cache_dir={cache_dir}", "--set", "parallel.tp=2",
        "--sample-tokens", "8",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert f"run directory: {tmp_path}" in out
    assert "final step 3: train loss" in out and "val loss" in out
    assert "sample (prompt 'def '):" in out
    assert (tmp_path / "checkpoints" / "step-00000003" / ".metadata").is_file()
    assert (tmp_path / "config.toml").is_file()


def test_default_rank_count_refits_a_preset_sized_for_more_ranks(capsys):
    # `apogee train` on a 1-GPU machine: the debug preset asks tp=2 for 4 CPU ranks.
    from apogee.cli import _fit_default_world
    from apogee.config import load_config, validate

    cfg = load_config("debug", [])
    fitted = _fit_default_world(cfg, 1)
    assert validate(fitted, 1).degrees() == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}
    assert (fitted.train.global_batch, fitted.train.micro_batch) == (cfg.train.global_batch, cfg.train.micro_batch)
    assert "training as single rank" in capsys.readouterr().err
    assert _fit_default_world(cfg, 4) is cfg  # fits: unchanged, silent
    assert capsys.readouterr().err == ""


def test_more_local_ranks_than_gpus_is_one_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", "--nproc", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "4 local ranks but 1 GPU(s)" in err and "run.device=cpu" in err, err
