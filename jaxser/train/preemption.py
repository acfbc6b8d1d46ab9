"""SIGTERM (preemption) as a stop decision that every process takes at the same step."""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


def preemption_service() -> bool:
    """True when JAX's distributed preemption sync manager is running (multi-process)."""
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - private module moved
        return False
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class StopSignal:
    """Turns SIGTERM (preemption) into a decision all processes take at the same step.

    One process: a Python handler sets a flag the loop reads after each step. Several
    processes: JAX's preemption sync manager (installed by jax.distributed.initialize)
    catches SIGTERM on any process and `reached_preemption_sync_point` turns true on
    every process at the same step; without it, the flag is all-gathered every step.
    """

    def __init__(self):
        self.received = False
        self._old = None
        self._installed = False
        self._sync = preemption_service()

    def __enter__(self):
        if not self._sync:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handle(self, *_):
        self.received = True

    def should_stop(self, step: int) -> bool:
        """Called by every process after every step; true at the agreed stop step."""
        if self._sync:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = True
        elif jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self.received))
            self.received = bool(np.max(flags))
        return self.received

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)
