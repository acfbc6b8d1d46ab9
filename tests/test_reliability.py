"""What a training run guarantees when things go wrong (issue 12, and resume of issue 8).

Real `jaxser train` subprocesses are stopped with SIGTERM, killed with SIGKILL at random
points and during a checkpoint save, and resumed: the final parameters are bit for bit
those of an uninterrupted run. Damaged data, NaN, config mistakes, a changed model, an
unusable workdir, a second job and bad `predict` inputs each fail with a message naming
the problem, before any step where possible.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _worker import (
    CONFIG,
    Run,
    assert_same_params,
    compile_cache,
    latest_params,
    latest_step,
    load_cfg,
    subprocess_env,
    train_args,
    train_metrics,
    wait_for,
)

from jaxser import cli
from jaxser import workdir as workdir_lib
from jaxser.data import pipeline, records, shards
from jaxser.train import loop, resume

STEPS = 6  # Two epochs of the tiny dataset.


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return compile_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted in-process run of STEPS steps: (workdir, final params)."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = loop.train(load_cfg(workdir, data_dir, f"--config.train.max_steps={STEPS}"))
    assert summary == {"step": STEPS, "stopped": "finished", "best": summary["best"]}
    step, params = latest_params(workdir)
    assert step == STEPS
    return workdir, params


def _resume_in_process(workdir, data_dir, *extra: str) -> dict:
    """Runs the same command again (in this process) to the end."""
    summary = loop.train(load_cfg(workdir, data_dir, f"--config.train.max_steps={STEPS}",
                                  *extra))
    assert summary["step"] == STEPS and summary["stopped"] == "finished"
    return latest_params(workdir)[1]


def _resumed_from(workdir) -> list[int]:
    text = (Path(workdir) / "train.log").read_text()
    return [int(line.split("resumed from step ")[1].split()[0])
            for line in text.splitlines()
            if "resumed from step" in line and str(workdir) in line]


# --------------------------------------------------------------------------------------
# Preemption, kills, a kill during a save


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_and_a_second_job_refuses(data_dir, cache, reference,
                                                            tmp_path, capsys):
    workdir = tmp_path / "w"
    run = Run(train_args(workdir, data_dir, f"--config.train.max_steps={STEPS}",
                         "--config.train.checkpoint_every=1000"),
              subprocess_env(cache, step_sleep=1.0), tmp_path / "logs")
    try:
        wait_for(lambda: len(train_metrics(workdir)) >= 1, run, what="the first step")
        # A second job on the same workdir refuses at once, naming the first one.
        capsys.readouterr()
        rc = cli.main(["train", "--config", CONFIG,
                       *train_args(workdir, data_dir, "--config.train.max_steps=1")])
        err = capsys.readouterr().err
        assert rc == 1
        assert "in use by another job" in err and f"pid {run.pid}" in err, err
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr()[-3000:]
    finally:
        run.kill()
    summary = run.summary()
    stopped = summary["step"]
    assert summary["stopped"] == "preempted" and 1 <= stopped < STEPS, summary
    assert f"stopped at step {stopped} of {STEPS} and saved a checkpoint" in run.stderr()
    assert latest_step(workdir) == stopped
    assert_same_params(_resume_in_process(workdir, data_dir), reference[1])
    assert _resumed_from(workdir) == [stopped]


def test_kill_during_a_save_never_picks_the_half_written_checkpoint(data_dir, cache,
                                                                    reference, tmp_path):
    """Killed while the latest checkpoint of step 4 is being written (after the best
    checkpoint of step 4 was complete): resumes from step 2, replays steps 3-6 (the stale
    best checkpoint of step 4 is dropped) and ends bit-identical."""
    workdir, marker = tmp_path / "w", tmp_path / "hanging"
    every = ("--config.train.checkpoint_every=2", "--config.train.eval_every=4")
    run = Run(train_args(workdir, data_dir, f"--config.train.max_steps={STEPS}", *every),
              subprocess_env(cache, hang_save=4, marker=marker), tmp_path / "logs")
    try:
        wait_for(marker.exists, run, what="the save of step 4")
    finally:
        run.kill()
    latest = workdir / "checkpoints" / "latest"
    leftovers = [p.name for p in latest.iterdir() if p.name.startswith("4.")]
    assert leftovers and "tmp" in leftovers[0], sorted(p.name for p in latest.iterdir())
    assert latest_step(workdir) == 2  # The complete one before.
    assert (workdir / "checkpoints" / "best" / "4").is_dir()
    params = _resume_in_process(workdir, data_dir, *every)
    assert _resumed_from(workdir) == [2]
    assert "dropped best checkpoint(s) [4]" in (workdir / "train.log").read_text()
    assert not [p for p in latest.iterdir() if "tmp" in p.name]  # Cleaned up.
    assert_same_params(params, reference[1])


@pytest.mark.slow
def test_repeated_kills_at_random_points_end_bit_identical(data_dir, cache, reference,
                                                           tmp_path):
    seed = int(os.environ.get("JAXSER_TEST_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    workdir = tmp_path / "w"
    steps_seen = []
    for round_ in range(2):
        before = len(train_metrics(workdir))
        target = rng.randint(1, STEPS - 3)
        run = Run(train_args(workdir, data_dir, f"--config.train.max_steps={STEPS}",
                             "--config.train.checkpoint_every=1"),
                  subprocess_env(cache, step_sleep=0.3), tmp_path / "logs", f"run{round_}")
        try:  # Until `target` more steps are logged (or the run ends), then a bit more.
            wait_for(lambda n=before, t=target, r=run: (len(train_metrics(workdir)) - n >= t
                                                        or r.proc.poll() is not None),
                     what=f"{target} steps (seed {seed})")
            time.sleep(rng.uniform(0, 0.4))
        finally:
            run.kill()
        steps_seen.append(latest_step(workdir))
    params = _resume_in_process(workdir, data_dir)
    try:
        assert_same_params(params, reference[1])
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, checkpoints {steps_seen}: {e}") from None
    assert _resumed_from(workdir), f"seed {seed}: never resumed ({steps_seen})"


# --------------------------------------------------------------------------------------
# NaN


def test_nan_stops_naming_the_step_and_resumes_from_the_last_good_checkpoint(
        data_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "w"
    original = pipeline.train_iterator

    class Poisoned:
        """The real iterator, with NaN audio in the batch of step 3."""

        def __init__(self, *args, **kwargs):
            self.it = original(*args, **kwargs)

        epoch = property(lambda self: self.it.epoch)

        def state(self):
            return self.it.state()

        def close(self):
            self.it.close()

        def __next__(self):
            batch = next(self.it)
            if self.it.epoch * self.it.steps_per_epoch + self.it.step == 3:
                batch["audio"] = np.full_like(batch["audio"], np.nan)
            return batch

    monkeypatch.setattr(pipeline, "train_iterator", Poisoned)
    cfg = load_cfg(workdir, data_dir, "--config.train.max_steps=4",
                   "--config.train.checkpoint_every=2")
    with pytest.raises(loop.NonFiniteLoss, match=r"at step 3\b.*last good checkpoint \(step 2\)"):
        loop.train(cfg)
    assert latest_step(workdir) == 2
    assert max(r["step"] for r in train_metrics(workdir)) == 2  # Nothing logged after.
    monkeypatch.setattr(pipeline, "train_iterator", original)
    assert loop.train(cfg)["step"] == 4
    assert _resumed_from(workdir) == [2]
    step, params = latest_params(workdir)
    assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------
# Damaged shards


def _copy_data(data_dir, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


def _train_shard(data) -> Path:
    return Path(shards.split_files(data, "train")[0])


@pytest.mark.parametrize("damage", ["truncated", "truncated_no_index", "record_missing"])
def test_truncated_shard_fails_at_start_naming_the_file(damage, data_dir, tmp_path, capsys):
    data = _copy_data(data_dir, tmp_path)
    shard = _train_shard(data)
    index = records.load_index(data, "train")
    size = shard.stat().st_size
    if damage == "record_missing":  # Cut at a record boundary: fewer records, all intact.
        size = int(index.offset[-1]) - 12
    else:
        size -= 100
    with open(shard, "r+b") as f:
        f.truncate(size)
    if damage != "truncated":
        (data / shards.index_name("train")).unlink()
    capsys.readouterr()
    rc = cli.main(["train", "--config", CONFIG, *train_args(tmp_path / "w", data)])
    err = capsys.readouterr().err
    assert rc == 1
    assert shard.name in err, err
    if damage == "record_missing":
        assert "19 of 20 records" in err and "dataset.json says 20" in err, err
    assert not (tmp_path / "w" / "checkpoints" / "latest").exists() or \
        latest_step(tmp_path / "w") is None


def test_missing_records_are_skipped_only_when_asked(data_dir, tmp_path):
    """`data.skip_corrupt` (when the config has it) turns the shortfall into a warning."""
    data = _copy_data(data_dir, tmp_path)
    shard = _train_shard(data)
    with open(shard, "r+b") as f:
        f.truncate(int(records.load_index(data, "train").offset[-1]) - 12)
    (data / shards.index_name("train")).unlink()
    info = shards.load_dataset_info(data)
    with pytest.raises(records.DataError, match="19 of 20 records"):
        records.check_complete(str(data), "train", info)
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append  # The jaxser logger does not propagate to pytest's.
    logging.getLogger("jaxser").addHandler(handler)
    try:
        records.check_complete(str(data), "train", info, skip=True)
    finally:
        logging.getLogger("jaxser").removeHandler(handler)
    assert any("19 of 20 records" in r.getMessage() for r in logged)


def test_corrupt_record_stops_training_naming_the_file(data_dir, tmp_path):
    data = _copy_data(data_dir, tmp_path)
    shard = _train_shard(data)
    index = records.load_index(data, "train")
    with open(shard, "r+b") as f:  # Same size, garbage where every record's payload starts.
        for offset in index.offset.tolist():
            f.seek(offset)
            f.write(b"\xff" * 16)
    with pytest.raises(records.DataError) as err:
        loop.train(load_cfg(tmp_path / "w", data, "--config.train.max_steps=2"))
    message = str(err.value)
    assert "step 1" in message and str(shard) in message and "DataLoss" in message, message


# --------------------------------------------------------------------------------------
# Config mistakes and a changed model


def test_config_typo_and_wrong_type_fail_at_start_naming_the_field(data_dir, tmp_path, capsys):
    for bad, expected in (("--config.optim.lrr=1", ["optim.lrr", "did you mean", "optim.lr"]),
                          ("--config.train.max_steps=many", ["train.max_steps", "int"])):
        capsys.readouterr()
        rc = cli.main(["train", "--config", CONFIG, *train_args(tmp_path / "w", data_dir), bad])
        err = capsys.readouterr().err
        assert rc == 1 and all(e in err for e in expected), err
    assert not (tmp_path / "w").exists()  # Nothing was started.


def test_resume_with_another_model_fails_before_any_step(data_dir, reference, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference[0], workdir)
    rows = len(train_metrics(workdir))
    with pytest.raises(resume.ResumeMismatch,
                       match=r"model\.encoder_overrides\.d_model: checkpoint 32 vs now 64"):
        loop.train(load_cfg(workdir, data_dir, f"--config.train.max_steps={STEPS + 2}",
                            "--config.model.encoder_overrides.d_model=64"))
    with pytest.raises(resume.ResumeMismatch, match=r"optim\.freeze"):
        loop.train(load_cfg(workdir, data_dir, f"--config.train.max_steps={STEPS + 2}",
                            "--config.optim.freeze=('encoder/conv*',)"))
    assert len(train_metrics(workdir)) == rows and latest_step(workdir) == STEPS


def test_check_resume_compatible_names_fields_labels_and_shapes(data_dir, tmp_path):
    cfg = load_cfg(tmp_path, data_dir)
    saved = json.loads(json.dumps(cfg.to_dict(), default=list))
    resume.check_compatible(saved, cfg)  # Same config: fine.
    free = load_cfg(tmp_path, data_dir, "--config.model.dtype=bfloat16",
                    "--config.model.remat=True", "--config.optim.lr=0.5")
    resume.check_compatible(saved, free)  # Precision, remat, rates: free to change.
    other = load_cfg(tmp_path, data_dir, "--config.model.pooling=attentive_stats",
                     "--config.loss.center=0.1")
    with pytest.raises(resume.ResumeMismatch) as err:
        resume.check_compatible(saved, other)
    assert "model.pooling: checkpoint 'mean' vs now 'attentive_stats'" in str(err.value)
    assert "loss.center>0: checkpoint False vs now True" in str(err.value)
    with pytest.raises(resume.ResumeMismatch, match="labels: checkpoint"):
        resume.check_compatible(saved, cfg, ["a", "b"], ["b", "a"])
    shapes = {"params/head/kernel": ((32, 4), "float32")}
    with pytest.raises(resume.ResumeMismatch,
                       match=r"params/head/kernel: checkpoint float32\[32, 4\] vs now "
                             r"float32\[32, 5\]"):
        resume.check_compatible(saved, cfg, saved_shapes=shapes,
                                now_shapes={"params/head/kernel": ((32, 5), "float32")})


# --------------------------------------------------------------------------------------
# Workdir


def test_unwritable_workdir_fails_before_the_first_step(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    capsys.readouterr()
    rc = cli.main(["train", "--config", CONFIG, *train_args(blocker / "run", data_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and "is not writable" in err and str(blocker / "run") in err, err


def test_full_disk_fails_before_the_first_step(data_dir, tmp_path, monkeypatch):
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 10

    monkeypatch.setattr(workdir_lib.os, "statvfs", lambda p: Full(real(p)))
    with pytest.raises(workdir_lib.WorkdirError, match="MB free"):
        loop.train(load_cfg(tmp_path / "w", data_dir))
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_free_space_for_the_checkpoints_is_checked(data_dir, tmp_path, monkeypatch):
    """Enough for the write test but not for the model's checkpoints: fail at start."""
    calls = []
    real = os.statvfs

    class Tight:
        def __init__(self, st, free):
            self.f_frsize, self.f_bavail = 1, free

    def statvfs(path):
        calls.append(path)
        return Tight(real(path), 60_000_000 if len(calls) == 1 else 1_000)

    monkeypatch.setattr(workdir_lib.os, "statvfs", statvfs)
    with pytest.raises(workdir_lib.WorkdirError, match="checkpoints of this model"):
        loop.train(load_cfg(tmp_path / "w", data_dir))


# --------------------------------------------------------------------------------------
# predict


def test_predict_bad_inputs_get_their_own_error(data_dir, reference, tmp_path, capsys):
    workdir = reference[0]
    good = sorted((data_dir.parent / "corpus" / "wav").glob("*.wav"))[0]
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.wav"
    files = [text, good, empty, missing]
    capsys.readouterr()
    rc = cli.main(["predict", "--workdir", str(workdir), *map(str, files)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert "distribution" in rows[1] and "error" not in rows[1]
    for row in (rows[0], rows[2], rows[3]):
        assert row.get("error") and "distribution" not in row, row


def test_predict_too_long_input_gets_an_error(data_dir, reference):
    from jaxser.predict import Predictor

    wavs = sorted((data_dir.parent / "corpus" / "wav").glob("*.wav"))
    import soundfile

    lengths = [soundfile.info(str(w)).duration for w in wavs]
    longest, shortest = wavs[int(np.argmax(lengths))], wavs[int(np.argmin(lengths))]
    limit = (max(lengths) + min(lengths)) / 2
    rows = Predictor.load(reference[0]).predict_files([longest, shortest], max_seconds=limit)
    assert "error" in rows[0] and "max" in rows[0]["error"], rows[0]
    assert "distribution" in rows[1]
