"""SoftMoE against a slot-by-slot NumPy reference, on every backend."""

import math
import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers.soft_moe import SoftMoE
from testing import check_gradients
from testing import moe_reference
from testing import run_layer_test
from testing import value_and_grads

HIDDEN_DIM = 6
NUM_EXPERTS = 3
EXPERT_WEIGHT_NAMES = (
    "gate_kernel", "up_kernel", "down_kernel", "gate_bias", "up_bias", "down_bias"
)


def soft_moe_reference(
    inputs,
    weights,
    *,
    num_experts,
    slots_per_expert,
    activation="silu",
    gated=True,
    mask=None,
):
    """Soft MoE (Puigcerver et al. 2023) one sequence, slot and token at a time.

    `weights["slot_kernel"]` is `[d, E * S]`, column `e * S + s` being slot
    `s` of expert `e`; `weights["scale"]` the scalar logit scale. Vectors are
    L2-normalised as `v / sqrt(|v|^2 + 1e-6)`. Padding tokens (mask False)
    take no part in the dispatch softmax and get a zero output; a slot of a
    sequence without real tokens gets a zero input. Everything is float64.

    Returns a dict: `outputs [B, T, d]`, `dispatch [B, T, n]`, `combine
    [B, T, n]` with `n = E * S` slots.
    """
    inputs = np.asarray(inputs, np.float64)
    batch, num_tokens, hidden_dim = inputs.shape
    num_slots = num_experts * slots_per_expert
    if mask is None:
        mask = np.ones((batch, num_tokens), dtype=bool)
    slot_kernel = weights["slot_kernel"]
    scale = float(weights["scale"])

    def normalized(vector):
        return vector / math.sqrt(float(np.sum(vector * vector)) + 1e-6)

    slot_vectors = [normalized(slot_kernel[:, n]) for n in range(num_slots)]
    outputs = np.zeros_like(inputs)
    dispatch = np.zeros((batch, num_tokens, num_slots))
    combine = np.zeros((batch, num_tokens, num_slots))
    for b in range(batch):
        real = [t for t in range(num_tokens) if mask[b, t]]
        logits = {
            (t, n): scale * float(normalized(inputs[b, t]) @ slot_vectors[n])
            for t in real
            for n in range(num_slots)
        }
        slot_outputs = []
        for n in range(num_slots):
            slot_input = np.zeros(hidden_dim)
            if real:
                top = max(logits[t, n] for t in real)
                total = sum(math.exp(logits[t, n] - top) for t in real)
                for t in real:
                    dispatch[b, t, n] = math.exp(logits[t, n] - top) / total
                    slot_input += dispatch[b, t, n] * inputs[b, t]
            expert = n // slots_per_expert
            slot_outputs.append(
                moe_reference.expert_ffn(slot_input, weights, expert, activation, gated)
            )
        for t in real:
            top = max(logits[t, n] for n in range(num_slots))
            total = sum(math.exp(logits[t, n] - top) for n in range(num_slots))
            for n in range(num_slots):
                combine[b, t, n] = math.exp(logits[t, n] - top) / total
                outputs[b, t] += combine[b, t, n] * slot_outputs[n]
    return {"outputs": outputs, "dispatch": dispatch, "combine": combine}


def make_layer(
    rng, *, slots_per_expert=2, use_bias=False, scale=2.5, dtype=None, **kwargs
):
    """A built SoftMoE with random weights, and those weights as numpy."""
    layer = SoftMoE(
        NUM_EXPERTS,
        kwargs.pop("intermediate_dim", 4),
        slots_per_expert,
        use_bias=use_bias,
        dtype=dtype,
        **kwargs,
    )
    layer.build((None, None, HIDDEN_DIM))
    variables = {"slot_kernel": layer.slot_kernel, "scale": layer.scale}
    for name in EXPERT_WEIGHT_NAMES:
        if hasattr(layer.experts, name):
            variables[name] = getattr(layer.experts, name)
    arrays = {}
    for name, variable in variables.items():
        if name == "scale":
            value = np.array(scale)
        else:
            value = rng.normal(scale=0.7, size=variable.shape)
        stored = value.astype(variable.dtype)
        variable.assign(stored)
        # The reference sees exactly the values the layer holds.
        arrays[name] = stored.astype("float64")
    return layer, arrays


