"""Hostile inputs: extreme router logits, all-equal logits, an expert that
gets no tokens and a one-token batch give finite outputs and gradients;
NaN/Inf inputs raise a clear error when `keras_moe.config.check_numerics`
is on; saved configs never execute code; a truncated or corrupted weights
file fails naming itself and leaves the model as it was."""

import json
import re
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_moe import config as moe_config
from keras_moe import presets
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from testing import ROUTED_LAYER_CASES
from testing import assert_finite_outputs_and_gradients
from testing import backend_independent
from testing import tiny_preset
from testing import to_numpy

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "keras_moe"
HIDDEN_DIM = 8


def _router_kernels(layer):
    if isinstance(layer, SoftMoE):
        return [layer.slot_kernel]
    return [w for w in layer.router.trainable_weights]


NO_TOKEN_CASES = ("softmax_capacity", "sigmoid_groups_bias", "shared", "hierarchical")


@pytest.mark.parametrize("name", sorted(ROUTED_LAYER_CASES))
def test_extreme_router_logits_give_finite_outputs_and_gradients(name):
    rng = np.random.default_rng(0)
    layer = ROUTED_LAYER_CASES[name]()
    x = np.abs(rng.normal(size=(2, 6, HIDDEN_DIM))).astype("float32") + 0.1
    layer.build(x.shape)

    # Logits of the order of 1e4 (SoftMoE: its logit scale).
    for kernel in _router_kernels(layer):
        kernel.assign(rng.normal(size=kernel.shape).astype("float32") * 3e3)
    if isinstance(layer, SoftMoE):
        layer.scale.assign(1e4)
    assert_finite_outputs_and_gradients(layer, x)

    # All logits equal: every expert ties.
    for kernel in _router_kernels(layer):
        kernel.assign(np.zeros(kernel.shape, "float32"))
    if isinstance(layer, SoftMoE):
        layer.scale.assign(1.0)
    assert_finite_outputs_and_gradients(layer, x)

    # Token choice: an expert that no token chooses. Positive tokens and a
    # strongly negative router column keep expert 0 out of every choice.
    if name in NO_TOKEN_CASES:
        for kernel in _router_kernels(layer):
            value = rng.normal(scale=0.1, size=kernel.shape).astype("float32")
            value[..., 0] = -50.0
            kernel.assign(value)
        if hasattr(layer.router, "expert_bias"):
            layer.router.expert_bias.assign(np.zeros(4, "float32"))
        assert_finite_outputs_and_gradients(layer, x)
        routing = layer.router(x.reshape(-1, HIDDEN_DIM))
        assert 0 not in to_numpy(routing.expert_ids)

    # One token, alone in its batch.
    assert_finite_outputs_and_gradients(layer, x[:1, :1])


# Hostile inputs: NaN and Inf.


@pytest.fixture
def numerics_checked():
    previous = moe_config.check_numerics(True)
    yield
    moe_config.check_numerics(previous)


def test_numerics_are_not_checked_by_default():
    assert not moe_config.is_checking_numerics()
    x = np.ones((1, 3, HIDDEN_DIM), "float32")
    x[0, 1, 2] = np.nan
    outputs = to_numpy(SparseMoE(4, 4, capacity_factor=None)(x))
    assert np.isnan(outputs[0, 1]).any()


# `SharedExpertMoE` and `HierarchicalMoE` share `SparseMoE`'s check.
@pytest.mark.parametrize("name", ["softmax_capacity", "soft"])
def test_nan_and_inf_inputs_raise_a_clear_error(name, numerics_checked):
    layer = ROUTED_LAYER_CASES[name]()
    x = np.random.default_rng(4).normal(size=(2, 5, HIDDEN_DIM)).astype("float32")
    layer(x)
    for bad in (np.nan, np.inf, -np.inf):
        hostile = x.copy()
        hostile[1, 3, 2] = bad
        hostile[1, 4, 0] = bad
        with pytest.raises(ValueError) as error:
            layer(hostile)
        message = str(error.value)
        assert f"layer {layer.name!r} received 2 non-finite values" in message
        assert "index (1, 3, 2)" in message
        assert "check_numerics" in message
        # Padding may hold anything.
        mask = np.ones((2, 5), bool)
        mask[1, 3:] = False
        assert np.isfinite(to_numpy(layer(hostile, mask=mask))).all()


@backend_independent
def test_check_numerics_accepts_only_booleans():
    with pytest.raises(ValueError, match="`enabled` must be True or False"):
        moe_config.check_numerics("yes")


