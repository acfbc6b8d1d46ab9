"""notebooks/evaluate.ipynb runs headless on a tiny trained workdir (so it cannot rot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "evaluate.ipynb"




def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_notebook_runs(tiny_workdir, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    root = tiny_workdir
    # A `python3` kernel spec that runs this interpreter (the venv), whatever else is
    # installed on the machine.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxser test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAXSER_WORKDIR", str(root / "train"))
    monkeypatch.setenv("JAXSER_LONG_SECONDS", "8")
    monkeypatch.setenv("JAXSER_WINDOW", "2")
    monkeypatch.setenv("JAXSER_HOP", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "gender=" in text and "KL " in text and "windows; the top class" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # 5 evaluation plots + the emotion-over-time plot.
    assert (root / "train" / "eval" / "long_utterance_timeline.png").exists()
