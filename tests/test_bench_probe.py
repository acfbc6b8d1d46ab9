"""bench/probe.py (frozen-encoder probing: cached features against the frozen encoder in
the loop, extraction against the forward alone) on its tiny smoke size: that it runs end to
end and its JSON line holds both comparisons and the machine; structure, not speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_probe_bench_smoke_prints_both_comparisons(tmp_path):
    out = subprocess.run([sys.executable, "bench/probe.py", "--smoke", "--repeats", "1",
                          "--work-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["folds"] == 2 and result["epochs"] == 2 and result["clips"] == 48
    assert result["cached_seconds"] > 0 and result["in_loop_seconds"] > 0
    assert result["speedup"] == pytest.approx(
        result["in_loop_seconds"] / result["cached_seconds"])
    assert 0 < result["extraction_vs_forward"] == pytest.approx(
        result["extraction_audio_s_per_s"] / result["forward_audio_s_per_s"])
    assert result["machine"]["cpu_vendor"]
    assert any("speed-up" in line for line in lines)
    assert any(line.startswith("extraction:") for line in lines)
