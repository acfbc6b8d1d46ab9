"""Readable logs and metric files: `train.log`, `metrics.jsonl` and TensorBoard events.

Only process 0 writes; every process logs warnings and errors to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)

# The package's root logger: every module logs to `logging.getLogger(__name__)`, a child
# of it, so its handlers (set by `setup_logging`) receive every jaxser message.
PACKAGE_LOGGER = "jaxser"


def setup_logging(workdir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Configures the "jaxser" logger: stderr and, on process 0, WORKDIR/train.log."""
    root = logging.getLogger(PACKAGE_LOGGER)
    root.setLevel(level)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    if workdir is not None and jax.process_index() == 0:
        path = str((Path(workdir) / "train.log").absolute())
        for old in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            if old.baseFilename != path:  # One run's log never gets another run's lines.
                root.removeHandler(old)
                old.close()
        if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
            file_handler = logging.FileHandler(path)
            file_handler.setFormatter(fmt)
            root.addHandler(file_handler)


class MetricWriter:
    """Scalars to WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tensorboard)."""

    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        self.path = Path(workdir) / "metrics.jsonl"
        try:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(str(Path(workdir) / "tensorboard"))
            self._tf = tf
        except ImportError:  # pragma: no cover - tensorflow is a dependency
            self._tb = None

    def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()
                 if np.ndim(v) == 0 and isinstance(np.asarray(v).item(), int | float)}
        record = {"step": int(step), "split": prefix, "time": time.time(), **clean}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            with self._tb.as_default():
                for k, v in clean.items():
                    self._tf.summary.scalar(f"{prefix}/{k}", v, step=int(step))
            self._tb.flush()
