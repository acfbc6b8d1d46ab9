"""Small input files the data tests write (tests/test_prepare.py, tests/test_dimensions.py)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> Path:
    """A CSV of `rows` with a header of every key, in first-seen order (missing: empty)."""
    header = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path