def reference_for(layer, arrays, inputs, mask=None):
    return soft_moe_reference(
        inputs,
        arrays,
        num_experts=layer.num_experts,
        slots_per_expert=layer.slots_per_expert,
        activation=layer.experts.activation,
        gated=layer.experts.gated,
        mask=mask,
    )


def padding_mask():
    mask = np.ones((3, 7), dtype=bool)
    mask[0, 5:] = False
    mask[1, [0, 3]] = False
    return mask


EXPERT_KINDS = [
    dict(activation="silu", gated=True),
    dict(activation="relu", gated=False, use_bias=True),
]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("slots_per_expert", [1, 2])
@pytest.mark.parametrize("expert_kind", EXPERT_KINDS, ids=["swiglu", "relu_bias"])
def test_outputs_and_routing_match_reference(expert_kind, slots_per_expert, masked):
    rng = np.random.default_rng(slots_per_expert + 10 * len(expert_kind))
    layer, arrays = make_layer(rng, slots_per_expert=slots_per_expert, **expert_kind)
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    mask = padding_mask() if masked else None
    reference = reference_for(layer, arrays, inputs, mask)

    outputs = ops.convert_to_numpy(layer(inputs, mask=mask))
    np.testing.assert_allclose(outputs, reference["outputs"], rtol=1e-4, atol=1e-5)
    routing = layer.compute_routing(inputs, mask=mask)
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing.dispatch_weights),
        reference["dispatch"],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing.combine_weights),
        reference["combine"],
        rtol=1e-5,
        atol=1e-6,
    )
    if masked:
        assert np.all(outputs[~mask] == 0.0)


def test_dispatch_and_combine_weights_are_distributions():
    rng = np.random.default_rng(1)
    layer, _ = make_layer(rng, slots_per_expert=2)
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    mask = padding_mask()
    routing = layer.compute_routing(inputs, mask=mask)
    dispatch = ops.convert_to_numpy(routing.dispatch_weights)
    combine = ops.convert_to_numpy(routing.combine_weights)
    assert dispatch.shape == combine.shape == (3, 7, NUM_EXPERTS * 2)
    # Each slot is a convex mix of the real tokens of its sequence ...
    np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, rtol=1e-6)
    # ... and each real token a convex mix of all slots.
    np.testing.assert_allclose(combine[mask].sum(axis=-1), 1.0, rtol=1e-6)
    assert np.all(dispatch[~mask] == 0.0) and np.all(combine[~mask] == 0.0)
    assert np.all(dispatch >= 0.0) and np.all(combine >= 0.0)


@pytest.mark.parametrize(
    "use_bias,masked", [(False, False), (True, True)], ids=["plain", "bias_masked"]
)
def test_gradients_match_finite_differences(use_bias, masked):
    rng = np.random.default_rng(7)
    layer, arrays = make_layer(rng, slots_per_expert=2, use_bias=use_bias)
    inputs = rng.normal(size=(2, 5, HIDDEN_DIM)).astype("float32")
    mask = None
    if masked:
        mask = np.ones((2, 5), dtype=bool)
        mask[0, 3:] = False

    def reference_objective(inputs64):
        return reference_for(layer, arrays, inputs64, mask)["outputs"], 0.0

    paths = {"slot_kernel": layer.slot_kernel.path, "scale": layer.scale.path}
    for name in arrays:
        if name not in paths:
            paths[name] = getattr(layer.experts, name).path
    input_grad = check_gradients(
        layer, inputs, {paths[name]: array for name, array in arrays.items()},
        reference_objective, rng, min_gradient=1e-3, mask=mask,
    )
    assert not layer.losses  # Soft MoE has no auxiliary loss.
    if masked:
        assert np.all(input_grad[~mask] == 0.0)


def test_permuting_tokens_permutes_outputs():
    rng = np.random.default_rng(2)
    layer, _ = make_layer(rng)
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    mask = padding_mask()
    permutation = rng.permutation(7)
    outputs = ops.convert_to_numpy(layer(inputs, mask=mask))
    permuted = ops.convert_to_numpy(
        layer(inputs[:, permutation], mask=mask[:, permutation])
    )
    np.testing.assert_allclose(permuted, outputs[:, permutation], rtol=1e-5, atol=1e-6)


