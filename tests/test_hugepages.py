"""The `jaxser` program re-executes itself once with huge-page malloc; tests' main() does not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxser import hugepages

PRINT_TUNABLES = "import os; print(os.environ.get('GLIBC_TUNABLES'))"


def _run(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_reexec_replaces_the_process_with_the_tunable_set():
    # `wanted` is forced so that this runs the same on machines without THP or glibc.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    script = ("from jaxser import hugepages; hugepages.wanted = lambda: True; "
              "hugepages.reexec(['-c', " + repr(PRINT_TUNABLES) + "]); print('not replaced')")
    assert _run(script, env) == hugepages.TUNABLE


def test_users_tunables_are_left_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert not hugepages.wanted()
    script = "from jaxser import hugepages; hugepages.reexec(['-c', 'print(1)']); print('kept')"
    assert _run(script, dict(os.environ)) == "kept"


def test_main_with_argv_does_not_reexec(monkeypatch):
    from jaxser import cli

    monkeypatch.setattr(hugepages, "wanted", lambda: True)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("re-executed"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])


def test_for_children_sets_the_tunable_for_children_only(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(hugepages, "wanted", lambda: True)
    with hugepages.for_children():
        assert _run(PRINT_TUNABLES, dict(os.environ)) == hugepages.TUNABLE
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setattr(hugepages, "wanted", lambda: False)  # e.g. the user set their own
    with hugepages.for_children():
        assert "GLIBC_TUNABLES" not in os.environ
