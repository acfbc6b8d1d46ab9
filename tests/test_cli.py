"""The command line: help for every subcommand, clear one-line errors, fold dispatch."""

import pytest

from jaxser import cli

SUBCOMMANDS = ("generate", "manifest", "prepare", "train", "evaluate", "predict", "export",
               "demo")


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_describes_its_flags(name, capsys):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: jaxser {name}") and "--" in out


def test_config_typo_is_a_one_line_error(capsys):
    assert cli.main(["train", "--config", "configs/demo.py", "--config.optim.lrr=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown config field 'optim.lrr'" in err and "optim.lr" in err


def test_unknown_flag_outside_train_is_refused():
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--workdir", "x", "--bogus"])


def test_missing_workdir_checkpoint(tmp_path, capsys):
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "nothing")]) == 1
    assert "no checkpoints in" in capsys.readouterr().err


def test_train_folds_dispatches_to_the_fold_driver(tmp_path, capsys):
    code = cli.main(["train", "--config", "configs/demo.py:smoke", "--folds", "2",
                     "--manifest", str(tmp_path / "missing.csv"),
                     f"--config.workdir={tmp_path / 'w'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "jaxser train: error" in err and "missing.csv" in err  # The fold driver's prepare.


def test_fold_options_need_folds(capsys):
    assert cli.main(["train", "--config", "configs/demo.py:smoke", "--manifest", "m.csv"]) == 1
    assert "--manifest: fold options, they need --folds K" in capsys.readouterr().err


def test_train_help_lists_the_fold_and_multihost_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--folds", "--manifest", "--split-format",
                                        "--coordinator", "--num-processes"))


def test_train_folds_passes_prepare_options(monkeypatch, tmp_path, capsys):
    """The fold driver prepares each fold with the prepare options given (an MSP-Podcast or
    IEMOCAP k-fold needs its dimension scale and its unknown-speaker rule)."""
    from jaxser.data import prepare

    calls = []

    def fake_prepare(manifests, out, **kwargs):
        calls.append(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(prepare, "prepare", fake_prepare)
    code = cli.main(["train", "--config", "configs/demo.py:smoke", "--folds", "2",
                     "--manifest", "m.csv", "--dimension-scale", "iemocap:1-5",
                     "--unknown-speakers", "utterance", "--min-seconds", "0.5",
                     "--max-seconds", "20", f"--config.workdir={tmp_path / 'w'}"])
    assert code == 1 and "stop here" in capsys.readouterr().err
    assert {k: calls[0][k] for k in ("dimension_scale", "unknown_speakers", "min_seconds",
                                     "max_seconds", "split")} == {
        "dimension_scale": "iemocap:1-5", "unknown_speakers": "utterance", "min_seconds": 0.5,
        "max_seconds": 20.0, "split": "kfold:2:0"}
    assert cli.main(["train", "--config", "configs/demo.py:smoke",
                     "--dimension-scale", "1-7"]) == 1
    assert "--dimension-scale: fold options" in capsys.readouterr().err
