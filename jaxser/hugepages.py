"""Back large host allocations with transparent huge pages (Linux, glibc).

XLA:CPU allocates every step's temporaries afresh and glibc returns buffers above 32 MiB
to the kernel on free, so each step page-faults all of its working set again, 4 KiB at a
time: for a hubert-base step on 4 x 30 s that is 4.2 million faults and ~20% of the step's
wall time (docs/benchmarks.md). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask
for transparent huge pages (2 MiB), which cuts the faults ~70x. Tunables are read when a
process starts, so the program re-executes itself once with the tunable set; a
`GLIBC_TUNABLES` already in the environment (the user's choice) is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

TUNABLE = "glibc.malloc.hugetlb=1"


def wanted() -> bool:
    """Whether re-executing would change anything: Linux, glibc, THP available, not set."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def reexec(argv: Sequence[str]) -> None:
    """Replaces this process with `python argv...` under the tunable, when `wanted()`.

    Call it first thing in a program's entry point, before any thread starts; it returns
    only when nothing needs doing.
    """
    if not wanted():
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


@contextlib.contextmanager
def for_children() -> Iterator[None]:
    """Processes started inside this block get the tunable (when `wanted()`); this process
    keeps its own malloc (tunables are read at start). For benchmarks that run jaxser in a
    child process next to PyTorch in this one."""
    if not wanted():
        yield
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLE
    try:
        yield
    finally:
        del os.environ["GLIBC_TUNABLES"]
