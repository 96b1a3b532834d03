"""Reliability: saving, precision, padding and hostile inputs.

- Every layer and every preset round-trips through `.keras` (safe mode) and
  `save_to_preset`, balancing bias included.
- Mixed precision trains without NaN; routers compute in float32 while the
  experts follow the policy; extreme router logits, all-equal logits, an
  expert that gets no tokens and a one-token batch give finite outputs and
  gradients.
- Under a mask, whatever the padded positions hold changes nothing for real
  tokens: outputs, gradients, losses, router statistics, capacity use.
- NaN/Inf inputs raise a clear error when `keras_moe.config.check_numerics`
  is on; saved configs never execute code; a truncated or corrupted weights
  file fails naming itself and leaves the model as it was.
- Every `ValueError` the package raises is asserted by some test.
"""

import ast
import json
import re
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_moe
from backend_grads import value_and_grads
from keras_moe import config as moe_config
from keras_moe import layers as moe_layers
from keras_moe import presets
from keras_moe.layers import Experts
from keras_moe.layers import FeedForward
from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import HierarchicalRouter
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.layers import TopKRouter

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "keras_moe"
TESTS_DIR = REPO_ROOT / "tests"
HIDDEN_DIM = 8

# Checks of source files, saved configs, HDF5 files and argument validation
# do not depend on the backend: they run once, under PyTorch.
backend_independent = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="does not depend on the backend; runs under PyTorch",
)


def to_numpy(x):
    return ops.convert_to_numpy(x)


def assert_same_weights(expected_model, model):
    # Paths may differ in the model's own name; the order and names do not.
    assert [w.name for w in model.weights] == [w.name for w in expected_model.weights]
    for expected, actual in zip(expected_model.weights, model.weights):
        np.testing.assert_array_equal(to_numpy(actual), to_numpy(expected), err_msg=expected.path)


# Saving: every layer.


def _router_model(router):
    inputs = keras.Input((HIDDEN_DIM,))
    routing = router(inputs)
    return keras.Model(inputs, [routing.expert_ids, routing.expert_weights])


# name -> (model builder, input shape). The MoE layers use the options that
# carry state: bias balancing, shared-expert gates, two-level routers.
LAYER_MODELS = {
    "Experts": (
        lambda: keras.Sequential([keras.Input((3, 5, HIDDEN_DIM)), Experts(3, 4, use_bias=True)]),
        (2, 3, 5, HIDDEN_DIM),
    ),
    "FeedForward": (
        lambda: keras.Sequential(
            [keras.Input((5, HIDDEN_DIM)), FeedForward(6, activation="relu", gated=False, use_bias=True)]
        ),
        (2, 5, HIDDEN_DIM),
    ),
    "TopKRouter": (
        lambda: _router_model(
            TopKRouter(8, top_k=2, score_function="sigmoid", expert_groups=4,
                       top_groups=2, bias_update_rate=0.01, noisy_gating=True)
        ),
        (6, HIDDEN_DIM),
    ),
    "HierarchicalRouter": (
        lambda: _router_model(HierarchicalRouter(2, 3, top_groups=2, top_k=2)),
        (6, HIDDEN_DIM),
    ),
    "SparseMoE": (
        lambda: keras.Sequential([
            keras.Input((5, HIDDEN_DIM)),
            SparseMoE(8, 4, top_k=2, score_function="sigmoid", expert_groups=4,
                      top_groups=2, bias_update_rate=0.01, capacity_factor=1.0),
        ]),
        (2, 5, HIDDEN_DIM),
    ),
    "SharedExpertMoE": (
        lambda: keras.Sequential([
            keras.Input((5, HIDDEN_DIM)),
            SharedExpertMoE(4, 4, num_shared_experts=2, shared_expert_gate=True,
                            bias_update_rate=0.01, score_function="sigmoid"),
        ]),
        (2, 5, HIDDEN_DIM),
    ),
    "HierarchicalMoE": (
        lambda: keras.Sequential([
            keras.Input((5, HIDDEN_DIM)),
            HierarchicalMoE(2, 2, 4, top_groups=2, z_loss_weight=0.01),
        ]),
        (2, 5, HIDDEN_DIM),
    ),
    "SoftMoE": (
        lambda: keras.Sequential([keras.Input((5, HIDDEN_DIM)), SoftMoE(2, 4, slots_per_expert=2)]),
        (2, 5, HIDDEN_DIM),
    ),
}


def test_every_public_layer_has_a_saving_case():
    public = {
        name
        for name, value in vars(moe_layers).items()
        if isinstance(value, type) and issubclass(value, keras.layers.Layer)
    }
    assert public == set(LAYER_MODELS)


@pytest.mark.parametrize("name", sorted(LAYER_MODELS))
def test_every_layer_round_trips_through_a_safe_keras_file(name, tmp_path):
    build, shape = LAYER_MODELS[name]
    model = build()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    model(x, training=True)  # moves the MoE layers' balancing biases
    for layer in model.layers:
        if isinstance(layer, TopKRouter):  # alone, a router is not trained here
            layer.expert_bias.assign(np.linspace(-0.1, 0.1, 8).astype("float32"))
    biases = [w for w in model.weights if w.name == "expert_bias"]
    assert all(np.abs(to_numpy(bias)).max() > 0 for bias in biases)
    expected = [to_numpy(y) for y in keras.tree.flatten(model(x))]
    path = tmp_path / f"{name}.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert_same_weights(model, restored)
    for layer, loaded in zip(model.layers, restored.layers):
        assert loaded.get_config() == layer.get_config()
    for value, loaded in zip(expected, keras.tree.flatten(restored(x))):
        np.testing.assert_array_equal(to_numpy(loaded), value)
    # Router statistics: the setting survives and the restored layer
    # records from its first training step (the accumulators themselves
    # are per-run state, not weights).
    for layer in restored.layers:
        if getattr(layer, "router_stats", None) is not None:
            assert layer.track_router_stats
            layer(x, training=True)
            assert layer.router_stats.values()["steps"] == 1


