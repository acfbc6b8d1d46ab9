"""`jaxser evaluate`: report JSON, tables, plots, checkpoints, cross-corpus datasets, leaks.

One tiny trained workdir (smoke config, 2 steps) serves the whole module (and is shared
with the other evaluation/prediction/export test modules of the same session).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxser import evaluate
from jaxser import report as report_lib
from jaxser.data import prepare

slow = pytest.mark.slow  # Tests that need the trained workdir.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tiny_workdir):
    return evaluate.evaluate_workdir(tiny_workdir / "train", "test")


@slow
def test_report_json(tiny_workdir, report):
    saved = json.loads((tiny_workdir / "train" / "eval" / "test.json").read_text())
    assert saved["checkpoint_step"] == report["checkpoint_step"] == 2
    info = json.loads((tiny_workdir / "data" / "dataset.json").read_text())
    assert saved["count"] == saved["metrics"]["count"] == info["splits"]["test"]["count"]
    for key in ("kl", "cosine", "chebyshev", "clark", "canberra", "intersection", "accuracy",
                "ua", "macro_f1", "micro_f1", "weighted_f1"):
        assert np.isfinite(saved["metrics"][key]) and np.isfinite(saved["prior"][key])
        assert key in saved["majority"]
    assert np.asarray(saved["metrics"]["confusion"]).sum() == saved["count"]
    assert set(saved["groups"]) == set(info["group_columns"]) == set(saved["prior_groups"])
    for column, by_value in saved["groups"].items():
        assert sum(m["count"] for m in by_value.values()) == saved["count"]
        assert saved["group_counts"][column] == {v: m["count"] for v, m in by_value.items()}
    assert saved["labels"] == info["labels"]
    assert saved["split_leak"]["speakers_overlap"] is False and saved["warnings"] == []
    assert saved["soft_labels"] is True and saved["prior_source"]


@slow
def test_predictions_jsonl(tiny_workdir, report):
    rows = [json.loads(line) for line in
            (tiny_workdir / "train" / "eval" / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["count"]
    for row in rows:
        assert abs(sum(row["prediction"].values()) - 1) < 1e-4
        assert set(row["groups"]) == set(report["groups"])
        assert row["top"] == max(row["prediction"], key=row["prediction"].get)


@slow
def test_plots_written(tiny_workdir, report):
    names = {"confusion", "recall", "baselines", "mean_distribution", "examples"}
    assert set(report["plots"]) == names
    for name, path in report["plots"].items():
        assert Path(path) == tiny_workdir / "train" / "eval" / f"test_{name}.png"
        assert Path(path).read_bytes()[:8] == PNG_MAGIC


@slow
def test_text_tables(report):
    text = evaluate.format_report(report)
    assert "checkpoint step 2" in text and "per group" in text
    assert "gender=" in text and "kl (prior)" in text
    table = evaluate.format_table(report)
    assert table.splitlines()[0].split() == ["metric", "model", "prior", "majority"]
    assert f"{report['metrics']['kl']:.4f}" in table
    assert "corpus=" in evaluate.format_group_table(report)


@slow
def test_checkpoint_choice(tiny_workdir):
    latest = evaluate.evaluate_workdir(tiny_workdir / "train", "validation", "latest", plots=False)
    by_step = evaluate.evaluate_workdir(tiny_workdir / "train", "validation", "2", plots=False)
    assert latest["checkpoint_step"] == by_step["checkpoint_step"] == 2
    assert latest["metrics"]["kl"] == pytest.approx(by_step["metrics"]["kl"], abs=1e-9)
    with pytest.raises(ValueError, match="checkpoint must be"):
        evaluate.evaluate_workdir(tiny_workdir / "train", "test", "newest")
    with pytest.raises(FileNotFoundError):
        evaluate.evaluate_workdir(tiny_workdir / "train", "test", "7")
    with pytest.raises(ValueError, match="split 'dev' not in"):
        evaluate.evaluate_workdir(tiny_workdir / "train", "dev")


@slow
def test_other_dataset_same_labels_other_order(tiny_workdir, report, tmp_path):
    """A dataset prepared with a taxonomy listing the same classes in another order."""
    labels = report["labels"]
    taxonomy = tmp_path / "reversed.json"
    taxonomy.write_text(json.dumps({"name": "reversed", "classes": labels[::-1]}))
    other = tmp_path / "data_reversed"
    prepare.prepare([tiny_workdir / "corpus" / "manifest.csv"], other, taxonomy=str(taxonomy),
                    split="speaker:60/20/20", workers=0, progress=False)
    assert json.loads((other / "dataset.json").read_text())["labels"] == labels[::-1]
    cross = evaluate.evaluate_workdir(tiny_workdir / "train", "test", data_dir=str(other))
    assert cross["cross_corpus"] and cross["data_dir"] == str(other)
    eval_dir = tiny_workdir / "train" / "eval"
    saved = json.loads((eval_dir / "data_reversed" / "test.json").read_text())
    assert saved["data_dir"] == str(other) and Path(saved["plots"]["confusion"]).exists()
    in_domain = json.loads((eval_dir / "test.json").read_text())
    assert in_domain["data_dir"] == str(tiny_workdir / "data")  # The in-domain report is kept.
    assert cross["labels"] == labels
    for key in ("kl", "cosine", "accuracy", "ua"):
        assert cross["metrics"][key] == pytest.approx(report["metrics"][key], abs=1e-6)
        assert cross["prior"][key] == pytest.approx(report["prior"][key], abs=1e-6)


@slow
def test_other_dataset_different_labels_is_an_error(tiny_workdir, tmp_path):
    other = tmp_path / "data_basic"
    prepare.prepare([tiny_workdir / "corpus" / "manifest.csv"], other, taxonomy="basic",
                    split="speaker:60/20/20", workers=0, progress=False)
    with pytest.raises(ValueError, match="labels differ from the model's"):
        evaluate.evaluate_workdir(tiny_workdir / "train", "test", data_dir=str(other))


@slow
def test_speaker_overlap_is_reported(tiny_workdir, tmp_path, caplog):
    leaky = tmp_path / "leaky"
    shutil.copytree(tiny_workdir / "data", leaky)
    info = json.loads((leaky / "dataset.json").read_text())
    speaker = info["splits"]["test"]["speakers"][0]
    info["speaker_overlap"] = {"pairs": {"train/test": [speaker]}, "allowed": True}
    (leaky / "dataset.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="jaxser"):
        logger = __import__("logging").getLogger("jaxser")
        logger.addHandler(caplog.handler)
        try:
            leak = evaluate.evaluate_workdir(tiny_workdir / "train", "test", data_dir=str(leaky),
                                             plots=False)
        finally:
            logger.removeHandler(caplog.handler)
    assert leak["split_leak"] == {"speakers_overlap": True, "allowed": True,
                                  "pairs": {"train/test": [speaker]},
                                  "involves_split": ["train/test"]}
    assert "share speakers" in leak["warnings"][0]
    assert "share speakers" in caplog.text
    assert "WARNING: the dataset's splits share speakers" in evaluate.format_report(leak)


def test_report_helpers(tmp_path):
    confusion = [[2, 1, 0], [0, 0, 0], [0, 1, 3]]
    norm = report_lib.normalised_confusion(confusion)
    np.testing.assert_allclose(norm[0], [2 / 3, 1 / 3, 0])
    assert np.isnan(norm[1]).all()
    labels = ["a", "b", "c"]
    rows = [{"id": f"u{i}", "prediction": dict(zip(labels, [0.5, 0.3, 0.2], strict=True)),
             "target": dict(zip(labels, np.eye(3)[i % 3], strict=True))} for i in range(7)]
    assert not report_lib.is_soft(rows)
    rows[0]["target"] = {"a": 0.6, "b": 0.4, "c": 0.0}
    assert report_lib.is_soft(rows)
    assert [r["id"] for r in report_lib.pick_examples(rows, 3)] == ["u0", "u3", "u6"]
    timeline = [{"start": s, "end": s + 2.0, "distribution": {"a": 0.2, "b": 0.5, "c": 0.3}}
                for s in (0.0, 1.0, 2.0)]
    fig = report_lib.timeline_figure(timeline, labels, [(0.0, 2.5, {"a": 1.0}),
                                                        (2.5, 4.0, {"c": 1.0})])
    path = report_lib.save(fig, tmp_path / "t.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    for figure in (report_lib.confusion_figure(confusion, labels),
                   report_lib.recall_figure(confusion, labels),
                   report_lib.mean_distribution_figure(rows, labels),
                   report_lib.examples_figure(rows, labels, 2)):
        assert report_lib.save(figure, tmp_path / "f.png").stat().st_size > 1000
    table = report_lib.overall_table({"metrics": {"kl": 0.5, "ua": float("nan")},
                                      "prior": {"kl": -0.0}, "majority": {}})
    assert table.splitlines()[2].split() == ["kl", "0.5000", "0.0000", "-"]
    assert table.splitlines()[3].split() == ["ua", "-", "-", "-"]
