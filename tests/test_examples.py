"""The example scripts run end to end on the current backend."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script, *args):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_train_sparse_moe_runs_and_reports_losses():
    result = run_example(
        "train_sparse_moe.py",
        "--epochs=1",
        "--steps-per-epoch=3",
        "--batch-size=8",
        "--sequence-length=32",
        "--hidden-dim=32",
        "--intermediate-dim=64",
        "--validation-sequences=8",
        "--sample-length=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert f"Backend: {keras.backend.backend()}" in output
    for label in [
        "Validation loss before training",
        "Training loss, first epoch",
        "Validation loss after training",
    ]:
        match = re.search(rf"{label}: (\d+\.\d+)", output)
        assert match, f"{label!r} not printed:\n{output[-3000:]}"
        assert math.isfinite(float(match.group(1)))
    assert "Continuation" in output


def load_example(script):
    spec = importlib.util.spec_from_file_location(
        script.removesuffix(".py"), EXAMPLES / script
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, named",
    [
        (["--top-k=9", "--num-experts=8"], "--top-k"),
        (["--hidden-dim=30", "--num-heads=4"], "--hidden-dim"),
        (["--epochs=0"], "--epochs"),
        (["--learning-rate=0"], "--learning-rate"),
    ],
)
def test_train_sparse_moe_rejects_bad_arguments(args, named, capsys):
    # In-process: argument parsing needs no subprocess and no training.
    example = load_example("train_sparse_moe.py")
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(args)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_train_sparse_moe_defaults():
    args = load_example("train_sparse_moe.py").parse_args([])
    assert (args.num_experts, args.top_k, args.intermediate_dim) == (8, 2, 256)