def test_batch_elements_are_independent():
    rng = np.random.default_rng(3)
    layer, _ = make_layer(rng)
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    outputs = ops.convert_to_numpy(layer(inputs))
    for b in range(3):
        alone = ops.convert_to_numpy(layer(inputs[b : b + 1]))
        np.testing.assert_allclose(alone[0], outputs[b], rtol=1e-5, atol=1e-6)
    changed = inputs.copy()
    changed[1:] = rng.normal(scale=5.0, size=changed[1:].shape)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(changed))[0], outputs[0], rtol=1e-5, atol=1e-6
    )


def test_every_token_sees_the_whole_sequence():
    # Encoder-only: an early token's output depends on later tokens.
    rng = np.random.default_rng(4)
    layer, _ = make_layer(rng)
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    changed = inputs.copy()
    changed[0, -1] += 1.0
    first = ops.convert_to_numpy(layer(inputs))[0, 0]
    first_again = ops.convert_to_numpy(layer(changed))[0, 0]
    assert np.abs(first - first_again).max() > 1e-4


def test_padding_values_change_nothing_even_nan():
    rng = np.random.default_rng(5)
    layer, _ = make_layer(rng, use_bias=True)
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    mask = padding_mask()
    outputs = ops.convert_to_numpy(layer(inputs, mask=mask))

    scrambled = inputs.copy()
    scrambled[~mask] = rng.normal(scale=100.0, size=scrambled[~mask].shape)
    scrambled[0, 6] = np.nan
    scrambled[1, 0, 2] = np.inf
    outputs_again = ops.convert_to_numpy(layer(scrambled, mask=mask))
    np.testing.assert_array_equal(outputs_again[mask], outputs[mask])
    assert np.all(outputs_again[~mask] == 0.0)

    # Nor does NaN padding leak into any gradient.
    def objective(outputs, losses):
        return ops.sum(ops.square(outputs))

    _, input_grad, weight_grads = value_and_grads(
        layer, scrambled, objective, mask=mask
    )
    assert np.all(input_grad[~mask] == 0.0)
    assert np.all(np.isfinite(input_grad))
    for path, grad in weight_grads.items():
        assert np.all(np.isfinite(grad)), path


def test_fully_masked_sequence_gives_zeros_not_nan():
    rng = np.random.default_rng(6)
    layer, arrays = make_layer(rng, use_bias=True)
    inputs = rng.normal(size=(2, 5, HIDDEN_DIM)).astype("float32")
    mask = np.ones((2, 5), dtype=bool)
    mask[0] = False
    outputs = ops.convert_to_numpy(layer(inputs, mask=mask))
    assert np.all(outputs[0] == 0.0)
    np.testing.assert_allclose(
        outputs[1],
        reference_for(layer, arrays, inputs, mask)["outputs"][1],
        rtol=1e-4,
        atol=1e-5,
    )
    routing = layer.compute_routing(inputs, mask=mask)
    assert np.all(ops.convert_to_numpy(routing.dispatch_weights)[0] == 0.0)

    def objective(outputs, losses):
        return ops.sum(ops.square(outputs))

    _, input_grad, weight_grads = value_and_grads(layer, inputs, objective, mask=mask)
    assert np.all(input_grad[0] == 0.0)
    for path, grad in weight_grads.items():
        assert np.all(np.isfinite(grad)), path


def test_keras_mask_is_used_and_propagated():
    rng = np.random.default_rng(8)
    token_ids = rng.integers(1, 20, size=(3, 7))
    token_ids[0, 4:] = 0
    inputs = keras.Input((7,), dtype="int32")
    embedded = keras.layers.Embedding(20, HIDDEN_DIM, mask_zero=True)(inputs)
    moe = SoftMoE(NUM_EXPERTS, 4, slots_per_expert=2)
    mixed = moe(embedded)
    assert mixed.shape == (None, 7, HIDDEN_DIM)
    assert moe.compute_mask(embedded, embedded._keras_mask) is embedded._keras_mask
    model = keras.Model(inputs, mixed)
    outputs = ops.convert_to_numpy(model(token_ids))

    embedding = model.layers[1]
    explicit = moe(embedding(token_ids), mask=token_ids != 0)
    np.testing.assert_allclose(outputs, ops.convert_to_numpy(explicit), rtol=1e-6)
    assert np.all(outputs[0, 4:] == 0.0)
    # An eager embedding output carries its mask along too.
    np.testing.assert_array_equal(
        ops.convert_to_numpy(moe(embedding(token_ids))), outputs
    )
    unmasked = moe(embedding(token_ids), mask=np.ones(token_ids.shape, bool))
    assert np.abs(ops.convert_to_numpy(unmasked)[0, :4] - outputs[0, :4]).max() > 0


