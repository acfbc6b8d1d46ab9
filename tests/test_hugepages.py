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


@pytest.mark.skipif(not hugepages.wanted() and "GLIBC_TUNABLES" not in os.environ,
                    reason="not Linux/glibc with transparent huge pages")
def test_reexec_sets_the_tunable_once():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    script = ("import sys; from jaxser import hugepages; "
              "hugepages.reexec(['-c', " + repr(PRINT_TUNABLES) + "]); print('not replaced')")
    assert _run(script, env) == hugepages.TUNABLE


def test_users_tunables_are_left_alone():
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    script = "from jaxser import hugepages; hugepages.reexec(['-c', 'print(1)']); print('kept')"
    assert _run(script, env) == "kept"


def test_main_with_argv_does_not_reexec(monkeypatch):
    from jaxser import cli

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("re-executed"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
