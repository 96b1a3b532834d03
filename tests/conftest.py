"""Test-run settings shared by every test file.

- `slow` marks the end-to-end runs (scripts, subprocesses, several
  processes); `make test-fast` deselects them with `-m "not slow"`.
- A script test (`slow(script_backends=[...])`, from
  `script_backends.runs_on`) runs only in the pytest runs of those backends.
"""

import keras
import pytest

from script_backends import SCRIPT_BACKENDS_VARIABLE


def pytest_runtest_setup(item):
    for mark in item.iter_markers("slow"):
        backends = mark.kwargs.get("script_backends")
        if backends and keras.backend.backend() not in backends:
            pytest.skip(
                f"script test: runs in the {backends} pytest run "
                f"({SCRIPT_BACKENDS_VARIABLE}=tensorflow,jax,torch runs it in all)"
            )
