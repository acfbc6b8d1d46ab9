"""Helpers of the engine and reliability tests, and the entry of their subprocesses.

`python tests/_worker.py train --config ...` runs `jaxser.cli.main` with test hooks taken
from the environment:

    JAXSER_TEST_STEP_SLEEP=S    sleep S seconds before each training batch, so a signal
                                lands in the middle of a run
    JAXSER_TEST_HANG_SAVE=N     the save of checkpoints/latest/N hangs just before Orbax
                                renames its temporary folder (a save in flight forever);
                                JAXSER_TEST_MARKER names a file written when it hangs

The helpers build one tiny prepared dataset per test session and start such runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/demo.py:smoke"
# A fast smoke run: one crop length (one compiled train step), small eval batches,
# evaluation only at the end, a constant learning rate (runs of any length agree).
FAST = ("--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
        "--config.data.buckets_seconds=(1.0,)", "--config.data.max_seconds=1.0",
        "--config.data.eval_batch=8", "--config.train.eval_every=1000",
        "--config.train.log_every=1", "--config.mesh.data=1")

_CACHE: dict[str, Path] = {}


def prepared_data(tmp_path_factory) -> Path:
    """A tiny prepared dataset (20 train / 5 validation / 5 test), built once a session."""
    if "data" not in _CACHE:
        from jaxser.data import prepare, synthetic

        root = tmp_path_factory.mktemp("engine_data")
        manifest = synthetic.generate_corpus(root / "corpus", num_speakers=6,
                                             utterances_per_speaker=5, seed=1)
        prepare.prepare([manifest], root / "data", split="speaker:60/20/20", workers=0,
                        progress=False)
        _CACHE["data"] = root / "data"
    return _CACHE["data"]


def compile_cache(tmp_path_factory) -> Path:
    """A persistent XLA cache shared by the session's subprocesses (compiles once)."""
    if "cache" not in _CACHE:
        _CACHE["cache"] = tmp_path_factory.mktemp("jax_cache")
    return _CACHE["cache"]


def train_args(workdir, data_dir, *extra: str) -> list[str]:
    """`--config...` overrides of a fast smoke run in workdir on data_dir."""
    return [f"--config.workdir={workdir}", f"--config.data.dir={data_dir}", *FAST, *extra]


def load_cfg(workdir, data_dir, *extra: str):
    from jaxser import config as config_lib

    return config_lib.load_config(CONFIG, train_args(workdir, data_dir, *extra))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(cache: Path | None = None, devices: int | None = None, **hooks) -> dict:
    """The environment of a worker: CPU, the XLA cache, optional device count and hooks."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    for name, value in hooks.items():
        env[f"JAXSER_TEST_{name.upper()}"] = str(value)
    return env


class Run:
    """A `jaxser train` subprocess (through this file's hooks) with its output in files."""

    def __init__(self, args: list[str], env: dict, log_dir: Path, name: str = "run"):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "train", "--config", CONFIG, *args],
            cwd=REPO, env=env, stdout=self._out, stderr=self._err)
        self.pid = self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"timed out after {timeout} s:\n{self.stderr()}") from None
        finally:
            self._out.close()
            self._err.close()
        return rc

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait()

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def summary(self) -> dict:
        """The JSON summary line `jaxser train` prints at the end."""
        lines = [ln for ln in self.stdout().splitlines() if ln.startswith("{")]
        assert lines, f"no summary printed:\n{self.stderr()[-3000:]}"
        return json.loads(lines[-1])


def wait_for(predicate, run: Run | None = None, timeout: float = 600, what: str = "") -> None:
    """Polls predicate() until true; fails early when the run exits first."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"the run exited ({run.proc.returncode}) before {what}:\n"
                                 f"{run.stderr()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def train_metrics(workdir) -> list[dict]:
    """The train rows of metrics.jsonl (a replayed step appears again)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row.get("split") == "train":
            rows.append(row)
    return rows


def loss_curve(workdir) -> dict[int, float]:
    """{step: loss} of the train rows (the last of replayed steps)."""
    return {r["step"]: r["loss"] for r in train_metrics(workdir)}


def latest_params(workdir):
    """(step, numpy params) of the latest complete checkpoint of a workdir, restored on
    one device whatever topology saved it."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from jaxser.train.checkpoint import Checkpoints

    ckpt = Checkpoints(workdir, read_only=True)
    try:
        step = ckpt.latest_step()
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              ckpt.latest.item_metadata(step)["state"])
        restored = ckpt.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
    finally:
        ckpt.close()
    return step, jax.tree.map(np.asarray, restored["state"]["params"])


def latest_step(workdir) -> int | None:
    from jaxser.train.checkpoint import Checkpoints

    ckpt = Checkpoints(workdir, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def assert_same_params(a, b) -> None:
    """Bit for bit."""
    import jax
    import numpy as np

    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------------------
# Subprocess entry


def _install_hooks() -> None:
    sleep = float(os.environ.get("JAXSER_TEST_STEP_SLEEP", "0") or 0)
    if sleep > 0:
        from jaxser.data import pipeline

        original_next = pipeline.TrainIterator.__next__

        def slow_next(self):
            time.sleep(sleep)
            return original_next(self)

        pipeline.TrainIterator.__next__ = slow_next
    hang = os.environ.get("JAXSER_TEST_HANG_SAVE")
    if hang:
        import asyncio

        from orbax.checkpoint._src.path import atomicity

        marker = os.environ.get("JAXSER_TEST_MARKER", "")
        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def hanging_finalize(self):
            final = Path(str(self.get_final()))
            if final.name == hang and final.parent.name == "latest":
                if marker:
                    Path(marker).write_text(str(self.get()))
                await asyncio.sleep(3600)
            return await original_finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = hanging_finalize


def main(argv: list[str]) -> int:
    _install_hooks()
    from jaxser import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
