"""The example scripts run end to end on the current backend."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from script_backends import runs_on

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


@runs_on("tensorflow")
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


def assert_usage_error(script, args, named, capsys):
    """`script`'s parser exits with status 2 and names the bad option.

    In-process: argument parsing needs no subprocess and no training.
    """
    example = load_example(script)
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(args)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


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
    assert_usage_error("train_sparse_moe.py", args, named, capsys)


def test_train_sparse_moe_defaults():
    args = load_example("train_sparse_moe.py").parse_args([])
    assert (args.num_experts, args.top_k, args.intermediate_dim) == (8, 2, 256)


# --- compare_dense_vs_moe.py -------------------------------------------------


@runs_on("torch")
def test_compare_dense_vs_moe_runs_and_writes_its_results(tmp_path):
    result = run_example(
        "compare_dense_vs_moe.py", "--fast", f"--output-dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Backend: {keras.backend.backend()}" in result.stdout
    table = (tmp_path / "results.md").read_text()
    for variant in ("dense", "switch-8", "mixtral-8"):
        assert f"| {variant} |" in table
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for run in results:
        # Validation before training, then after every --eval-every steps.
        assert run["steps"] == [0, 2, 4]
        assert len(run["val_loss"]) == len(run["seconds"]) == 3
        assert all(math.isfinite(loss) for loss in run["val_loss"])
        assert run["seconds"] == sorted(run["seconds"])
    routed = [run for run in results if run["variant"] != "dense"]
    assert all(len(run["maxvio"]) == 2 for run in routed)
    assert (tmp_path / "dense_vs_moe.png").stat().st_size > 0


def test_compare_dense_vs_moe_models_have_equal_active_parameters():
    example = load_example("compare_dense_vs_moe.py")
    from keras_moe import presets

    args = example.parse_args([])
    assert args.variants == [
        "dense", "switch-8", "mixtral-8", "switch-32", "mixtral-32"
    ]
    counts = {
        variant: presets.count_params(example.backbone_config(variant, args))
        for variant in args.variants
    }
    dense = counts["dense"]["active"]
    for variant, count in counts.items():
        # The routers' [d, E] kernels are the only extra active weights.
        router = args.num_layers * args.hidden_dim * (
            0 if variant == "dense" else int(variant.split("-")[1])
        )
        assert count["active"] == dense + router, variant
    totals = [counts[v]["total"] for v in ("dense", "switch-8", "switch-32")]
    assert totals == sorted(totals)


def test_compare_dense_vs_moe_dense_model_matches_its_formula():
    # The dense variant builds with no MoE layer at all.
    example = load_example("compare_dense_vs_moe.py")
    args = example.parse_args(["--fast"])
    model = example.build_model("dense", args)
    from keras_moe import presets

    expected = presets.count_params(example.backbone_config("dense", args))
    assert model.count_params() == expected["total"]
    assert not any("moe" in v.path for v in model.weights)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--variants", "dense", "moe-8"], "--variants"),
        (["--variants", "mixtral-1"], "--variants"),
        (["--ffn-dim=511"], "--ffn-dim"),
        (["--steps=100", "--eval-every=30"], "--steps"),
        (["--hidden-dim=30", "--num-heads=4"], "--hidden-dim"),
    ],
)
def test_compare_dense_vs_moe_rejects_bad_arguments(args, named, capsys):
    assert_usage_error("compare_dense_vs_moe.py", args, named, capsys)


# --- soft_moe_vision.py -------------------------------------------------------


@runs_on("torch")
def test_soft_moe_vision_runs_and_reports_both_models():
    result = run_example("soft_moe_vision.py", "--fast")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    for name in ("dense", "SoftMoE"):
        match = re.search(rf"\| {name} ViT \| [\d,]+ \| (\d+\.\d+)% \|", output)
        assert match, f"no {name} row:\n{output[-3000:]}"
        assert 0 <= float(match.group(1)) <= 100


def test_soft_moe_vision_model_uses_soft_moe_in_the_last_blocks():
    example = load_example("soft_moe_vision.py")
    from keras_moe.layers import SoftMoE

    args = example.parse_args(["--num-layers=3", "--moe-layers=2"])
    model = example.vision_transformer(args, use_soft_moe=True)
    soft = [layer.name for layer in model.layers if isinstance(layer, SoftMoE)]
    assert soft == ["soft_moe_1", "soft_moe_2"]
    dense = example.vision_transformer(args, use_soft_moe=False)
    assert not any(isinstance(layer, SoftMoE) for layer in dense.layers)
    images = np.zeros((2, 8, 8), "float32")
    assert tuple(model(images).shape) == (2, 10)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--patch-size=3"], "--patch-size"),
        (["--num-layers=2", "--moe-layers=3"], "--moe-layers"),
        (["--hidden-dim=30", "--num-heads=4"], "--hidden-dim"),
        (["--epochs=0"], "--epochs"),
    ],
)
def test_soft_moe_vision_rejects_bad_arguments(args, named, capsys):
    assert_usage_error("soft_moe_vision.py", args, named, capsys)


@pytest.mark.parametrize(
    "script", ["compare_dense_vs_moe.py", "soft_moe_vision.py"]
)
def test_new_examples_have_help(script, capsys):
    example = load_example(script)
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--fast" in capsys.readouterr().out


# --- train_lm.py (`make demo`): its ending shows what training did ----------


@runs_on("torch")
def test_train_lm_ends_with_samples_side_by_side_and_a_baseline(tmp_path):
    result = run_example("train_lm.py", "--fast", f"--output-dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    ending = output[output.index("before and after training"):]
    assert re.search(r"before training\s+\| after 2 steps", ending), ending
    losses = {
        label: float(value)
        for label, value in re.findall(
            r"^  (before training|bytes-unigram baseline|after 2 steps):\s+(\d+\.\d+)",
            ending,
            re.MULTILINE,
        )
    }
    assert set(losses) == {"before training", "bytes-unigram baseline", "after 2 steps"}
    # Byte frequencies beat a uniform guess over the 259 tokens by far.
    assert 1.0 < losses["bytes-unigram baseline"] < math.log(259) - 1
    assert "Bytes-unigram baseline on the validation text" in output
    # The command for a longer run: `--fast` left out, four times the epochs.
    assert f"python examples/train_lm.py --output-dir={tmp_path} --epochs 24" in ending


def test_train_lm_unigram_baseline_is_the_byte_entropy():
    example = load_example("train_lm.py")
    # Training labels: 'a' and 'b' alike, and one end token per sequence.
    counts = example.unigram_counts(["abab" * 25] * 4, 101, 259, 257)
    assert counts[97] == counts[98] == 200 and counts[257] == 4
    assert counts.sum() == 404
    labels = np.array([[97, 98, 97, 98]])
    loss = example.unigram_loss(counts, labels, np.ones((1, 4)))
    assert loss == pytest.approx(-math.log(201 / (404 + 259)))
    # Weights as Keras reduces them: zero weights still count in the mean.
    half = example.unigram_loss(counts, labels, np.array([[1, 1, 0, 0]]))
    assert half == pytest.approx(loss / 2)


def test_train_lm_side_by_side_and_longer_run_command():
    example = load_example("train_lm.py")
    text = example.side_by_side(
        "def a\n\tb\x01\u68b4", "def " + "x" * 12, width=8,
        titles=("before", "after"),
    )
    assert text.splitlines() == [
        "  before   | after",
        "  -------- | --------",
        "  def a    | def xxxx",
        "      b··  | xxxxxxxx",
    ]
    command = example.longer_run_command(
        ["--fast", "--epochs", "3", "--preset", "switch_decoder_small", "--epochs=5",
         "--time-budget", "60"],
        24,
    )
    assert command == (
        "python examples/train_lm.py --preset switch_decoder_small --epochs 24"
    )
