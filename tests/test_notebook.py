"""notebooks/evaluate.ipynb runs headless on a tiny trained workdir (so it cannot rot)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from jaxser import config as config_lib
from jaxser.data import prepare, synthetic
from jaxser.train import loop

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "evaluate.ipynb"
CONFIG = REPO / "configs" / "demo.py"


def tiny_workdir(tmp_path_factory) -> Path:
    """ROOT with corpus/, data/ and train/ (a 2-step frame_logits model); built once."""
    root = tmp_path_factory.getbasetemp() / "jaxser_tiny_workdir"
    if not (root / "DONE").exists():
        shutil.rmtree(root, ignore_errors=True)
        manifest = synthetic.generate_corpus(root / "corpus", num_speakers=6,
                                             utterances_per_speaker=4, seed=1)
        prepare.prepare([manifest], root / "data", split="speaker:60/20/20", workers=0,
                        progress=False)
        loop.train(config_lib.load_config(f"{CONFIG}:smoke", [
            f"--config.workdir={root / 'train'}", f"--config.data.dir={root / 'data'}",
            "--config.train.max_steps=2", "--config.train.eval_every=2",
            "--config.data.num_buckets=1", "--config.model.pooling=frame_logits"]))
        (root / "DONE").write_text("ok")
    return root


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_notebook_runs(tmp_path_factory, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    root = tiny_workdir(tmp_path_factory)
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
