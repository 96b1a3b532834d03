"""Resuming after the training process is killed mid-epoch.

`keras.callbacks.BackupAndRestore` backs up at every epoch end; a process
killed (SIGKILL) in the middle of an epoch restarts from the last backup and
redoes that epoch. The resumed run must end with the same weights, optimizer
state (Adam moments, step count), balancing bias and losses as a run that
was never interrupted. The resumed run is a fresh Python process, as after
a real preemption.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

HELPER = Path(__file__).resolve().parent / "resume_training.py"

pytestmark = [
    pytest.mark.slow,  # training runs in subprocesses
    pytest.mark.skipif(
        keras.backend.backend() not in ("tensorflow", "jax"),
        reason="resuming is tested on TensorFlow and JAX",
    ),
]


def start(backup_dir, output, *extra):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(backup_dir), str(output), *map(str, extra)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process):
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def load(path):
    with np.load(path) as arrays:
        history = json.loads(str(arrays["history"]))
        state = {key: arrays[key] for key in arrays.files if key != "history"}
    return state, history


def test_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    # One process trains the uninterrupted run, then dies in the middle of
    # the second epoch of the same run started afresh.
    killed = start(
        tmp_path / "backup_b", tmp_path / "b.npz", "--kill-at", "1", "0",
        "--uninterrupted-first", tmp_path / "backup_a", tmp_path / "a.npz",
    )
    code, output = finish(killed)
    assert code == -signal.SIGKILL, output
    assert (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()
    # The backup of epoch 0 is what the restart finds.
    backup = json.loads((tmp_path / "backup_b" / "training_metadata.json").read_text())
    assert backup["epoch"] == 1

    code, output = finish(start(tmp_path / "backup_b", tmp_path / "b.npz"))
    assert code == 0, output

    expected_state, expected = load(tmp_path / "a.npz")
    state, history = load(tmp_path / "b.npz")
    assert expected["epochs"] == [0, 1]
    assert history["epochs"] == [1]  # epoch 0 was not trained again
    assert sorted(state) == sorted(expected_state)
    for key, value in expected_state.items():
        np.testing.assert_allclose(state[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    # The optimizer counted every step exactly once.
    assert int(state["optimizer_0"]) == int(expected_state["optimizer_0"]) == 4
    for name, values in expected["history"].items():
        np.testing.assert_allclose(
            history["history"][name], values[1:], rtol=1e-6, err_msg=name
        )
    # The backup is removed once training completes.
    assert not (tmp_path / "backup_b").exists()
