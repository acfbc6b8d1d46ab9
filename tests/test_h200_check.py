"""bench/h200_check.py (issue 20): its import path works without tensorflow, librosa,
soundfile and ml_collections (absent on the GPU machine), and its --smoke mode runs end
to end on CPU and prints the one JSON line with every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow", "librosa", "soundfile", "ml_collections")
IMPORT_PATH = ("jaxser.models.ser_model", "jaxser.models.attention", "jaxser.train.step",
               "jaxser.train.optimizer", "jaxser.accelerator", "bench.h200_check")

# Imported at start-up by every Python process whose PYTHONPATH has its folder first (the
# check's children included): the blocked packages behave as if not installed.
_SITECUSTOMIZE = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # import raises ImportError; find_spec says absent
"""


def _env(tmp_path: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    paths = [str(ROOT)]
    if tmp_path is not None:
        site = tmp_path / "blocker"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_the_import_path_does_not_load_the_missing_packages():
    """Even where they are installed, the model/step path and the script import none."""
    code = (f"import importlib, sys, json\nfor m in {IMPORT_PATH!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(n for n in {BLOCKED!r} if n in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), check=True,
                         capture_output=True, text=True, timeout=300).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_the_import_path_works_with_the_packages_blocked(tmp_path):
    code = ("import importlib\n"
            "try:\n    import tensorflow\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('blocker inactive')\n"
            f"for m in {IMPORT_PATH!r}: importlib.import_module(m)\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.slow  # about a minute: runs the whole script on CPU
def test_smoke_runs_end_to_end_on_cpu_without_the_missing_packages(tmp_path):
    out_file = tmp_path / "h200.json"
    proc = subprocess.run([sys.executable, "bench/h200_check.py", "--smoke", "--out",
                           str(out_file)], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out_file.read_text()) == line
    assert line["errors"] == [] and line["skipped"] == [], (line["errors"], proc.stderr[-3000:])
    assert line["device"]["backend"] == "cpu" and line["matmul_bf16_tflops"] > 0
    att = line["attention"]
    assert att["ok"] and set(att["xla"]) == {"out", "dq", "dk", "dv"}
    assert line["bf16_vs_f32"]["ok"] and line["bf16_vs_f32"]["abs_diff"] <= 1e-2
    for name in ("whisper-large-v3", "hubert-large"):
        speed = line["speed"][name]
        assert speed["jaxser_step_s"] > 0 and speed["torch_step_s"] > 0
        assert speed["flops_per_step"] > 0 and speed["throughput_ratio"] > 0
        assert "mfu_vs_989" in speed and "mfu_vs_measured_matmul" in speed
    memory = line["memory"]["whisper-large-v3"]
    assert memory["remat_on"]["gib_per_utterance"] > 0 and "remat_off" in memory
    assert set(line["goals"]) >= {"attention_ok", "bf16_loss_within_1e-2",
                                  "whisper_mfu_ge_0.45", "whisper_ratio_ge_1.5",
                                  "hubert_ratio_ge_1.3"}
