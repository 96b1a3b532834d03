"""Which pytest run executes each end-to-end script test.

The guides, examples and benchmark smoke runs are Python scripts that call
the same `keras_moe` code on every backend, and each costs tens of seconds
(mostly compilation). The layers and models they use are tested on all
three backends by the unit tests, so each script runs in one backend's
pytest run only, chosen to spread the cost over the three runs.
`KERAS_MOE_SCRIPT_BACKENDS=tensorflow,jax,torch` runs every script test in
every run listed. Script tests are `slow`: `make test-fast` leaves them out.
"""

import os

import pytest

SCRIPT_BACKENDS_VARIABLE = "KERAS_MOE_SCRIPT_BACKENDS"


def script_backends(default):
    """The backends whose pytest runs execute a script test."""
    names = os.environ.get(SCRIPT_BACKENDS_VARIABLE)
    if not names:
        return {default}
    return {name.strip() for name in names.split(",") if name.strip()}


def runs_on(default):
    """A `slow` mark: a script test, run in the `default` backend's run.

    `tests/conftest.py` skips the test in the other backends' runs.

    Args:
        default: the backend ("tensorflow", "jax" or "torch") whose pytest
            run executes the test unless `KERAS_MOE_SCRIPT_BACKENDS` names
            others.
    """
    return pytest.mark.slow(script_backends=sorted(script_backends(default)))