# Hostile inputs: files that try to run code.


def _marker_lambda(marker):
    return keras.saving.serialize_keras_object(
        lambda x: (open(marker, "w").close(), x)[1]
    )


def _inject_activation(config, payload):
    """Put `payload` wherever a serialized config names an activation."""
    if isinstance(config, dict):
        for key in list(config):
            if key in ("activation", "ffn_activation") and isinstance(config[key], str):
                config[key] = payload
            else:
                _inject_activation(config[key], payload)
    elif isinstance(config, list):
        for item in config:
            _inject_activation(item, payload)


@backend_independent
@pytest.mark.parametrize("payload_kind", ["lambda", "module"])
def test_saved_configs_never_execute_code(payload_kind, tmp_path):
    marker = tmp_path / "code_ran"
    if payload_kind == "lambda":
        payload = _marker_lambda(str(marker))
    else:  # An object from outside Keras, built from the file's arguments.
        payload = {"module": "pathlib", "class_name": "Path",
                   "config": {"args": [str(marker)]}, "registered_name": None}
    model = tiny_preset()

    preset_dir = tmp_path / "preset"
    model.save_to_preset(str(preset_dir))
    for json_file in preset_dir.glob("*.json"):  # config.json and task.json
        config = json.loads(json_file.read_text())
        _inject_activation(config, payload)
        json_file.write_text(json.dumps(config))
    with pytest.raises(Exception):
        presets.load(preset_dir, preprocessor=None)

    keras_path = tmp_path / "model.keras"
    model.save(keras_path)
    hostile_path = tmp_path / "hostile.keras"
    with zipfile.ZipFile(keras_path) as source, zipfile.ZipFile(hostile_path, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                saved = json.loads(data)
                _inject_activation(saved, payload)
                data = json.dumps(saved).encode()
            target.writestr(item, data)
    with pytest.raises(Exception):
        keras.saving.load_model(hostile_path, safe_mode=True)
    assert not marker.exists()


# Calls that can run code from a file, and where they would come from.
UNSAFE_CALLS = [
    (r"\bimport\s+pickle\b|\bpickle\.loads?\(", "pickle"),
    (r"\btorch\.load\(", "torch.load"),
    (r"allow_pickle\s*=\s*True", "allow_pickle=True"),
    (r"safe_mode\s*=\s*False", "safe_mode=False"),
    (r"enable_unsafe_deserialization", "enable_unsafe_deserialization"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
    (r"\bmarshal\.", "marshal"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
]


@backend_independent
def test_package_has_no_code_paths_that_execute_files():
    for source_file in sorted(PACKAGE_DIR.rglob("*.py")):
        text = source_file.read_text()
        for pattern, what in UNSAFE_CALLS:
            assert not re.search(pattern, text), f"{what} in {source_file}"


# Hostile inputs: damaged weights files.


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    model = tiny_preset()
    model.save_to_preset(str(directory / "preset"))
    data = (directory / "preset" / "model.weights.h5").read_bytes()
    truncated = directory / "truncated.weights.h5"
    truncated.write_bytes(data[: len(data) // 2])
    corrupted = directory / "corrupted.weights.h5"
    damaged = bytearray(data)
    start = len(data) // 3
    damaged[start : start + 4096] = b"\xab" * 4096
    corrupted.write_bytes(bytes(damaged))
    return directory, truncated, corrupted


@backend_independent
@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_weights_file_is_named_and_the_model_left_untouched(saved_weights, damage):
    directory, truncated, corrupted = saved_weights
    path = truncated if damage == "truncated" else corrupted
    model = tiny_preset(seed=5)  # other weights than the saved ones
    before = {w.path: to_numpy(w) for w in model.weights}
    # Truncated: h5py cannot open it (OSError). Corrupted: it opens, but
    # objects inside do not load (ValueError).
    expected = OSError if damage == "truncated" else ValueError
    with pytest.raises(expected, match=re.escape(path.name)) as error:
        model.load_weights(path)
    assert "left as they were" in str(error.value)
    for weight in model.weights:
        np.testing.assert_array_equal(to_numpy(weight), before[weight.path], err_msg=weight.path)
    # The same file in a preset directory.
    preset_dir = directory / f"{damage}_preset"
    if not preset_dir.exists():
        shutil.copytree(directory / "preset", preset_dir)
        shutil.copy(path, preset_dir / "model.weights.h5")
    with pytest.raises(expected, match="model.weights.h5"):
        presets.load(preset_dir, preprocessor=None)
