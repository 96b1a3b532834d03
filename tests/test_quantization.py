"""Quantization and LoRA of the expert kernels, through Keras' own protocol.

`model.quantize("int8")` stores every `Experts` and `FeedForward` kernel as
int8 with one scale per (expert,) output channel, leaves the routers float,
survives saving, and keeps the logits of a preset close to the float model;
`"float8"` trains; `enable_lora` fine-tunes the experts through low-rank
factors only.
"""

import gc

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import presets
from keras_moe.layers import Experts
from keras_moe.layers import FeedForward
from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.layers.feed_forward_weights import FeedForwardWeights
from keras_moe.models.grouped_query_attention import GroupedQueryAttention
from keras_moe.models.multi_head_latent_attention import MultiHeadLatentAttention
import testing
from testing import load_preset
from testing import reload_keras_file
from testing import reload_preset
from testing import to_numpy
from testing import value_and_grads

HIDDEN_DIM = 16
# TensorFlow spends seconds tracing and compiling a train step that these
# tests run twice; eagerly the steps take milliseconds. (Eager JAX would
# compile every primitive separately, which is slower than one `jax.jit`.)
RUN_EAGERLY = keras.backend.backend() == "tensorflow"


@pytest.fixture(scope="module", autouse=True)
def no_garbage_collection_per_deleted_variable():
    """Keras' own layers run `gc.collect()` for every float kernel they
    replace when quantizing (a second or more each in a process holding a
    test suite); what memory is freed, and when, is not checked here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gc, "collect", lambda generation=2: 0)
        yield

# A two-layer deepseek_small (the first layer dense) at widths of 32.
TINY_DEEPSEEK = dict(
    num_layers=2, vocabulary_size=64, hidden_dim=32, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    intermediate_dim=64, moe_intermediate_dim=32, num_experts=8, top_k=2,
)


def tiny_preset(name="mixtral_small", num_layers=1, **overrides):
    """A preset at its own widths unless overridden, taking token ids."""
    return load_preset(name, num_layers=num_layers, **overrides)


def token_batch(batch=2, length=12, vocabulary_size=259, seed=0):
    return testing.token_batch(batch, length, vocabulary_size, seed, padding=3, padded_row=1)


def feed_forward_layers(model):
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, FeedForwardWeights)
    ]


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# int8: storage, arithmetic, routers.


def test_int8_kernels_have_one_scale_per_expert_and_output_channel():
    rng = np.random.default_rng(0)
    experts = Experts(3, 10, use_bias=True)
    buffers = rng.normal(size=(3, 4, HIDDEN_DIM)).astype("float32")
    experts(buffers)
    floats = {name: to_numpy(getattr(experts, f"{name}_kernel")) for name in experts.projections}
    experts.quantize("int8")
    assert experts.quantization_mode == "int8"
    for name, kernel in floats.items():
        quantized = getattr(experts, f"{name}_kernel")
        scale = to_numpy(getattr(experts, f"{name}_kernel_scale"))
        assert keras.backend.standardize_dtype(quantized.dtype) == "int8"
        assert tuple(quantized.shape) == kernel.shape  # [E, fan_in, fan_out]
        assert scale.shape == (kernel.shape[0], kernel.shape[2])  # [E, fan_out]
        # Absolute-maximum scaling over the input axis, per expert.
        np.testing.assert_allclose(scale, 127.0 / np.abs(kernel).max(axis=1), rtol=1e-4)
        dequantized = to_numpy(quantized).astype("float32") / scale[:, None, :]
        assert np.abs(dequantized - kernel).max() <= 0.5 / scale.min() + 1e-6
    # Biases stay float and trainable state is gone from the kernels.
    assert keras.backend.standardize_dtype(experts.up_bias.dtype) == "float32"
    assert {w.name for w in experts.trainable_weights} == {
        "gate_bias", "up_bias", "down_bias"
    }


@pytest.mark.parametrize("weight_only", [True, False], ids=["w8a16", "w8a8"])
def test_int8_outputs_and_input_gradients_follow_the_float_layer(weight_only):
    rng = np.random.default_rng(1)
    experts = Experts(4, 32, activation="gelu")
    buffers = rng.normal(size=(2, 4, 5, HIDDEN_DIM)).astype("float32")
    expected = to_numpy(experts(buffers))
    expected_grad = _input_gradient(experts, buffers)
    # As for `keras.layers.Dense`, the default quantizes the inputs as well.
    config = (
        keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
        if weight_only
        else None
    )
    experts.quantize("int8", config=config)
    assert (experts.inputs_quantizer is None) == weight_only
    outputs = to_numpy(experts(buffers))
    assert correlation(outputs, expected) > 0.999
    np.testing.assert_allclose(outputs, expected, atol=0.03 * np.abs(expected).max())
    grad = _input_gradient(experts, buffers)
    assert np.isfinite(grad).all()
    assert correlation(grad, expected_grad) > 0.99


def _input_gradient(layer, inputs):
    _, input_grad, _ = value_and_grads(
        layer, inputs, lambda outputs, losses: ops.sum(outputs**2)
    )
    return input_grad


MOE_LAYERS = {
    "sparse": lambda: SparseMoE(4, 8, top_k=2, capacity_factor=None),
    "shared": lambda: SharedExpertMoE(4, 8, top_k=2, shared_expert_gate=True),
    "hierarchical": lambda: HierarchicalMoE(2, 2, 8, top_groups=2, top_k=1),
    "soft": lambda: SoftMoE(4, 8),
}


@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_model_quantize_reaches_the_experts_and_leaves_routers_float(name, tmp_path):
    rng = np.random.default_rng(2)
    inputs = keras.Input((6, HIDDEN_DIM))
    moe = MOE_LAYERS[name]()
    model = keras.Model(inputs, moe(inputs))
    x = rng.normal(size=(2, 6, HIDDEN_DIM)).astype("float32")
    expected = to_numpy(model(x))
    router_weights = {
        w.path: to_numpy(w) for w in model.weights if "experts" not in w.path
    }
    with pytest.warns(UserWarning, match="quantize"):  # the routers say no
        model.quantize("int8")
    quantized = feed_forward_layers(model)
    assert quantized and all(layer.quantization_mode == "int8" for layer in quantized)
    for weight in model.weights:
        if "experts" in weight.path:
            continue
        # Router weights are untouched, float32, and never quantized.
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
        np.testing.assert_array_equal(to_numpy(weight), router_weights[weight.path])
    outputs = to_numpy(model(x))
    assert correlation(outputs, expected) > 0.99

    # Saved in safe mode and loaded back: the same int8 model. The MoE layer
    # serialises its own float policy; the experts find their saved int8
    # state and quantize themselves before loading it.
    restored = reload_keras_file(model, tmp_path)
    assert all(
        layer.quantization_mode == "int8" for layer in feed_forward_layers(restored)
    )
    np.testing.assert_allclose(to_numpy(restored(x)), outputs, rtol=1e-6, atol=1e-6)


def test_weight_only_int8_survives_saving_inside_a_moe_layer(tmp_path):
    rng = np.random.default_rng(5)
    inputs = keras.Input((6, HIDDEN_DIM))
    model = keras.Model(inputs, SparseMoE(4, 8, capacity_factor=None, name="moe")(inputs))
    x = rng.normal(size=(2, 6, HIDDEN_DIM)).astype("float32")
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    with pytest.warns(UserWarning):
        model.quantize("int8", config=config)
    outputs = to_numpy(model(x))
    restored = reload_keras_file(model, tmp_path)
    assert restored.get_layer("moe").experts.inputs_quantizer is None
    np.testing.assert_array_equal(to_numpy(restored(x)), outputs)


@pytest.mark.parametrize("mode", ["int8", "float8", "int4"])
def test_saved_mode_is_written_beside_the_weights_and_read_back(mode):
    # A bank inside a MoE layer is rebuilt float (its config is not saved):
    # the saved mode entry tells it what to become. Stores written without
    # the entry (older files, before int4) are still read by their layout.
    x = np.random.default_rng(2).normal(size=(2, 3, HIDDEN_DIM)).astype("float32")
    experts = Experts(2, 4)
    experts.build((2, None, HIDDEN_DIM))
    experts.quantize(mode)
    store = {}
    experts.save_own_variables(store)
    assert bytes(np.asarray(store["quantization_mode"])).decode() == mode
    outputs = to_numpy(experts(x))
    legacy = {k: v for k, v in store.items() if k != "quantization_mode"}
    for saved in (store, legacy) if mode != "int4" else (store,):
        restored = Experts(2, 4)
        restored.build((2, None, HIDDEN_DIM))
        restored.load_own_variables(saved)
        assert restored.quantization_mode == mode
        np.testing.assert_array_equal(to_numpy(restored(x)), outputs)
    float_store = {}
    float_experts = Experts(2, 4)
    float_experts.build((2, None, HIDDEN_DIM))
    float_experts.save_own_variables(float_store)
    assert "quantization_mode" not in float_store


def _gptq_config():
    """A mode the expert kernels do not implement (GPTQ needs calibration)."""
    return keras.quantizers.GPTQConfig(dataset=["a b"], tokenizer=lambda text: [1, 2])


UNSUPPORTED = "mode='gptq'. Supported modes: 'int8', 'float8', 'int4'"


def test_unsupported_modes_leave_the_kernels_float():
    experts = Experts(2, 4)
    experts.build((2, None, HIDDEN_DIM))
    # A ValueError, not Keras' NotImplementedError, which `Model.quantize`
    # would turn into a warning, skipping the experts.
    with pytest.raises(ValueError, match=UNSUPPORTED):
        experts.quantize("gptq", config=_gptq_config())
    assert experts.quantization_mode is None
    assert keras.backend.standardize_dtype(experts.up_kernel.dtype) == "float32"
    inputs = keras.Input((6, HIDDEN_DIM))
    model = keras.Model(inputs, SparseMoE(4, 8, capacity_factor=None)(inputs))
    with pytest.raises(ValueError, match="`Experts` layer 'experts' cannot be quantized"):
        model.quantize("gptq", config=_gptq_config())


@pytest.mark.parametrize("name", ["mixtral_small", "deepseek_small"])
@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize`")
def test_model_quantize_refuses_a_mode_the_experts_lack_before_changing_anything(name):
    model = testing.tiny_preset(name)
    dtypes = {w.path: w.dtype for w in model.weights}
    for quantizable in (model, model.backbone):
        with pytest.raises(ValueError, match=UNSUPPORTED):
            quantizable.quantize("gptq", config=_gptq_config())
    assert {w.path: w.dtype for w in model.weights} == dtypes
    # The way out the message gives: quantize the other layers only.
    model.quantize(
        "int4", filters=lambda layer: not isinstance(layer, (Experts, FeedForward))
    )
    modes = {type(layer).__name__: layer.quantization_mode for layer in model._flatten_layers()}
    assert modes["EinsumDense"] == "int4" and modes["Experts"] is None
    assert np.isfinite(to_numpy(model(testing.token_batch()))).all()


# Attention: cached (generation) and uncached calls agree in every mode.


def _attention_layer(kind):
    if kind == "gqa":
        return GroupedQueryAttention(num_query_heads=4, num_key_value_heads=2)
    return MultiHeadLatentAttention(
        num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2,
        v_head_dim=4, q_lora_rank=6 if kind == "mla_q_lora" else None,
    )


ATTENTION_MODES = {
    "float": None,
    "int8": keras.quantizers.Int8QuantizationConfig(),
    "int8_weight_only": keras.quantizers.Int8QuantizationConfig(activation_quantizer=None),
    "float8": "float8",
    "int4": keras.quantizers.Int4QuantizationConfig(),
    "lora": None,
    "int8_lora": keras.quantizers.Int8QuantizationConfig(),
}


@pytest.mark.parametrize("mode", sorted(ATTENTION_MODES))
@pytest.mark.parametrize("kind", ["gqa", "mla_q_lora"])
@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize`")
def test_cached_attention_matches_the_full_pass_in_every_mode(kind, mode):
    # Latent attention reads its `kv_b_proj` kernel directly when cached
    # (weight absorption): a quantized kernel must be read with its scales
    # and a LoRA adaptation included, or generation decodes garbage.
    keras.utils.set_random_seed(0)
    layer = _attention_layer(kind)
    inputs = keras.Input((None, HIDDEN_DIM))
    model = keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(0).normal(size=(2, 5, HIDDEN_DIM)).astype("float32")
    float_outputs = to_numpy(layer(x))
    config = ATTENTION_MODES[mode]
    if config == "float8":
        model.quantize("float8")
    elif config is not None:
        model.quantize(config=config)
    if mode.endswith("lora"):
        for projection in layer._flatten_layers():
            if projection.name in ("value", "kv_b_proj"):
                projection.enable_lora(2)
                projection.lora_kernel_b.assign(
                    np.random.default_rng(1).normal(size=projection.lora_kernel_b.shape)
                )
    outputs = to_numpy(layer(x))
    # Quantized or adapted, the layer computes something else...
    if mode != "float":
        assert not np.allclose(outputs, float_outputs, atol=1e-3)
    # ... and its cached calls compute the same: a 3-token prompt, then one
    # token at a time.
    cache = np.zeros((2,) + tuple(layer.cache_shape(5)), "float32")
    step, cache = layer(x[:, :3], cache=cache, cache_update_index=0)
    steps = [to_numpy(step)]
    for index in (3, 4):
        step, cache = layer(x[:, index : index + 1], cache=cache, cache_update_index=index)
        steps.append(to_numpy(step))
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1), outputs, atol=2e-5 * np.abs(outputs).max()
    )


def test_weight_quantizer_must_reduce_over_the_input_axis():
    experts = Experts(2, 4)
    experts.build((2, None, HIDDEN_DIM))
    config = keras.quantizers.Int8QuantizationConfig(
        weight_quantizer=keras.quantizers.AbsMaxQuantizer(axis=0)
    )
    with pytest.raises(ValueError, match=r"must give scales of shape \(2, 1, 4\)"):
        experts.quantize("int8", config=config)


# Presets: logits, memory, saving.


@pytest.fixture(scope="module")
def quantized_preset():
    """deepseek_small (dense layer, shared and routed experts, MLA), int8.

    Two layers (the first dense) at widths of 32, Keras' default int8
    (weights, and inputs per row).
    """
    model = tiny_preset("deepseek_small", **TINY_DEEPSEEK)
    inputs = token_batch(vocabulary_size=64)
    float_logits = to_numpy(model(inputs))
    with pytest.warns(UserWarning):  # layers without quantization say so
        model.quantize("int8")
    return model, inputs, float_logits


def _expert_bytes(model):
    return sum(
        np.prod(w.shape) * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
        for w in model.weights
        if "/experts/" in w.path
    )


def test_quantize_reaches_every_feed_forward_and_leaves_routers_float(quantized_preset):
    model, inputs, float_logits = quantized_preset
    # Routed experts, shared experts and the dense layer are int8; routers
    # (and their balancing bias) are float.
    assert {layer.name for layer in feed_forward_layers(model)} == {
        "experts", "shared_experts", "feedforward"
    }
    assert all(layer.quantization_mode == "int8" for layer in feed_forward_layers(model))
    routers = [w for w in model.weights if "/router/" in w.path]
    assert routers and all(
        keras.backend.standardize_dtype(w.dtype) == "float32" for w in routers
    )
    logits = to_numpy(model(inputs))
    assert np.isfinite(logits).all()
    real = inputs["padding_mask"].astype(bool)
    assert correlation(logits[real], float_logits[real]) > 0.95


def test_quantized_latent_attention_generates_the_argmax_of_the_full_pass(
    quantized_preset,
):
    # Greedy generation reads the latent cache (weight absorption); each
    # generated token must be the argmax of a full forward pass over the
    # same sequence, as it is in float.
    model, _, _ = quantized_preset
    model.compile(sampler="greedy")
    prompt = np.zeros((2, 10), "int32")
    prompt[:, :4] = np.random.default_rng(6).integers(0, 64, size=(2, 4))
    mask = (np.arange(10) < 4)[None].repeat(2, axis=0).astype("int32")
    generated = model.generate(
        {"token_ids": prompt, "padding_mask": mask}, stop_token_ids=None
    )
    token_ids = np.asarray(generated["token_ids"])
    logits = to_numpy(model({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    np.testing.assert_array_equal(logits.argmax(-1)[:, 3:-1], token_ids[:, 4:])


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize`")
def test_quantize_and_lora_work_on_the_model_loaded_with_its_tokenizer():
    # `presets.load(name)` attaches the byte tokenizer, a layer without
    # weights that `model.quantize` must not refuse as unbuilt.
    keras.utils.set_random_seed(0)
    model = presets.load(
        "mixtral_small", num_layers=1, hidden_dim=16, num_query_heads=2,
        num_key_value_heads=1, moe_intermediate_dim=8,
    )
    assert model.preprocessor is not None
    model.quantize("int8")
    model.backbone.enable_lora(2)
    assert model.trainable_weights
    model.compile(sampler="greedy")
    text = model.generate("def ", max_length=8)
    assert isinstance(text, str) and text.startswith("def ")


def test_quantized_preset_saves_and_loads(quantized_preset, tmp_path):
    model, inputs, _ = quantized_preset
    logits = to_numpy(model(inputs))
    reloaded = reload_preset(model, tmp_path)
    assert all(
        layer.quantization_mode == "int8" for layer in feed_forward_layers(reloaded)
    )
    np.testing.assert_allclose(to_numpy(reloaded(inputs)), logits, rtol=1e-5, atol=1e-5)
    restored = reload_keras_file(model, tmp_path)
    np.testing.assert_allclose(to_numpy(restored(inputs)), logits, rtol=1e-5, atol=1e-5)


def test_quantized_preset_logits_correlate_and_expert_memory_falls():
    """mixtral_small at its own widths (one layer), int8 weights.

    Weight-only int8 for every layer Keras can quantize. The models are
    untrained, so many routing choices are near ties; what moves the
    correlation is the few tokens whose choice flips. Keras' default int8
    (activations too) measures 0.99-0.999 on this preset, and lower on
    deepseek_small, whose latent-attention projections are more sensitive
    (see BENCHMARKS.md, "Quantization: memory and step time").
    """
    model = tiny_preset("mixtral_small")
    inputs = token_batch(batch=4, length=16)
    float_logits = to_numpy(model(inputs))
    float_bytes = _expert_bytes(model)
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    with pytest.warns(UserWarning):
        model.quantize("int8", config=config)
    experts = model.backbone.get_layer("decoder_block_0").feedforward.experts
    assert experts.quantization_mode == "int8" and experts.inputs_quantizer is None
    logits = to_numpy(model(inputs))
    real = inputs["padding_mask"].astype(bool)
    assert correlation(logits[real], float_logits[real]) > 0.99
    # int8 kernels and one float scale per expert and output channel.
    assert float_bytes / _expert_bytes(model) >= 3.5


# float8.


def test_float8_experts_train_and_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    inputs = keras.Input((6, HIDDEN_DIM))
    moe = SharedExpertMoE(4, 8, top_k=2, capacity_factor=None, name="moe")
    model = keras.Model(inputs, moe(inputs))
    x = rng.normal(size=(8, 6, HIDDEN_DIM)).astype("float32")
    y = rng.normal(size=(8, 6, HIDDEN_DIM)).astype("float32")
    expected = to_numpy(model(x))
    with pytest.warns(UserWarning):
        model.quantize("float8")
    assert moe.experts.quantization_mode == "float8"
    assert moe.shared_experts.quantization_mode == "float8"
    # Compiled: Keras' float8 gradients fail in eager TensorFlow (its own
    # `Dense` too: `tf.custom_gradient` wants variable gradients apart).
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # Delayed scaling recorded the amax of inputs, kernels and gradients.
    for suffix in ("inputs", "kernel", "outputs_grad"):
        history_variable = getattr(moe.experts, f"up_{suffix}_amax_history")
        assert to_numpy(history_variable).max() > 0, suffix
    outputs = to_numpy(model(x))
    assert correlation(outputs, expected) > 0.9
    restored = reload_keras_file(model, tmp_path)
    assert restored.get_layer("moe").experts.quantization_mode == "float8"
    np.testing.assert_allclose(to_numpy(restored(x)), outputs, rtol=1e-5, atol=1e-5)


# LoRA.


def _fit_tokens(model, steps=2, epochs=1):
    batch = token_batch(batch=4, length=10, vocabulary_size=64, seed=4)
    labels = np.roll(batch["token_ids"], -1, axis=1)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=RUN_EAGERLY,
    )
    return model.fit(
        batch, labels, batch_size=2, epochs=epochs, steps_per_epoch=steps, verbose=0
    )


@pytest.mark.parametrize("quantized", [None, "int8", "int4"], ids=["float", "int8", "int4"])
def test_lora_on_experts_trains_only_the_lora_weights(quantized, tmp_path):
    model = tiny_preset(vocabulary_size=64, hidden_dim=16, num_query_heads=2,
                        num_key_value_heads=1, moe_intermediate_dim=8)
    if quantized:
        with pytest.warns(UserWarning):
            model.quantize(quantized)
    model.backbone.enable_lora(2, target_layer_names=["experts"])
    trainable = {w.path for w in model.trainable_weights}
    assert trainable and all("_lora_" in path for path in trainable)
    assert all("/moe/experts/" in path for path in trainable)
    assert len(trainable) == 3 * 2  # (gate, up, down) x (A, B), one layer
    experts = model.backbone.get_layer("decoder_block_0").feedforward.experts
    assert tuple(experts.up_kernel_lora_a.shape) == (8, 16, 2)  # per expert
    assert tuple(experts.up_kernel_lora_b.shape) == (8, 2, 8)
    frozen = {w.path: to_numpy(w) for w in model.weights if w.path not in trainable}
    inputs = token_batch(vocabulary_size=64)
    before = to_numpy(model(inputs))
    history = _fit_tokens(model)
    assert np.isfinite(history.history["loss"]).all()
    for weight in model.weights:
        if weight.path in frozen and "router_stats" not in weight.path:
            np.testing.assert_array_equal(to_numpy(weight), frozen[weight.path])
    assert np.abs(to_numpy(experts.up_kernel_lora_b)).max() > 0
    after = to_numpy(model(inputs))
    assert not np.allclose(after, before)

    # Saving merges the adaptation into the kernels, as Keras does.
    restored = reload_keras_file(model, tmp_path)
    tolerance = 0.05 if quantized else 1e-4  # int8 re-quantizes the merge
    np.testing.assert_allclose(
        to_numpy(restored(inputs)), after, atol=tolerance * np.abs(after).max()
    )


def test_lora_rank_survives_a_standalone_layer_config(tmp_path):
    layer = FeedForward(8, lora_rank=3, lora_alpha=6.0, name="ffn")
    inputs = keras.Input((4, HIDDEN_DIM))
    model = keras.Model(inputs, layer(inputs))
    assert layer.lora_enabled and layer.lora_rank == 3
    assert {w.name for w in layer.trainable_weights} == {
        f"{name}_kernel_lora_{ab}" for name in ("gate", "up", "down") for ab in "ab"
    }
    restored = reload_keras_file(model, tmp_path).get_layer("ffn")
    assert restored.lora_enabled and restored.lora_alpha == 6.0


def test_lora_errors_name_the_problem():
    experts = Experts(2, 4)
    with pytest.raises(ValueError, match="before it is built"):
        experts.enable_lora(2)
    experts.build((2, None, HIDDEN_DIM))
    with pytest.raises(ValueError, match="`rank` must be an integer >= 1"):
        experts.enable_lora(0)
    experts.enable_lora(2)
    with pytest.raises(ValueError, match="LoRA is already enabled"):
        experts.enable_lora(2)
    with pytest.raises(ValueError, match="`lora_rank` must be an integer >= 1"):
        Experts(2, 4, lora_rank=0)

