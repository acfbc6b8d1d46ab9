"""A plain `pip install` of the wheel runs `jaxser demo --fast` in an empty folder: the package
carries everything the demo reads (its config, the taxonomies), nothing comes from the
source tree.

The wheel is built from a copy of the package, so the source tree gets no build/ folder.
The new virtualenv sees the test environment's packages through a path file (no downloads;
`--system-site-packages` alone would show the interpreter's, not this virtualenv's), and
since a path file's own path files are not run, the editable install of jaxser stays out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("wheel_src")
    shutil.copytree(REPO / "jaxser", src / "jaxser",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", dist, src], cwd=src)
    (path,) = dist.glob("jaxser-*.whl")
    return path


def test_wheel_holds_the_packaged_configs_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"jaxser/configs/demo.py", "jaxser/configs/common.py", "jaxser/cli.py"} <= names
    assert any(n.startswith("jaxser/data/taxonomies/") and n.endswith(".json") for n in names)
    assert not any(n.startswith(("configs/", "tests/")) for n in names)


def test_installed_wheel_runs_the_demo(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path).stdout.strip())
    (site / "test_env_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", wheel], cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([python, "-c", "import jaxser.configs.demo as d; print(d.__file__)"],
                 cwd=empty, env=env).stdout.strip()
    assert Path(where).is_relative_to(site), where  # The wheel's copy, not the source tree.

    proc = _run([venv / "bin" / "jaxser", "demo", "--fast"], cwd=empty, env=env, timeout=900)
    assert "model KL" in proc.stdout
    assert (empty / "runs" / "demo" / "train" / "eval" / "test.json").is_file()
