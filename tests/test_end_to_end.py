"""A tiny run of the whole chain: generate -> prepare -> train -> resume -> evaluate ->
predict, through the same functions and CLI a user calls."""

import json

import jax
import numpy as np
import pytest

from jaxser import cli
from jaxser import config as config_lib
from jaxser.train import loop
from jaxser.train.checkpoint import Checkpoints

pytestmark = pytest.mark.slow


def _cfg(workdir, data_dir, *extra):
    return config_lib.load_config("configs/demo.py:smoke", [
        f"--config.workdir={workdir}", f"--config.data.dir={data_dir}",
        "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
        "--config.train.eval_every=2", *extra])


def _latest_params(workdir):
    ckpt = Checkpoints(workdir, read_only=True)
    step = ckpt.latest_step()
    restored = ckpt.latest.restore(step)
    ckpt.close()
    return step, jax.tree.map(np.asarray, restored["state"]["params"])


def test_train_resume_evaluate_predict(data_dir, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert loop.train(_cfg(straight, data_dir, "--config.train.max_steps=6"))["step"] == 6

    resumed = tmp_path / "resumed"
    loop.train(_cfg(resumed, data_dir, "--config.train.max_steps=4"))
    assert _latest_params(resumed)[0] == 4
    summary = loop.train(_cfg(resumed, data_dir, "--config.train.max_steps=6"))
    assert summary["step"] == 6
    assert "resumed from step 4" in (resumed / "train.log").read_text()

    step_a, params_a = _latest_params(straight)
    step_b, params_b = _latest_params(resumed)
    assert step_a == step_b == 6
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)

    assert cli.main(["evaluate", "--workdir", str(straight), "--split", "test"]) == 0
    report = json.loads((straight / "eval" / "test.json").read_text())
    for key in ("kl", "cosine", "accuracy", "ua"):
        assert np.isfinite(report["metrics"][key]) and np.isfinite(report["prior"][key])
    assert report["metrics"]["count"] == report["prior"]["count"] > 0
    lines = (straight / "eval" / "test_predictions.jsonl").read_text().splitlines()
    assert len(lines) == report["metrics"]["count"]

    wav = sorted((data_dir.parent / "corpus" / "wav").glob("*.wav"))[0]
    junk = tmp_path / "notes.wav"
    junk.write_text("not audio")
    capsys.readouterr()
    assert cli.main(["predict", "--workdir", str(straight), str(wav), str(junk)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    assert abs(sum(rows[0]["distribution"].values()) - 1) < 1e-4
    assert rows[0]["top"] in rows[0]["distribution"]
    assert "error" in rows[1] and rows[1]["file"] == str(junk)


def test_second_job_on_same_workdir_refuses(data_dir, tmp_path):
    from jaxser import workdir as workdir_lib

    with workdir_lib.lock(tmp_path):
        with pytest.raises(workdir_lib.WorkdirError, match="in use"):
            loop.train(_cfg(tmp_path, data_dir, "--config.train.max_steps=1"))
