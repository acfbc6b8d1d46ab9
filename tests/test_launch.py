"""launch/ scripts: they parse, the local one trains a smoke config, two processes start the way
the Slurm script starts them (explicit coordinator on 127.0.0.1, 2 CPU devices each), and the
Slurm batch step and the TPU script issue the right commands (fake srun / scontrol / gcloud)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _worker import free_port

from jaxser.data import prepare, synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch"]
SMOKE = "configs/em2ldl_hubert.py:smoke"


def _env(**extra) -> dict:
    """The test environment without the 8 forced devices of conftest (scripts set their own)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _fake(bin_dir: Path, name: str, body: str) -> None:
    """An executable `name` in bin_dir that runs `body` (bash)."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    manifest = synthetic.generate_corpus(root / "corpus", num_speakers=6,
                                         utterances_per_speaker=4, seed=2, mean_seconds=1.0,
                                         min_seconds=0.6, max_seconds=1.4)
    prepare.prepare([manifest], root / "data", split="speaker:60/20/20", workers=0,
                    progress=False)
    return root / "data"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


@pytest.mark.slow
def test_local_runs_smoke_config(data_dir, tmp_path):
    proc = subprocess.run(
        ["launch/local.sh", SMOKE, f"--config.workdir={tmp_path}", f"--config.data.dir={data_dir}",
         "--config.train.max_steps=1"],
        cwd=ROOT, env=_env(CPU_DEVICES="2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"step": 1' in proc.stdout
    log = (tmp_path / "train.log").read_text()
    assert "mesh {'data': 2" in log, log


@pytest.mark.slow
def test_two_processes_start_like_slurm(data_dir, tmp_path):
    """What each Slurm task runs: SLURM_* variables, an explicit coordinator, 2 devices each."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = _env(JAXSER_SLURM_TASK="1", SLURM_JOB_ID="4242", SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                   SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost",
                   COORDINATOR=f"127.0.0.1:{port}", CPU_DEVICES="2")
        procs.append(subprocess.Popen(
            ["bash", "launch/slurm_gpu.sbatch", SMOKE, f"--config.workdir={tmp_path}",
             f"--config.data.dir={data_dir}", "--config.train.max_steps=2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (out, _)) in enumerate(zip(procs, outs, strict=True)):
        others = "\n".join(f"--- process {i} stderr:\n{e[-2000:]}" for i, (_, e) in
                           enumerate(outs))
        assert p.returncode == 0, f"process {rank} exited {p.returncode}\n{others}"
        assert '"step": 2' in out
    log = (tmp_path / "train.log").read_text()
    assert "2 process(es)" in log and "mesh {'data': 4" in log, log


def test_slurm_batch_step_starts_one_task_each(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "srun", f'echo "$JAXSER_SLURM_TASK $*" > {tmp_path}/srun.txt')
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT))
    env.pop("JAXSER_SLURM_TASK", None)
    subprocess.run(["bash", str(ROOT / "launch/slurm_gpu.sbatch"), SMOKE, "--config.seed=3"],
                   cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "srun.txt").read_text().split() == [
        "1", "--kill-on-bad-exit=1", "bash", "launch/slurm_gpu.sbatch", SMOKE, "--config.seed=3"]


def test_slurm_task_takes_coordinator_from_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "scontrol", 'echo gpu-node-7; echo gpu-node-8')
    _fake(bin_dir, "fakepython", f'echo "$*" > {tmp_path}/cmd.txt')
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"),
               JAXSER_SLURM_TASK="1", SLURM_JOB_ID="123", SLURM_NTASKS="4", SLURM_PROCID="3",
               SLURM_JOB_NODELIST="gpu-node-[7-8]", PORT="31000")
    subprocess.run(["bash", "launch/slurm_gpu.sbatch", SMOKE], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "cmd.txt").read_text().split() == [
        "-m", "jaxser.cli", "train", "--config", SMOKE, "--coordinator", "gpu-node-7:31000",
        "--num-processes", "4", "--process-id", "3"]
    env["AUTO"] = "1"
    subprocess.run(["bash", "launch/slurm_gpu.sbatch", SMOKE], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "cmd.txt").read_text().split()[-1] == "--distributed"


def test_tpu_pod_script_commands(tmp_path):
    """With a fake gcloud: creates the missing slice, ships the code to all workers, mounts the
    bucket and starts the same `jaxser train --distributed` on every worker."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "gcloud.txt"
    _fake(bin_dir, "gcloud", f'printf "%s\\n" "$*" >> {log}\n[[ $4 == describe ]] && exit 1\n'
          "exit 0")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="ser-pod", ZONE="us-central2-b",
               WORKDIR="gs://my-bucket/runs/x", DATA="gs://my-bucket/data/y")
    subprocess.run(["bash", "launch/tpu_pod.sh", SMOKE, "--config.train.epochs=3"], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("compute tpus tpu-vm describe ser-pod --zone us-central2-b")
    assert calls[1].startswith("compute tpus tpu-vm create ser-pod") and "v4-32" in calls[1]
    assert "scp" in calls[2] and "--worker=all" in calls[2]
    assert "pip install" in calls[3] and "jax[tpu]==" in calls[3]
    assert any("gcsfuse" in c and "my-bucket" in c for c in calls[4:-1])
    last = calls[-1]
    assert "--worker=all" in last and "jaxser.cli train --distributed" in last
    assert "--config.workdir=/tmp/gcs/my-bucket/runs/x" in last
    assert "--config.data.dir=/tmp/gcs/my-bucket/data/y" in last
    assert last.rstrip().endswith("--config.train.epochs=3")