def test_router_math_is_float32_under_mixed_precision():
    rng = np.random.default_rng(9)
    layer, arrays = make_layer(rng, dtype="mixed_bfloat16")
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    mask = padding_mask()
    outputs = layer(inputs, mask=mask)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert layer.slot_kernel.dtype == "float32" and layer.scale.dtype == "float32"
    assert layer.experts.compute_dtype == "bfloat16"
    assert layer.experts.up_kernel.dtype == "float32"
    routing = layer.compute_routing(ops.cast(inputs, "bfloat16"), mask=mask)
    for weights in routing:
        assert keras.backend.standardize_dtype(weights.dtype) == "float32"
    outputs = ops.convert_to_numpy(ops.cast(outputs, "float32"))
    assert np.all(np.isfinite(outputs)) and np.all(outputs[~mask] == 0.0)
    reference = reference_for(layer, arrays, inputs, mask)["outputs"]
    np.testing.assert_allclose(outputs, reference, rtol=0.05, atol=0.05)


def test_float64_policy_routes_in_float64():
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX computes in float32 unless jax_enable_x64 is set")
    rng = np.random.default_rng(10)
    layer, arrays = make_layer(rng, dtype="float64")
    inputs = rng.normal(size=(3, 7, HIDDEN_DIM))
    routing = layer.compute_routing(inputs)
    assert keras.backend.standardize_dtype(routing.router_logits.dtype) == "float64"
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(inputs)),
        reference_for(layer, arrays, inputs)["outputs"],
        rtol=1e-10,
        atol=1e-12,
    )


def test_weights_and_symbolic_shapes():
    layer = SoftMoE(NUM_EXPERTS, 4, slots_per_expert=2)
    outputs = layer(keras.Input((None, HIDDEN_DIM)))
    assert outputs.shape == (None, None, HIDDEN_DIM)
    assert layer.compute_output_shape((2, 9, 5)) == (2, 9, 5)
    assert layer.supports_masking
    assert tuple(layer.slot_kernel.shape) == (HIDDEN_DIM, NUM_EXPERTS * 2)
    assert float(ops.convert_to_numpy(layer.scale)) == 1.0
    assert sorted(v.name for v in layer.weights) == sorted(
        ["slot_kernel", "scale", "gate_kernel", "up_kernel", "down_kernel"]
    )
    assert layer.experts.name == "experts"
    assert not layer.losses


def custom_config_layer():
    return SoftMoE(
        5,
        12,
        slots_per_expert=3,
        activation="gelu",
        gated=False,
        use_bias=True,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        bias_initializer="ones",
        slot_initializer=keras.initializers.RandomNormal(stddev=0.5),
        name="soft",
    )


def test_get_config_round_trip():
    layer = custom_config_layer()
    config = layer.get_config()
    base_keys = set(keras.layers.Layer(name="base").get_config())
    assert set(config) - base_keys == {
        "num_experts", "intermediate_dim", "slots_per_expert", "activation",
        "gated", "use_bias", "kernel_initializer", "bias_initializer",
        "slot_initializer", "track_router_stats", "expert_dropout",
    }
    restored = SoftMoE.from_config(config)
    assert restored.get_config() == config
    assert config["slots_per_expert"] == 3 and config["gated"] is False
    assert isinstance(restored.slot_initializer, keras.initializers.RandomNormal)


