"""Two JAX processes on this machine (2 CPU devices each) train together through the real
CLI, are preempted (SIGTERM to one of them stops both at the same step, with a
checkpoint), resume, and end where one process with four devices ends."""

from __future__ import annotations

import signal

import jax
import numpy as np
import pytest
from _worker import (
    Run,
    compile_cache,
    free_port,
    latest_params,
    load_cfg,
    loss_curve,
    subprocess_env,
    train_args,
    train_metrics,
    wait_for,
)

from jaxser.train import loop

STEPS = 6


def _start_pair(workdir, data_dir, env, log_dir, name) -> list[Run]:
    port = free_port()
    return [Run(train_args(workdir, data_dir, f"--config.train.max_steps={STEPS}",
                           "--config.mesh.data=-1", "--config.train.checkpoint_every=1000",
                           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                           "--process-id", str(i)),
                env, log_dir, f"{name}{i}") for i in range(2)]


def _finish(runs: list[Run]) -> list[dict]:
    try:
        codes = [run.wait(timeout=600) for run in runs]
    finally:
        for run in runs:
            run.kill()
    for run, code in zip(runs, codes, strict=True):
        assert code == 0, run.stderr()[-4000:]
    return [run.summary() for run in runs]


@pytest.mark.slow
def test_two_processes_preempt_resume_and_match_one_process(data_dir, tmp_path,
                                                           tmp_path_factory):
    assert jax.device_count() == 8
    reference = tmp_path / "reference"  # One process, four of this process' devices.
    loop.train(load_cfg(reference, data_dir, f"--config.train.max_steps={STEPS}",
                        "--config.mesh.data=4"))

    workdir = tmp_path / "two"
    cache = compile_cache(tmp_path_factory)
    runs = _start_pair(workdir, data_dir, subprocess_env(cache, devices=2, step_sleep=1.0),
                       tmp_path / "logs", "first")
    try:
        wait_for(lambda: len(train_metrics(workdir)) >= 2, runs[0], what="two steps")
    except BaseException:
        for run in runs:
            run.kill()
        raise
    runs[1].signal(signal.SIGTERM)  # Preempt one process: both must stop together.
    first = _finish(runs)
    stopped = first[0]["step"]
    assert all(s == {"step": stopped, "stopped": "preempted", "best": s["best"]}
               for s in first), first
    assert 2 <= stopped < STEPS
    assert "process(es)" in runs[0].stderr() and " 2 process(es)" in runs[0].stderr()

    second = _finish(_start_pair(workdir, data_dir, subprocess_env(cache, devices=2),
                                 tmp_path / "logs", "second"))
    assert all(s["step"] == STEPS and s["stopped"] == "finished" for s in second), second
    for i in range(2):
        text = (tmp_path / "logs" / f"second{i}.err").read_text()
        assert f"resumed from step {stopped}" in text, text[-3000:]

    curve, expected = loss_curve(workdir), loss_curve(reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([curve[s] for s in sorted(curve)],
                               [expected[s] for s in sorted(expected)], rtol=2e-4)
    step, params = latest_params(workdir)
    ref_step, ref_params = latest_params(reference)
    assert step == ref_step == STEPS
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, ref_params)
