"""Workdir guards: fail at start, not hours later, when it cannot be used."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax

from jaxser.errors import JaxserError

log = logging.getLogger(__name__)


class WorkdirError(JaxserError):
    """The workdir is unwritable, full, or in use by another job."""


def check_writable(workdir: Path, min_free_bytes: int = 50_000_000) -> None:
    """Creates the workdir and proves a file can be written and there is room."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_") as f:
            f.write(b"jaxser")
            f.flush()
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e}") from e
    check_free_space(workdir, min_free_bytes)


def check_free_space(workdir: Path, needed_bytes: int, what: str = "") -> None:
    """Raises WorkdirError when the workdir's file system has less than `needed_bytes` free."""
    try:
        st = os.statvfs(workdir)
    except OSError as e:
        raise WorkdirError(f"cannot stat workdir {workdir}: {e}") from e
    free = st.f_bavail * st.f_frsize
    if free < needed_bytes:
        need = f" ({what})" if what else ""
        raise WorkdirError(f"workdir {workdir} has only {free / 1e6:.1f} MB free, it needs "
                           f"{needed_bytes / 1e6:.1f} MB{need}; free some space or use "
                           "another workdir")


@contextlib.contextmanager
def lock(workdir: Path) -> Iterator[None]:
    """An exclusive lock on WORKDIR/.lock (process 0 of a job): a second job refuses."""
    if jax.process_index() != 0:
        yield
        return
    path = workdir / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise WorkdirError(f"workdir {workdir} is in use by another job "
                               f"(pid {f.read().strip() or '?'}); refusing to start") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