def test_keras_file_round_trip(tmp_path):
    data = np.random.default_rng(11).normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    run_layer_test(
        SoftMoE,
        dict(num_experts=NUM_EXPERTS, intermediate_dim=4, slots_per_expert=2, gated=False),
        data,
        # Not the initial value, so loading must restore it.
        before_saving=lambda layer: layer.scale.assign(3.0),
        mask=padding_mask(),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(num_experts=0, intermediate_dim=8), "num_experts"),
        (dict(num_experts=2.5, intermediate_dim=8), "num_experts"),
        (dict(num_experts=4, intermediate_dim=0), "intermediate_dim"),
        *[
            (
                dict(num_experts=4, intermediate_dim=8, slots_per_expert=bad),
                "slots_per_expert",
            )
            for bad in (0, -2, 1.5, "2", True)
        ],
        (dict(num_experts=4, intermediate_dim=8, activation="swishy"), "activation"),
        (dict(num_experts=4, intermediate_dim=8, gated="yes"), "gated"),
        (dict(num_experts=4, intermediate_dim=8, use_bias=1), "use_bias"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, argument):
    expected = re.escape(f"`{argument}`") + ".*" + re.escape(
        f"{argument}={kwargs[argument]!r}"
    )
    with pytest.raises(ValueError, match=expected):
        SoftMoE(**kwargs)


@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 7, 6)])
def test_inputs_other_than_rank_3_are_refused(shape):
    with pytest.raises(
        ValueError,
        match=r"\[batch, tokens, hidden_dim\] \(rank 3\).*"
        + re.escape(f"input_shape={shape}"),
    ):
        SoftMoE(NUM_EXPERTS, 4)(np.zeros(shape, "float32"))


def test_changing_last_dimension_or_rank_after_build_is_refused():
    layer = SoftMoE(NUM_EXPERTS, 4)
    layer.build((None, None, 6))
    with pytest.raises(
        ValueError, match=r"\[batch, tokens, 6\].*inputs\.shape=\(2, 3, 8\)"
    ):
        layer(np.zeros((2, 3, 8), "float32"))
    with pytest.raises(ValueError, match=r"rank must be 3.*inputs\.shape=\(3, 6\)"):
        layer(np.zeros((3, 6), "float32"))


def test_mask_of_the_wrong_rank_is_refused():
    layer = SoftMoE(NUM_EXPERTS, 4)
    layer.build((None, None, 6))
    with pytest.raises(
        ValueError, match=r"`mask` of shape \[batch, tokens\].*mask\.shape=\(2, 3, 1\)"
    ):
        layer(np.zeros((2, 3, 6), "float32"), mask=np.ones((2, 3, 1), bool))


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(12)
    inputs = keras.Input((7, 4))
    hidden = keras.layers.Dense(HIDDEN_DIM)(inputs)
    hidden = keras.layers.Add()(
        [hidden, SoftMoE(NUM_EXPERTS, 8, slots_per_expert=2)(hidden)]
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    data = rng.normal(size=(64, 7, 4)).astype("float32")
    # A target that needs information from the whole sequence.
    sequence_mean = data.mean(axis=(1, 2), keepdims=True)
    targets = np.tanh(data.sum(axis=-1, keepdims=True) * sequence_mean)
    history = model.fit(data, targets, batch_size=16, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("shape", [(2, 0, 6), (0, 3, 6)])
def test_empty_inputs_give_empty_outputs(shape):
    layer = SoftMoE(NUM_EXPERTS, 4)
    layer.build((None, None, 6))
    for training in (False, True):
        outputs = layer(np.zeros(shape, "float32"), training=training)
        assert tuple(outputs.shape) == shape
    # Nothing was recorded from the empty batches: the statistics of the
    # next batch are its own, finite.
    assert layer.router_stats.values()["steps"] == 0
    layer(np.ones((2, 3, 6), "float32"), training=True)
    stats = layer.router_stats.values()
    assert stats["steps"] == 1
    assert all(np.isfinite(value).all() for value in stats.values())


def test_mask_of_the_wrong_dimensions_is_refused():
    layer = SoftMoE(NUM_EXPERTS, 4)
    layer.build((None, None, 6))
    with pytest.raises(
        ValueError, match=r"leading dimensions of the inputs: \(2, 3\).*mask\.shape=\(3, 2\)"
    ):
        layer(np.zeros((2, 3, 6), "float32"), mask=np.ones((3, 2), bool))