# Saving: every preset, shrunk to tiny widths of the same structure.

PRESET_SHRINK = dict(vocabulary_size=64, hidden_dim=16, num_query_heads=2,
                     intermediate_dim=16, moe_intermediate_dim=8)
MLA_SHRINK = dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
PRESET_OVERRIDES = {
    "deepseek_small": dict(num_layers=2, q_lora_rank=8, num_experts=8, top_k=2, **MLA_SHRINK),
    "deepseek_v2_lite": dict(num_layers=2, num_experts=8, top_k=2, **MLA_SHRINK),
    "deepseek_v3": dict(num_layers=2, first_k_dense=1, q_lora_rank=8, num_experts=16,
                        top_k=4, **MLA_SHRINK),
    "mixtral_8x22b": dict(num_layers=1, num_key_value_heads=1, head_dim=8),
    "mixtral_8x7b": dict(num_layers=1, num_key_value_heads=1, head_dim=8),
    "mixtral_small": dict(num_layers=1, num_key_value_heads=1),
    "switch_base_8": dict(num_layers=2, num_key_value_heads=2, head_dim=8),
    "switch_small": dict(num_layers=2, num_key_value_heads=2),
}


def token_batch(batch=2, length=7, vocabulary_size=64, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocabulary_size, size=(batch, length)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[-1, length - 2 :] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def test_every_preset_has_a_saving_case():
    assert sorted(PRESET_OVERRIDES) == presets.names()


# Presets of one family differ only in sizes and options, which the layers'
# own saving cases cover on every backend; all presets run under PyTorch,
# whose eager building is the fastest, one per family elsewhere.
PRESETS_PER_BACKEND = (
    sorted(PRESET_OVERRIDES)
    if keras.backend.backend() == "torch"
    else ["deepseek_v3", "mixtral_small", "switch_small"]
)


@pytest.mark.parametrize("name", PRESETS_PER_BACKEND)
def test_every_preset_round_trips_through_keras_files_and_presets(name, tmp_path):
    keras.utils.set_random_seed(0)
    model = presets.load(
        name, preprocessor=None, **PRESET_SHRINK, **PRESET_OVERRIDES[name]
    )
    inputs = token_batch()
    model(inputs, training=True)  # one balancing step where the preset has one
    biases = [w for w in model.weights if w.path.endswith("expert_bias")]
    uses_bias = bool(presets.config(name)["moe_options"].get("bias_update_rate"))
    assert bool(biases) == uses_bias
    assert all(np.abs(to_numpy(b)).max() > 0 for b in biases)
    logits = to_numpy(model(inputs))

    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert_same_weights(model, restored)
    np.testing.assert_array_equal(to_numpy(restored(inputs)), logits)

    model.save_to_preset(str(tmp_path / "preset"))
    reloaded = presets.load(tmp_path / "preset", preprocessor=None)
    assert_same_weights(model, reloaded)
    np.testing.assert_array_equal(to_numpy(reloaded(inputs)), logits)


# Precision.

def _token_model(vocabulary_size=64, length=7):
    """Embeddings, a DeepSeek-style MoE layer (gated shared expert, sigmoid
    scores, balancing bias, auxiliary losses) with a residual, logits."""
    token_ids = keras.Input((length,), dtype="int32")
    hidden = keras.layers.Embedding(vocabulary_size, 16)(token_ids)
    moe = SharedExpertMoE(
        8, 8, top_k=2, score_function="sigmoid", expert_groups=4, top_groups=2,
        bias_update_rate=0.01, shared_expert_gate=True, z_loss_weight=0.01,
        sequence_aux_loss_weight=0.01, name="moe",
    )
    hidden = keras.layers.Add()([hidden, moe(hidden)])
    return keras.Model(token_ids, keras.layers.Dense(vocabulary_size)(hidden))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_without_nan(policy):
    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = _token_model()
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # TensorFlow spends seconds tracing and compiling a step that runs
        # twice here; eager JAX would compile every primitive separately.
        run_eagerly=keras.backend.backend() == "tensorflow",
    )
    # Keras wraps the optimizer for float16: the loss is scaled up before
    # the gradients are taken, and steps with non-finite gradients skipped.
    scaled = policy == "mixed_float16"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == scaled
    token_ids = token_batch(batch=4, seed=1)["token_ids"]
    history = model.fit(
        token_ids, np.roll(token_ids, -1, axis=1), batch_size=2, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    if scaled:
        # The scale stayed a finite power of two, and the inner optimizer
        # applied both steps (none was skipped for overflow).
        scale = float(to_numpy(model.optimizer.dynamic_scale))
        assert np.isfinite(scale) and scale >= 1.0
        assert int(to_numpy(model.optimizer.inner_optimizer.iterations)) == 2
    for weight in model.weights:
        assert np.isfinite(to_numpy(weight)).all(), weight.path
    compute_dtype = keras.dtype_policies.get(policy).compute_dtype
    moe = model.get_layer("moe")
    # The router keeps float32 weights and math; the experts run in the
    # policy's compute dtype on float32 variables.
    assert moe.router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(moe.router.kernel.dtype) == "float32"
    assert moe.experts.compute_dtype == compute_dtype
    assert moe.shared_experts.compute_dtype == compute_dtype
    assert keras.backend.standardize_dtype(moe.experts.up_kernel.dtype) == "float32"
    hidden = ops.cast(np.ones((1, 3, 16), "float32"), compute_dtype)
    routing = moe.router(hidden)
    assert keras.backend.standardize_dtype(routing.router_logits.dtype) == "float32"
    assert keras.backend.standardize_dtype(moe(hidden).dtype) == compute_dtype


ROUTED_LAYERS = {
    "softmax_capacity": lambda: SparseMoE(4, 4, top_k=2, capacity_factor=1.0,
                                          z_loss_weight=0.01),
    "sigmoid_groups_bias": lambda: SparseMoE(
        4, 4, top_k=2, score_function="sigmoid", expert_groups=2, top_groups=1,
        bias_update_rate=0.01, sequence_aux_loss_weight=0.01, capacity_factor=None),
    "expert_choice": lambda: SparseMoE(4, 4, routing="expert_choice", z_loss_weight=0.01),
    "shared": lambda: SharedExpertMoE(4, 4, top_k=2, shared_expert_gate=True),
    "hierarchical": lambda: HierarchicalMoE(2, 2, 4, top_groups=1, top_k=2, z_loss_weight=0.01),
    "soft": lambda: SoftMoE(4, 4),
}


def _router_kernels(layer):
    if isinstance(layer, SoftMoE):
        return [layer.slot_kernel]
    return [w for w in layer.router.trainable_weights]


def _objective(outputs, losses, mask=None):
    if mask is not None:  # only the real tokens' outputs count
        outputs = ops.where(ops.expand_dims(mask, -1), outputs, 0.0)
    total = ops.sum(ops.cast(outputs, "float32") ** 2)
    for loss in losses:
        total = total + ops.cast(loss, "float32")
    return total


def _outputs_and_grads(layer, x, mask=None):
    """`(value, outputs, losses, input_grad, {path: grad})` of a training call.

    `backend_grads.value_and_grads` of `_objective`, except on JAX, where
    the forward and backward pass are compiled as one program, once per
    layer and input shape: eager JAX compiles each primitive separately for
    every new shape, seconds per layer.
    """
    if keras.backend.backend() != "jax":
        value, input_grad, weight_grads = value_and_grads(
            layer, x, lambda out, losses: _objective(out, losses, mask),
            mask=mask, training=True,
        )
        outputs = to_numpy(layer(x, mask=mask, training=True))
        losses = [to_numpy(loss) for loss in layer.losses]
        return value, outputs, losses, input_grad, weight_grads
    import jax

    compiled = getattr(layer, "_compiled_objective", None)
    if compiled is None:

        def stateless_objective(trainable, non_trainable, inputs, mask):
            outputs, _, losses = layer.stateless_call(
                trainable, non_trainable, inputs, mask=mask, return_losses=True,
                training=True,
            )
            return _objective(outputs, losses, mask), (outputs, losses)

        compiled = jax.jit(
            jax.value_and_grad(stateless_objective, argnums=(0, 2), has_aux=True)
        )
        layer._compiled_objective = compiled
    variables = layer.trainable_variables
    (value, (outputs, losses)), (weight_grads, input_grad) = compiled(
        [v.value for v in variables],
        [v.value for v in layer.non_trainable_variables],
        x,
        mask,
    )
    return (
        float(value),
        np.asarray(outputs),
        [np.asarray(loss) for loss in losses],
        np.asarray(input_grad),
        {v.path: np.asarray(g) for v, g in zip(variables, weight_grads)},
    )


def _assert_finite_outputs_and_gradients(layer, x, **kwargs):
    value, outputs, losses, input_grad, weight_grads = _outputs_and_grads(
        layer, x, **kwargs
    )
    assert np.isfinite(value)
    assert np.isfinite(input_grad).all()
    for path, grad in weight_grads.items():
        assert np.isfinite(grad).all(), path
    assert np.isfinite(outputs).all()
    assert all(np.isfinite(loss).all() for loss in losses)
    return outputs


NO_TOKEN_CASES = ("softmax_capacity", "sigmoid_groups_bias", "shared", "hierarchical")


@pytest.mark.parametrize("name", sorted(ROUTED_LAYERS))
def test_extreme_router_logits_give_finite_outputs_and_gradients(name):
    rng = np.random.default_rng(0)
    layer = ROUTED_LAYERS[name]()
    x = np.abs(rng.normal(size=(2, 6, HIDDEN_DIM))).astype("float32") + 0.1
    layer.build(x.shape)

    # Logits of the order of 1e4 (SoftMoE: its logit scale).
    for kernel in _router_kernels(layer):
        kernel.assign(rng.normal(size=kernel.shape).astype("float32") * 3e3)
    if isinstance(layer, SoftMoE):
        layer.scale.assign(1e4)
    _assert_finite_outputs_and_gradients(layer, x)

    # All logits equal: every expert ties.
    for kernel in _router_kernels(layer):
        kernel.assign(np.zeros(kernel.shape, "float32"))
    if isinstance(layer, SoftMoE):
        layer.scale.assign(1.0)
    _assert_finite_outputs_and_gradients(layer, x)

    # Token choice: an expert that no token chooses. Positive tokens and a
    # strongly negative router column keep expert 0 out of every choice.
    if name in NO_TOKEN_CASES:
        for kernel in _router_kernels(layer):
            value = rng.normal(scale=0.1, size=kernel.shape).astype("float32")
            value[..., 0] = -50.0
            kernel.assign(value)
        if hasattr(layer.router, "expert_bias"):
            layer.router.expert_bias.assign(np.zeros(4, "float32"))
        _assert_finite_outputs_and_gradients(layer, x)
        routing = layer.router(x.reshape(-1, HIDDEN_DIM))
        assert 0 not in to_numpy(routing.expert_ids)

    # One token, alone in its batch.
    _assert_finite_outputs_and_gradients(layer, x[:1, :1])


# Padding invariance.

PADDING_LAYERS = dict(
    ROUTED_LAYERS,
    softmax_capacity=lambda: SparseMoE(
        4, 4, top_k=2, capacity_factor=0.5, z_loss_weight=0.01, aux_loss_weight=0.01
    ),
)


def _masked_run(layer, x, mask, state):
    """Outputs, losses, stats, bias and gradients of one training call."""
    for variable, value in zip(layer.variables, state):
        variable.assign(value)
    if layer.router_stats is not None:
        layer.router_stats.reset_state()
    outputs = to_numpy(layer(x, mask=mask, training=True))
    losses = [float(to_numpy(loss)) for loss in layer.losses]
    stats = layer.router_stats.values() if layer.router_stats is not None else {}
    bias = getattr(getattr(layer, "router", None), "expert_bias", None)
    bias = None if bias is None else to_numpy(bias)
    for variable, value in zip(layer.variables, state):
        variable.assign(value)
    _, _, _, input_grad, weight_grads = _outputs_and_grads(layer, x, mask=mask)
    return dict(outputs=outputs, losses=losses, stats=stats, bias=bias,
                input_grad=input_grad, weight_grads=weight_grads)


@pytest.mark.parametrize("name", sorted(PADDING_LAYERS))
def test_padding_values_change_nothing_for_real_tokens(name):
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)  # a router whose loads need balancing
    layer = PADDING_LAYERS[name]()
    x = rng.normal(size=(3, 6, HIDDEN_DIM)).astype("float32")
    mask = np.ones((3, 6), bool)
    mask[0, 4:] = False
    mask[1, 1:3] = False
    layer(x)
    state = [to_numpy(v) for v in layer.variables]
    clean = _masked_run(layer, x, mask, state)

    hostile = x.copy()
    hostile[~mask] = rng.normal(scale=1e4, size=hostile[~mask].shape)
    hostile[0, 4, 0] = np.nan
    hostile[1, 2, 3] = np.inf
    hostile[0, 5, :] = -np.inf
    scrambled = _masked_run(layer, hostile, mask, state)

    np.testing.assert_array_equal(scrambled["outputs"][mask], clean["outputs"][mask])
    assert np.all(scrambled["outputs"][~mask] == 0.0)
    np.testing.assert_allclose(scrambled["losses"], clean["losses"], rtol=1e-6)
    if clean["bias"] is not None:
        np.testing.assert_array_equal(scrambled["bias"], clean["bias"])
        assert np.abs(clean["bias"] - state[[v.name for v in layer.variables].index("expert_bias")]).max() > 0
    # Statistics, capacity use (load and dropped fraction) included.
    assert sorted(scrambled["stats"]) == sorted(clean["stats"])
    for key, value in clean["stats"].items():
        np.testing.assert_allclose(scrambled["stats"][key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    if "dropped_fraction" in clean["stats"] and name == "softmax_capacity":
        assert clean["stats"]["dropped_fraction"] > 0  # capacity binds here
    # Nothing leaks into the gradients: padding rows get zero, the rest match.
    assert np.all(scrambled["input_grad"][~mask] == 0.0)
    np.testing.assert_allclose(
        scrambled["input_grad"][mask], clean["input_grad"][mask], rtol=1e-5, atol=1e-6
    )
    for path, grad in clean["weight_grads"].items():
        assert np.isfinite(scrambled["weight_grads"][path]).all(), path
        np.testing.assert_allclose(
            scrambled["weight_grads"][path], grad, rtol=1e-5, atol=1e-6, err_msg=path
        )

    # A batch of padding only: zeros out, finite losses and gradients.
    outputs = _assert_finite_outputs_and_gradients(layer, hostile, mask=np.zeros_like(mask))
    assert np.all(outputs == 0.0)


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
    layer = ROUTED_LAYERS[name]()
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


def _tiny_preset_model():
    keras.utils.set_random_seed(0)
    return presets.load("mixtral_small", preprocessor=None, **PRESET_SHRINK,
                        **PRESET_OVERRIDES["mixtral_small"])


@backend_independent
@pytest.mark.parametrize("payload_kind", ["lambda", "module"])
def test_saved_configs_never_execute_code(payload_kind, tmp_path):
    marker = tmp_path / "code_ran"
    if payload_kind == "lambda":
        payload = _marker_lambda(str(marker))
    else:  # An object from outside Keras, built from the file's arguments.
        payload = {"module": "pathlib", "class_name": "Path",
                   "config": {"args": [str(marker)]}, "registered_name": None}
    model = _tiny_preset_model()

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
    model = _tiny_preset_model()
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
    keras.utils.set_random_seed(5)  # other weights than the saved ones
    model = _tiny_preset_model()
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


# Every ValueError the package raises is asserted by a test.

# `raise X(...)` of these types count: ValueError and its subclasses here.
VALUE_ERROR_TYPES = {"ValueError", "ConversionError"}
# Literal pieces shorter than this are too generic to identify a message.
MIN_PIECE = 12


def _literal_pieces(node):
    """The literal text of a message expression, split at its placeholders."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        pieces, current = [], ""
        for part in node.values:
            if isinstance(part, ast.Constant):
                current += part.value
            else:
                pieces.append(current)
                current = ""
        return pieces + [current]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_pieces(node.left), _literal_pieces(node.right)
        if left and right:
            return left[:-1] + [left[-1] + right[0]] + right[1:]
        return left + right
    if isinstance(node, ast.BinOp):  # e.g. "..." % values
        return _literal_pieces(node.left) + [""]
    return ["", ""]  # a value computed at run time: a placeholder


def _is_text(node):
    return any(piece.strip() for piece in _literal_pieces(node))


def _assigned_messages(tree):
    """Templates of the strings assigned to names, or returned by functions.

    `{name: [templates]}`: for `message = f"..."` (and `+=`) under the
    variable's name, and for `def helper(): ... return f"..."` under the
    function's name, so that `raise ValueError(message)` and
    `raise ValueError(helper(...))` find their wording.
    """
    assigned = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name) and _is_text(node.value):
                assigned.setdefault(targets[0].id, []).append(_literal_pieces(node.value))
        elif isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and inner.value is not None:
                    if _is_text(inner.value):
                        assigned.setdefault(node.name, []).append(_literal_pieces(inner.value))
                    elif isinstance(inner.value, ast.Name):
                        assigned.setdefault(node.name, []).extend(
                            assigned.get(inner.value.id, [])
                        )
    return assigned


def value_error_sites():
    """`(file:line, [templates])` of every ValueError the package raises.

    A template is the list of literal pieces of a message, in order, with a
    placeholder (any text) between consecutive pieces.
    """
    sites = []
    for source_file in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(source_file.read_text())
        assigned = _assigned_messages(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            function = node.exc.func
            name = getattr(function, "id", getattr(function, "attr", None))
            if name not in VALUE_ERROR_TYPES or not node.exc.args:
                continue
            message = node.exc.args[0]
            if isinstance(message, ast.Name):  # a message built beforehand
                templates = assigned.get(message.id, [])
            elif isinstance(message, ast.Call) and isinstance(message.func, ast.Name):
                templates = assigned.get(message.func.id, [])  # a helper's text
            else:
                templates = [_literal_pieces(message)]
            where = f"{source_file.relative_to(REPO_ROOT)}:{node.lineno}"
            sites.append((where, templates))
    return sites


def _regex_to_text(pattern):
    """The literal texts a test's expected-message pattern asks for."""
    text = re.sub(r"\\([\[\]().*+?{}|^$\\])", r"\1", pattern)
    return [piece for piece in re.split(r"\.\*\??|\.\+|\\[sdw][*+]?", text) if piece]


def expected_messages():
    """Every string literal in the tests, as the literal texts it asks for."""
    texts = set()
    for test_file in sorted(TESTS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(test_file.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.update(_regex_to_text(node.value))
            elif isinstance(node, ast.JoinedStr):
                for part in node.values:
                    if isinstance(part, ast.Constant):
                        texts.update(_regex_to_text(part.value))
    return [text.strip() for text in texts if len(text.strip()) >= MIN_PIECE]


def _literal_characters_matched(text, template):
    """The most literal characters of `template` that `text` can cover.

    `text` must be a substring of some message the template produces (any
    text in the placeholders); returns -1 when it cannot be.
    """
    # The template as a stream of characters, None marking a placeholder.
    stream = []
    for index, piece in enumerate(template):
        if index:
            stream.append(None)
        stream.extend(piece)
    impossible = -1
    # best[t]: the most literal characters matched with the text consumed so
    # far ending just before stream position t. The text may start anywhere.
    best = [0] * (len(stream) + 1)
    for char in text:
        new = [impossible] * (len(stream) + 1)
        for t, token in enumerate(stream):
            if best[t] == impossible:
                continue
            if token is None:
                new[t] = max(new[t], best[t])  # the placeholder takes it
            elif token == char:
                new[t + 1] = max(new[t + 1], best[t] + 1)
        # A placeholder may also match nothing.
        for t, token in enumerate(stream):
            if token is None and new[t] != impossible:
                new[t + 1] = max(new[t + 1], new[t])
        best = new
    return max(best)


def _is_asserted(templates, texts):
    for template in templates:
        literal = "".join(template)
        grams = {literal[i : i + 6] for i in range(len(literal) - 5)}
        for text in texts:
            if not any(text[i : i + 6] in grams for i in range(len(text) - 5)):
                continue
            # 11: "`" + name + "` must be " spans a placeholder.
            if _literal_characters_matched(text, template) >= MIN_PIECE - 1:
                return True
    return False


@backend_independent
def test_every_value_error_message_is_asserted_by_a_test():
    texts = expected_messages()
    sites = value_error_sites()
    assert len(sites) > 50  # the scan sees the package's validation
    missing = [where for where, templates in sites if not _is_asserted(templates, texts)]
    assert not missing, (
        "ValueError messages that no test asserts (add a test with "
        "`pytest.raises(ValueError, match=...)`):\n" + "\n".join(missing)
    )


# The ValueErrors no other test file triggers. Each case builds the
# offending call and names the wording the message must contain.

MIXTRAL_HF = {
    "model_type": "mixtral", "vocab_size": 64, "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
}


def _hf(**changes):
    config = dict(MIXTRAL_HF, **changes)
    return {key: value for key, value in config.items() if value is not None}


def _write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory


def _tokenizer_file(directory):
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models

    tokenizer = Tokenizer(tokenizer_models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def _registry(directory, name, record):
    from keras_moe.presets import preset_registry

    _write(directory, f"{name}.json", record if isinstance(record, str) else json.dumps(record))
    preset_registry._records_in.cache_clear()
    return preset_registry._records_in(str(directory))


def _tiny_mixtral(**overrides):
    return presets.load(
        "mixtral_small", preprocessor=None, num_layers=1, hidden_dim=16,
        num_query_heads=2, num_key_value_heads=1, moe_intermediate_dim=8,
        vocabulary_size=64, **overrides,
    )


def _gqa(**kwargs):
    from keras_moe.models.grouped_query_attention import GroupedQueryAttention

    return GroupedQueryAttention(2, **kwargs)


def _mla(**kwargs):
    from keras_moe.models.multi_head_latent_attention import MultiHeadLatentAttention

    return MultiHeadLatentAttention(2, 8, 4, 4, 4, **kwargs)


def _backbone(**overrides):
    from keras_moe.models import MoEBackbone

    config = dict(vocabulary_size=16, num_layers=2, hidden_dim=8, num_query_heads=2,
                  num_experts=2, top_k=1, moe_intermediate_dim=4)
    return MoEBackbone(**dict(config, **overrides))


def _families(config):
    from keras_moe.convert import families

    return families.backbone_config_from_transformers(config)


def _checkpoint(directory):
    from keras_moe.convert.checkpoint import SafetensorsCheckpoint

    return SafetensorsCheckpoint(directory)


def _router_stats_callback(**kwargs):
    from keras_moe.callbacks import RouterStats

    callback = RouterStats(**kwargs)
    callback.set_model(keras.Sequential([keras.Input((5, 4)), SparseMoE(2, 4)]))
    callback.on_train_begin()
    return callback


def _mismatched_checkpoint(directory):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    keras_moe.convert.to_transformers(_tiny_mixtral(), directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:4]
    save_file(tensors, path, {"format": "pt"})
    return keras_moe.convert.from_transformers(directory, preprocessor=None)


VALUE_ERROR_CASES = {
    "checkpoint_shape_mismatch": (
        _mismatched_checkpoint,
        "does not match its config.json: `model.layers.0.self_attn.k_proj.weight` has shape",
    ),
    "heatmap_loads": (
        lambda tmp: keras_moe.callbacks.render_load_heatmap([]),
        "`loads` must be a non-empty sequence of non-empty 1-D arrays",
    ),
    "heatmap_vmax": (
        lambda tmp: keras_moe.callbacks.render_load_heatmap([np.ones(4) / 4], vmax=0),
        "`vmax` must be a positive number. Received: vmax=0",
    ),
    "router_stats_log_dir_unwritable": (
        lambda tmp: _router_stats_callback(log_dir=str(_write(tmp, "file", "x") / "file")),
        "`log_dir` must be a directory that can be created and written to",
    ),
    "router_stats_log_dir_empty": (
        lambda tmp: _router_stats_callback(log_dir=""),
        "`log_dir` must be a non-empty path. Received: log_dir=''",
    ),
    "router_stats_run_name": (
        lambda tmp: _router_stats_callback(log_dir=str(tmp), run_name=""),
        "`run_name` must be a non-empty string. Received: run_name=''",
    ),
    "router_stats_metric_kind": (
        lambda tmp: keras_moe.ops.router_stats.RouterStatsMetric("dense"),
        "`kind` must be one of 'routed', 'soft'. Received: kind='dense'",
    ),
    "checkpoint_config_not_json": (
        lambda tmp: keras_moe.convert.checkpoint.read_config(_write(tmp, "config.json", "{")),
        "config.json is not valid JSON: ",
    ),
    "checkpoint_config_not_object": (
        lambda tmp: keras_moe.convert.checkpoint.read_config(_write(tmp, "config.json", "[1]")),
        "config.json must hold a JSON object.",
    ),
    "checkpoint_index_not_json": (
        lambda tmp: _checkpoint(_write(tmp, "model.safetensors.index.json", "{")),
        "model.safetensors.index.json is not valid JSON: ",
    ),
    "checkpoint_index_without_weight_map": (
        lambda tmp: _checkpoint(_write(tmp, "model.safetensors.index.json", "{}")),
        "has no `weight_map` (tensor name -> shard file).",
    ),
    "checkpoint_index_missing_shard": (
        lambda tmp: _checkpoint(_write(
            tmp, "model.safetensors.index.json",
            json.dumps({"weight_map": {"w": "model-00001.safetensors"}}),
        )),
        "is missing model-00001.safetensors, listed in model.safetensors.index.json.",
    ),
    "export_refused": (
        lambda tmp: keras_moe.convert.to_transformers(_tiny_mixtral(ffn_gated=False), tmp),
        "This model cannot be written as a 'mixtral' checkpoint: its feed-forward",
    ),
    "export_unmapped_weights": (
        lambda tmp: keras_moe.convert.to_transformers(
            _tiny_mixtral(moe_options={"noisy_gating": True}), tmp
        ),
        "mixtral checkpoints have no tensor for these weights: "
        "decoder_block_0/moe/router/noise_kernel",
    ),
    "hf_no_experts": (
        lambda tmp: _families(_hf(num_local_experts=None)),
        "config.json gives no number of experts (`num_experts`, `num_local_experts`",
    ),
    "hf_missing_field": (
        lambda tmp: _families(_hf(hidden_size=None)),
        "config.json has no `hidden_size`, which model_type='mixtral' needs.",
    ),
    "hf_integer_field": (
        lambda tmp: _families(_hf(hidden_size=16.5)),
        "config.json field `hidden_size` must be an integer. Received: hidden_size=16.5",
    ),
    "hf_rope_type": (
        lambda tmp: _families(_hf(rope_scaling={"rope_type": "linear", "factor": 2.0})),
        "config.json field `rope_scaling` asks for rope_type='linear'; keras-moe converts",
    ),
    "hf_yarn_field": (
        lambda tmp: _families(dict(
            _hf(model_type="deepseek_v3"),
            rope_scaling={"rope_type": "yarn", "factor": -2.0},
        )),
        "config.json field `rope_scaling`: ",
    ),
    "hf_activation": (
        lambda tmp: _families(_hf(hidden_act="tanh")),
        "config.json field `hidden_act`='tanh' is not supported; supported: gelu, relu",
    ),
    "hf_handle": (
        lambda tmp: keras_moe.convert.hub.parse_handle("hf://just-a-name"),
        "A Hugging Face handle is `hf://org/name` (optionally `@revision`)",
    ),
    "hf_overrides": (
        lambda tmp: keras_moe.convert.from_transformers(
            _write(tmp, "config.json", json.dumps(MIXTRAL_HF)), num_layers=3
        ),
        "cannot be applied to a Hugging Face checkpoint: its config and weights fix",
    ),
    "hf_moe_options": (
        lambda tmp: keras_moe.convert.loading._apply_overrides(
            {"moe_options": {}}, {"moe_options": 1}
        ),
        "`moe_options` must be a dict. Received: moe_options=1",
    ),
    "tokenizer_special_token": (
        lambda tmp: keras_moe.convert.HuggingFaceTokenizer(
            _tokenizer_file(tmp), end_token="</s>"
        ),
        "The special token `end_token`='</s>' is not in the vocabulary of",
    ),
    "tokenizer_id": (
        lambda tmp: keras_moe.convert.HuggingFaceTokenizer(_tokenizer_file(tmp)).id_to_token(7),
        "`id` must be in [0, 1]. Received: 7",
    ),
    "tokenizer_token": (
        lambda tmp: keras_moe.convert.HuggingFaceTokenizer(_tokenizer_file(tmp)).token_to_id("zz"),
        "Token 'zz' is not in the vocabulary.",
    ),
    "byte_lm_text": (
        lambda tmp: keras_moe.datasets.byte_lm_arrays(3, 8),
        "`text` must be a str or bytes. Received: text of type int",
    ),
    "activation_name": (
        lambda tmp: Experts(2, 4, activation="swishy"),
        "`activation` must be the name of a Keras activation (for example 'silu'",
    ),
    "gqa_odd_head_dim": (
        lambda tmp: _gqa(head_dim=5),
        "`head_dim` must be even (RoPE rotates pairs of features). Received: head_dim=5",
    ),
    "gqa_dropout": (lambda tmp: _gqa(dropout=1.0), "`dropout` must be in [0, 1). Received: dropout=1.0"),
    "gqa_input_rank": (
        lambda tmp: _gqa()(np.zeros((2, 8), "float32")),
        "`GroupedQueryAttention` expects inputs [batch, length, hidden_dim]",
    ),
    "gqa_cache_index": (
        lambda tmp: _gqa()(np.zeros((1, 2, 8), "float32"), cache_update_index=0),
        "`cache_update_index` is only meaningful with a `cache`. Received: cache_update_index=0",
    ),
    "mla_dropout": (lambda tmp: _mla(dropout=1.5), "`dropout` must be in [0, 1). Received: dropout=1.5"),
    "mla_input_rank": (
        lambda tmp: _mla()(np.zeros((2, 8), "float32")),
        "`MultiHeadLatentAttention` expects inputs [batch, length, hidden_dim]",
    ),
    "mla_cache_index": (
        lambda tmp: _mla()(np.zeros((1, 2, 8), "float32"), cache_update_index=1),
        "`cache_update_index` is only meaningful with a `cache`. Received: cache_update_index=1",
    ),
    "decoder_block_attention": (
        lambda tmp: keras_moe.models.MoEDecoderBlock("attention", FeedForward(4)),
        "`attention` must be a Keras layer. Received: attention='attention'",
    ),
    "decoder_block_feedforward": (
        lambda tmp: keras_moe.models.MoEDecoderBlock(_gqa(), None),
        "`feedforward` must be a Keras layer. Received: feedforward=None",
    ),
    "decoder_block_dropout": (
        lambda tmp: keras_moe.models.MoEDecoderBlock(_gqa(), FeedForward(4), dropout=2.0),
        "`dropout` must be in [0, 1). Received: dropout=2.0",
    ),
    "backbone_moe_options_type": (
        lambda tmp: _backbone(moe_options=[("top_k", 2)]),
        "`moe_options` must be a dict of MoE layer arguments or None",
    ),
    "backbone_moe_options_reserved": (
        lambda tmp: _backbone(moe_options={"num_experts": 4}),
        "`moe_options` cannot set ['num_experts']: the backbone sets them",
    ),
    "backbone_dropout": (lambda tmp: _backbone(dropout=1.0), "`dropout` must be in [0, 1). Received: dropout=1.0"),
    "backbone_moe_layers_range": (
        lambda tmp: _backbone(moe_layers=[0, 2]),
        "`moe_layers` must be None or a list of layer indices in [0, num_layers=2)",
    ),
    "backbone_moe_layers_repeated": (
        lambda tmp: _backbone(moe_layers=[1, 1]),
        "`moe_layers` lists a layer more than once. Received: moe_layers=[1, 1]",
    ),
    "load_check_memory": (
        lambda tmp: presets.load("mixtral_small", check_memory="no"),
        "`check_memory` must be True or False. Received: check_memory='no'",
    ),
    "load_unknown_overrides": (
        lambda tmp: presets.load("mixtral_small", num_layer=2, hiden_dim=8),
        "Unknown overrides 'num_layer', 'hiden_dim' for preset 'mixtral_small': "
        "overrides must be `MoEBackbone` config keys.",
    ),
    "load_moe_options": (
        lambda tmp: presets.load("mixtral_small", moe_options=[1]),
        "`moe_options` must be a dict or None. Received: moe_options=[1]",
    ),
    "load_directory_overrides": (
        lambda tmp: presets.load(_write(tmp, "config.json", "{}"), num_layers=1),
        "cannot be applied to the saved preset",
    ),
    "load_directory_bad_json": (
        lambda tmp: presets.load(_write(tmp, "config.json", "{")),
        "config.json is not valid JSON: ",
    ),
    "load_directory_not_a_preset": (
        lambda tmp: presets.load(_write(tmp, "config.json", "{}")),
        "is not a keras-hub preset config (a serialized `MoEBackbone`",
    ),
    "dtype_size": (
        lambda tmp: keras_moe.presets.memory.bytes_per_parameter("float"),
        "Cannot tell the size of dtype 'float'.",
    ),
    "count_params_argument": (
        lambda tmp: presets.count_params(3),
        "`name_or_config` must be a preset name or a config dict. Received: int",
    ),
    "count_params_moe_options": (
        lambda tmp: presets.count_params(dict(presets.config("mixtral_small"), moe_options=[1])),
        "`moe_options` must be a dict or None. Received: moe_options=[1]",
    ),
    "count_params_moe_layers": (
        lambda tmp: presets.count_params(dict(presets.config("mixtral_small"), moe_layers=3)),
        "`moe_layers` must be None or a list of layer indices. Received: moe_layers=3",
    ),
    "count_params_missing_key": (
        lambda tmp: presets.count_params({"num_layers": 2}),
        "The config has no `vocabulary_size`, which the parameter count needs.",
    ),
    "registry_bad_json": (
        lambda tmp: _registry(tmp, "broken", "{"),
        "broken.json is not valid JSON: ",
    ),
    "registry_not_object": (
        lambda tmp: _registry(tmp, "listed", [1]),
        "listed.json must hold a JSON object.",
    ),
    "registry_missing_entries": (
        lambda tmp: _registry(tmp, "partial", {"name": "partial"}),
        "partial.json lacks the entries ['description', 'reference', 'backbone'].",
    ),
    "registry_wrong_name": (
        lambda tmp: _registry(tmp, "one", {"name": "two", "description": "", "reference": "", "backbone": {}}),
        "one.json names itself 'two'; a preset's name must be its file name",
    ),
    "registry_backbone": (
        lambda tmp: _registry(tmp, "flat", {"name": "flat", "description": "", "reference": "", "backbone": 1}),
        "The `backbone` entry of ",
    ),
    "argument_float": (
        lambda tmp: SparseMoE(4, 4, capacity_factor=float("nan")),
        "`capacity_factor` must be a positive number or None. Received: capacity_factor=nan",
    ),
    "argument_negative": (
        lambda tmp: SparseMoE(4, 4, z_loss_weight=-1.0),
        "`z_loss_weight` must be a non-negative number. Received: z_loss_weight=-1.0",
    ),
    "argument_int": (
        lambda tmp: SparseMoE(0, 4),
        "`num_experts` must be an integer >= 1. Received: num_experts=0",
    ),
}


@backend_independent
@pytest.mark.parametrize("case", sorted(VALUE_ERROR_CASES))
def test_value_error_messages(case, tmp_path):
    build, expected = VALUE_ERROR_CASES[case]
    with pytest.raises(ValueError) as error:
        build(tmp_path)
    assert expected in str(error.value)
