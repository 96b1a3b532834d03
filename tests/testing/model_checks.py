"""`run_backbone_test` and `run_preset_test`: the checks every backbone
configuration and every preset passes."""

import json

import keras
import numpy as np

from keras_moe import presets
from keras_moe.models import MoEBackbone

from .arrays import assert_same_weights
from .arrays import to_numpy
from .builders import tiny_preset
from .builders import token_batch
from .saving import reload_keras_file
from .saving import reload_preset


def run_backbone_test(
    init_kwargs, input_data, *, expected_output_shape=None, mixed_precision=True,
    tmp_path=None,
):
    """Build and call a `MoEBackbone`, round-trip its config through JSON and
    the model through a safe `.keras` file; check mixed precision.

    - The outputs have `expected_output_shape` (default `[batch, length,
      hidden_dim]`) and are finite.
    - `from_config(json(get_config()))` gives the same config, and every
      constructor argument is saved as given.
    - The reloaded `.keras` model gives the same outputs bit for bit.
    - Under `mixed_bfloat16` the outputs are bfloat16 and the weights
      float32.

    Args:
        init_kwargs: `MoEBackbone` arguments.
        input_data: `{"token_ids", "padding_mask"}` numpy arrays.
        expected_output_shape: default `(*token_ids.shape, hidden_dim)`.
        mixed_precision: whether to run the mixed-precision check.
        tmp_path: directory for the `.keras` file (default: a temporary one).

    Returns:
        The backbone, built and called.
    """
    backbone = MoEBackbone(**init_kwargs)
    outputs = to_numpy(backbone(input_data))
    expected_shape = expected_output_shape or (
        *input_data["token_ids"].shape, init_kwargs["hidden_dim"]
    )
    assert outputs.shape == tuple(expected_shape)
    assert np.isfinite(outputs).all()

    saved = json.loads(json.dumps(backbone.get_config()))
    assert MoEBackbone.from_config(saved).get_config() == backbone.get_config()
    for key, value in init_kwargs.items():
        assert saved[key] == value, key

    restored = reload_keras_file(backbone, tmp_path, "backbone")
    assert_same_weights(backbone, restored)
    np.testing.assert_array_equal(to_numpy(restored(input_data)), outputs)

    if mixed_precision:
        mixed = MoEBackbone(**dict(init_kwargs, dtype="mixed_bfloat16"))
        mixed_outputs = mixed(input_data)
        assert keras.backend.standardize_dtype(mixed_outputs.dtype) == "bfloat16"
        assert np.isfinite(to_numpy(mixed_outputs)).all()
        for weight in mixed.weights:
            assert keras.backend.standardize_dtype(weight.dtype) == "float32", weight.path
    return backbone


def run_preset_test(name, *, tmp_path=None, input_data=None, **overrides):
    """Load preset `name` at tiny widths (`builders.tiny_preset`), train one
    step, and round-trip it through a safe `.keras` file and
    `save_to_preset` / `presets.load`.

    - One training call moves the balancing biases, present exactly when
      the preset sets `bias_update_rate`.
    - Both reloaded models hold the same weights and give the same logits
      bit for bit.

    Args:
        name: a preset name.
        tmp_path: directory for the saved files (default: a temporary one).
        input_data: `{"token_ids", "padding_mask"}` (default `token_batch()`).
        **overrides: `presets.load` overrides beyond the tiny widths.

    Returns:
        The model.
    """
    model = tiny_preset(name, **overrides)
    inputs = token_batch() if input_data is None else input_data
    model(inputs, training=True)  # one balancing step where the preset has one
    biases = [w for w in model.weights if w.path.endswith("expert_bias")]
    uses_bias = bool(presets.config(name)["moe_options"].get("bias_update_rate"))
    assert bool(biases) == uses_bias
    assert all(np.abs(to_numpy(b)).max() > 0 for b in biases)
    logits = to_numpy(model(inputs))

    restored = reload_keras_file(model, tmp_path)
    assert_same_weights(model, restored)
    np.testing.assert_array_equal(to_numpy(restored(inputs)), logits)

    reloaded = reload_preset(model, tmp_path)
    assert_same_weights(model, reloaded)
    np.testing.assert_array_equal(to_numpy(reloaded(inputs)), logits)
    return model
