"""bench/ops.py (per-piece timings, jaxser against PyTorch) and the machine fields that
every benchmark's JSON carries (bench/common.py), on tiny shapes: structure, not speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common, ops  # noqa: E402

# Tiny encoders (both frameworks build from the same overrides): seconds, not minutes.
WHISPER_TINY = ["--model", "whisper-tiny", "--batch", "1", "--seconds", "0.5",
                "--override", "encoder_layers=1", "--override", "d_model=64",
                "--override", "encoder_attention_heads=2", "--override", "encoder_ffn_dim=128"]
HUBERT_TINY = ["--model", "hubert-base", "--batch", "1", "--seconds", "0.5",
               "--override", "num_hidden_layers=1", "--override", "hidden_size=64",
               "--override", "num_attention_heads=2", "--override", "intermediate_size=128",
               "--override", "conv_dim=(32,32,32,32,32,32,32)",
               "--override", "num_conv_pos_embeddings=16",
               "--override", "num_conv_pos_embedding_groups=4"]
QUICK = ["--reps", "1", "--warmup", "0", "--steps", "1"]

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 \
avx512_fp16 amx_bf16 amx_tile amx_int8 hypervisor

processor\t: 1
vendor_id\t: GenuineIntel
"""


def check_machine(machine: dict) -> None:
    for key in ("cpu_vendor", "cpu_model_name", "cpu_family", "cpu_model", "isa", "cores",
                "summary", "jax", "torch", "load_average"):
        assert key in machine, key
    assert set(machine["isa"]) == {"avx2", "avx512", "amx", "flags"}
    assert isinstance(machine["isa"]["avx2"], bool)
    assert machine["cpu_model_name"] in machine["summary"]


def test_cpu_info_reads_vendor_model_and_isa(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE_RAPIDS)
    info = common.cpu_info(str(path))
    assert info["cpu_vendor"] == "GenuineIntel"
    assert info["cpu_model_name"].startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert (info["cpu_family"], info["cpu_model"]) == (6, 143)
    assert info["microarchitecture"] == "Sapphire Rapids"
    assert info["hypervisor"]
    assert info["isa"]["avx2"]
    assert info["isa"]["avx512"] == ["avx512f", "avx512dq", "avx512bw", "avx512vl",
                                     "avx512_bf16", "avx512_fp16"]
    assert info["isa"]["amx"] == ["amx_tile", "amx_bf16", "amx_int8"]
    line = common.describe_cpu({**info, "cores": 2})
    assert "AMX (tile, bf16, int8)" in line and "Sapphire Rapids" in line


def test_this_machine_is_described():
    check_machine(common.machine(with_torch=False))


@pytest.mark.slow
def test_ops_whisper_children_every_piece_and_the_sum_check():
    """The default path: each framework in its own child process, then the table (two
    interpreter starts with jax and torch: ~30 s on 2 idle cores)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ops.py"), *WHISPER_TINY,
                           *QUICK], capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    check_machine(result["machine"])
    assert [row["piece"] for row in result["pieces"]] == list(ops.WHISPER_PIECES)
    for row in result["pieces"]:
        assert row["jaxser"]["median"] > 0 and row["torch"]["median"] > 0, row
        assert row["ratio"] is not None and row["count"] >= 1  # warm-up 0: jaxser compiles
    assert {r["piece"]: r["count"] for r in result["pieces"]}["layer_norm"] == 2  # 2 x 1 layer
    for fw in ("jaxser", "torch"):
        check = result["sum_check"][fw]
        assert check["step_s"] > 0 and check["pieces_s"] > 0
        assert check["gap"] == pytest.approx(check["pieces_s"] / check["step_s"] - 1, abs=2e-3)
        assert check["cpu_step_s"] > 0 and check["cpu_gap"] is not None
    assert "| **whole step (train_step.py)** |" in proc.stdout
    assert "| **sum of pieces x count** |" in proc.stdout


@pytest.mark.slow  # runs a benchmark end to end
def test_ops_hubert_same_process_every_piece(capsys):
    result = ops.main([*HUBERT_TINY, *QUICK, "--same-process", "--no-step"])
    check_machine(result["machine"])
    assert [row["piece"] for row in result["pieces"]] == list(ops.HUBERT_PIECES)
    assert result["shapes"]["embed"] == 64 and result["shapes"]["layers"] == 1
    for row in result["pieces"]:
        assert row["jaxser"]["median"] > 0 and row["torch"]["median"] > 0, row
    assert result["sum_check"]["jaxser"]["step_s"] is None  # --no-step
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "hubert-base"


def test_ops_rejects_unknown_pieces():
    with pytest.raises(SystemExit, match="unknown pieces"):
        ops.main([*WHISPER_TINY, *QUICK, "--same-process", "--pieces", "conv_stem,nope"])


@pytest.mark.slow  # runs a benchmark end to end
def test_train_step_json_names_the_machine():
    from bench import train_step

    result = train_step.main([*WHISPER_TINY[:6], *WHISPER_TINY[6:], "--steps", "1",
                              "--same-process"])
    check_machine(result["machine"])
    assert result["overrides"]["d_model"] == 64
    assert result["jaxser_step_s"] > 0 and result["torch_step_s"] > 0


@pytest.mark.slow  # runs a benchmark end to end
def test_augment_cost_json_names_the_machine():
    from bench import augment_cost

    result = augment_cost.main(["--batch", "1", "--seconds", "0.5", "--runs", "1"])
    check_machine(result["machine"])
