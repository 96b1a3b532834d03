"""int4 expert kernels: packed 4-bit values with per-channel or group scales.

`model.quantize("int4")` packs every `Experts` and `FeedForward` kernel two
4-bit values per byte with float scales per (expert and) output channel, or
per group of input rows; the routers stay float, the model saves and
reloads in safe mode, and LoRA trains on top (QLoRA). Checked against NumPy
references written here, independent of `keras_moe`.
"""

import gc

import keras
import numpy as np
import pytest

from keras_moe.layers import Experts
from keras_moe.layers import FeedForward
from test_quantization import TINY_DEEPSEEK
from test_quantization import HIDDEN_DIM
from test_quantization import MOE_LAYERS
from test_quantization import _expert_bytes
from test_quantization import _fit_tokens
from test_quantization import _input_gradient
from test_quantization import correlation
from test_quantization import feed_forward_layers
from test_quantization import tiny_preset
from test_quantization import token_batch
from testing import reload_keras_file
from testing import reload_preset
from testing import to_numpy


@pytest.fixture(scope="module", autouse=True)
def no_garbage_collection_per_deleted_variable():
    """As in `test_quantization`: Keras' own layers collect garbage for every
    kernel they replace; when memory is freed is not checked here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gc, "collect", lambda generation=2: 0)
        yield


def numpy_pack_int4(values):
    """Reference packing: rows 2i and 2i + 1 of the input axis share a byte,
    row 2i in the low nibble (an odd last row pairs with zero)."""
    values = values.astype(np.int16)
    if values.shape[-2] % 2:
        values = np.concatenate([values, np.zeros_like(values[..., :1, :])], axis=-2)
    low, high = values[..., 0::2, :] & 0xF, values[..., 1::2, :] & 0xF
    return (low | (high << 4)).astype(np.uint8).view(np.int8)


def numpy_unpack_int4(packed, fan_in):
    nibbles = packed.view(np.uint8).astype(np.int16)
    low, high = nibbles & 0xF, nibbles >> 4
    values = np.stack([low, high], axis=-2)  # [..., bytes, 2, fan_out]
    values = values.reshape(packed.shape[:-2] + (-1, packed.shape[-1]))[..., :fan_in, :]
    return np.where(values >= 8, values - 16, values).astype(np.int8)


def numpy_quantize_int4(kernel, block_size):
    """Reference symmetric int4: `7 / max |w|` over each group of input rows
    (all of them per channel), values `round(w * scale)` in [-8, 7]."""
    size = kernel.shape[-2] if block_size is None else block_size
    values, scales = [], []
    for start in range(0, kernel.shape[-2], size):
        rows = kernel[..., start : start + size, :]
        scale = np.float32(7) / (np.abs(rows).max(axis=-2) + np.float32(1e-7))
        values.append(np.clip(np.round(rows * scale[..., None, :]), -8, 7))
        scales.append(scale)
    scale = scales[0] if block_size is None else np.stack(scales, axis=-2)
    return np.concatenate(values, axis=-2).astype(np.int8), scale


def numpy_dequantize_int4(values, scale, block_size):
    if block_size is None:
        return values / scale[..., None, :]
    return values / np.repeat(scale, block_size, axis=-2)[..., : values.shape[-2], :]


def numpy_experts(buffers, kernels, biases):
    """Gated SiLU experts on `[E, C, d]` buffers, independent of keras_moe."""
    def project(x, name):
        return np.einsum("eci,eio->eco", x, kernels[name]) + biases[name][:, None, :]

    gate = project(buffers, "gate")
    hidden = gate / (1 + np.exp(-gate)) * project(buffers, "up")
    return project(hidden, "down")


def test_int4_packing_round_trips_against_numpy():
    from keras_moe.layers.int4_projection import pack_int4
    from keras_moe.layers.int4_projection import unpack_int4

    rng = np.random.default_rng(0)
    for shape in [(3, 7, 5), (4, 6), (2, 1, 3)]:  # odd and even input axes
        values = rng.integers(-8, 8, size=shape).astype("int8")
        packed = to_numpy(pack_int4(values))
        assert packed.dtype == np.int8
        assert packed.shape == shape[:-2] + ((shape[-2] + 1) // 2, shape[-1])
        np.testing.assert_array_equal(packed, numpy_pack_int4(values))
        np.testing.assert_array_equal(to_numpy(unpack_int4(packed, shape[-2])), values)
        np.testing.assert_array_equal(numpy_unpack_int4(packed, shape[-2]), values)


@pytest.mark.parametrize("block_size", [None, 8, 6], ids=["per_channel", "g8", "g6"])
def test_int4_experts_match_a_numpy_reference(block_size):
    # fan_in 16 (gate, up) and 9 (down: odd, packed with a pad nibble); groups
    # of 6 leave a shorter last group.
    rng = np.random.default_rng(1)
    experts = Experts(3, 9, use_bias=True, bias_initializer="random_normal")
    buffers = rng.normal(size=(3, 5, HIDDEN_DIM)).astype("float32")
    float_outputs = to_numpy(experts(buffers))
    floats = {name: to_numpy(getattr(experts, f"{name}_kernel")) for name in experts.projections}
    biases = {name: to_numpy(getattr(experts, f"{name}_bias")) for name in experts.projections}
    experts.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=block_size))
    assert experts.quantization_mode == "int4"
    assert experts.dtype_policy.name == f"int4/{block_size or -1}_from_float32"
    dequantized = {}
    for name, kernel in floats.items():
        values, scale = numpy_quantize_int4(kernel, block_size)
        packed = getattr(experts, f"{name}_kernel")
        assert keras.backend.standardize_dtype(packed.dtype) == "int8"
        assert not packed.trainable
        np.testing.assert_array_equal(to_numpy(packed), numpy_pack_int4(values))
        np.testing.assert_allclose(
            to_numpy(getattr(experts, f"{name}_kernel_scale")), scale, rtol=1e-6
        )
        dequantized[name] = numpy_dequantize_int4(values.astype("float32"), scale, block_size)
        # What another path multiplies with: the same float kernel.
        np.testing.assert_allclose(
            to_numpy(experts._dequantized_kernel(name)), dequantized[name], rtol=1e-6
        )
        assert np.abs(dequantized[name] - kernel).max() <= 0.5 / scale.min() + 1e-6
    expected = numpy_experts(buffers, dequantized, biases)
    outputs = to_numpy(experts(buffers))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert correlation(outputs, float_outputs) > 0.97


@pytest.mark.parametrize("block_size", [None, 8], ids=["per_channel", "g8"])
def test_int4_input_gradients_are_those_of_the_dequantized_kernels(block_size):
    rng = np.random.default_rng(2)
    experts = Experts(4, 32, activation="gelu")
    buffers = rng.normal(size=(2, 4, 5, HIDDEN_DIM)).astype("float32")
    experts(buffers)
    experts.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=block_size))
    reference = Experts(4, 32, activation="gelu")
    reference(buffers)
    for name in experts.projections:
        getattr(reference, f"{name}_kernel").assign(experts._dequantized_kernel(name))
    np.testing.assert_allclose(
        to_numpy(experts(buffers)), to_numpy(reference(buffers)), rtol=1e-4, atol=1e-5
    )
    grad = _input_gradient(experts, buffers)
    np.testing.assert_allclose(grad, _input_gradient(reference, buffers), rtol=1e-4, atol=1e-5)


def test_int4_per_channel_kernels_can_quantize_their_inputs_too():
    rng = np.random.default_rng(3)
    buffers = rng.normal(size=(3, 6, HIDDEN_DIM)).astype("float32")
    outputs = {}
    for label, quantizer in [("w4a16", None), ("w4a8", keras.quantizers.AbsMaxQuantizer(axis=-1))]:
        keras.utils.set_random_seed(0)
        experts = Experts(3, 24)
        experts(buffers)
        experts.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(
            block_size=None, activation_quantizer=quantizer))
        assert (experts.inputs_quantizer is None) == (quantizer is None)
        outputs[label] = to_numpy(experts(buffers))
        store = {}
        experts.save_own_variables(store)
        restored = Experts(3, 24)
        restored.build(buffers.shape)
        restored.load_own_variables(store)
        np.testing.assert_array_equal(to_numpy(restored(buffers)), outputs[label])
    assert correlation(outputs["w4a8"], outputs["w4a16"]) > 0.999


def test_int4_configs_the_kernels_cannot_take_are_refused():
    experts = Experts(2, 4)
    experts.build((2, None, HIDDEN_DIM))
    with pytest.raises(ValueError, match="int4 `block_size` must be None or -1"):
        experts.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=2.5))
    wrong_axis = keras.quantizers.Int4QuantizationConfig(
        block_size=None,
        weight_quantizer=keras.quantizers.AbsMaxQuantizer(axis=0, value_range=(-8, 7)),
    )
    with pytest.raises(ValueError, match=r"must give scales of shape \(2, 1, 4\)"):
        experts.quantize("int4", config=wrong_axis)
    assert experts.quantization_mode is None  # still float, still usable
    assert keras.backend.standardize_dtype(experts.up_kernel.dtype) == "float32"
    # Scales saved for one block size do not load into another.
    experts.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=8))
    store = {}
    experts.save_own_variables(store)
    other = Experts(2, 4)
    other.build((2, None, HIDDEN_DIM))
    other.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=None))
    with pytest.raises(ValueError, match="saved ones are for block_size=8"):
        other.load_own_variables(store)
    float8 = Experts(2, 4)
    float8.build((2, None, HIDDEN_DIM))
    float8.quantize("float8")
    with pytest.raises(NotImplementedError, match="LoRA on float, int8 and int4"):
        float8.enable_lora(2)


@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_model_quantize_int4_reaches_the_experts_and_survives_saving(name, tmp_path):
    rng = np.random.default_rng(4)
    inputs = keras.Input((6, HIDDEN_DIM))
    model = keras.Model(inputs, MOE_LAYERS[name]()(inputs))
    x = rng.normal(size=(2, 6, HIDDEN_DIM)).astype("float32")
    expected = to_numpy(model(x))
    router_weights = {w.path: to_numpy(w) for w in model.weights if "experts" not in w.path}
    with pytest.warns(UserWarning, match="quantize"):  # the routers say no
        model.quantize("int4")
    quantized = feed_forward_layers(model)
    assert quantized and all(layer.quantization_mode == "int4" for layer in quantized)
    for weight in model.weights:
        if "experts" not in weight.path:
            assert keras.backend.standardize_dtype(weight.dtype) == "float32"
            np.testing.assert_array_equal(to_numpy(weight), router_weights[weight.path])
    outputs = to_numpy(model(x))
    assert correlation(outputs, expected) > 0.97
    restored = reload_keras_file(model, tmp_path)
    assert all(layer.quantization_mode == "int4" for layer in feed_forward_layers(restored))
    np.testing.assert_array_equal(to_numpy(restored(x)), outputs)


def test_standalone_int4_layer_keeps_its_block_size_in_its_config(tmp_path):
    layer = FeedForward(24, name="ffn")
    inputs = keras.Input((4, HIDDEN_DIM))
    model = keras.Model(inputs, layer(inputs))
    model.quantize(config=keras.quantizers.Int4QuantizationConfig(block_size=8))
    x = np.random.default_rng(5).normal(size=(2, 4, HIDDEN_DIM)).astype("float32")
    outputs = to_numpy(model(x))
    restored = reload_keras_file(model, tmp_path).get_layer("ffn")
    assert restored.dtype_policy.name == "int4/8_from_float32"
    assert tuple(restored.up_kernel_scale.shape) == (2, 24)  # 16 rows, groups of 8
    np.testing.assert_array_equal(to_numpy(restored(x)), outputs)


def test_int4_preset_saves_and_loads(tmp_path):
    # The int8 fixture's widths, quantized to int4 instead.
    model = tiny_preset("deepseek_small", **TINY_DEEPSEEK)
    inputs = token_batch(vocabulary_size=64)
    with pytest.warns(UserWarning):
        model.quantize("int4")
    assert {layer.name: layer.quantization_mode for layer in feed_forward_layers(model)} == {
        "experts": "int4", "shared_experts": "int4", "feedforward": "int4"
    }
    routers = [w for w in model.weights if "/router/" in w.path]
    assert routers and all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in routers)
    logits = to_numpy(model(inputs))
    reloaded = reload_preset(model, tmp_path)
    np.testing.assert_array_equal(to_numpy(reloaded(inputs)), logits)
    restored = reload_keras_file(model, tmp_path)
    np.testing.assert_array_equal(to_numpy(restored(inputs)), logits)


# The recipe that keeps untrained presets' logits within 0.98: the routed
# experts (most of the memory) in int4, everything else in weight-only int8.
INT4_ROUTED_EXPERTS = (
    {"mode": "int4", "filters": lambda layer: isinstance(layer, Experts)},
    {
        "config": keras.quantizers.Int8QuantizationConfig(activation_quantizer=None),
        "filters": lambda layer: not isinstance(layer, Experts),
    },
)


@pytest.mark.parametrize("name", ["mixtral_small", "deepseek_small"])
def test_int4_preset_logits_correlate_and_expert_memory_falls_7x(name):
    """One MoE layer at the preset's own widths: the routed experts in
    Keras' default int4 (groups of 128 input rows, a float32 scale per
    group and output channel), the other layers in weight-only int8.

    Quantizing every layer to int4 (Keras' int4 for the attention, and the
    dense and shared feed-forward blocks too) measures 0.87-0.98 on these
    untrained presets, whose near-tied routing flips (BENCHMARKS.md).
    """
    model = tiny_preset(name, num_layers=2 if name == "deepseek_small" else 1)
    inputs = token_batch(batch=4, length=16)
    float_logits = to_numpy(model(inputs))
    float_bytes = _expert_bytes(model)
    with pytest.warns(UserWarning):
        for arguments in INT4_ROUTED_EXPERTS:
            model.quantize(**arguments)
    modes = {layer.name: layer.quantization_mode for layer in feed_forward_layers(model)}
    assert modes.pop("experts") == "int4" and set(modes.values()) <= {"int8"}
    experts = [layer for layer in feed_forward_layers(model) if layer.name == "experts"]
    assert all(layer._int4_block_size == 128 for layer in experts)
    logits = to_numpy(model(inputs))
    real = inputs["padding_mask"].astype(bool)
    assert correlation(logits[real], float_logits[real]) > 0.98
    assert float_bytes / _expert_bytes(model) >= 7


def test_qlora_on_int4_experts_lowers_the_loss():
    model = tiny_preset(vocabulary_size=64, hidden_dim=16, num_query_heads=2,
                        num_key_value_heads=1, moe_intermediate_dim=8)
    with pytest.warns(UserWarning):
        model.quantize("int4")
    model.backbone.enable_lora(4, target_layer_names=["experts"])
    trainable = {w.path for w in model.trainable_weights}
    assert trainable and all("_lora_" in path and "/experts/" in path for path in trainable)
    history = _fit_tokens(model, steps=2, epochs=6)
    loss = history.history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]
