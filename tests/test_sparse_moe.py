"""SparseMoE against the token-by-token NumPy reference, on every backend."""

import numpy as np
import pytest
from keras import ops

from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SparseMoE
from testing import check_gradients
from testing import moe_reference

HIDDEN_DIM = 6
NUM_EXPERTS = 4


def make_layer(rng, *, use_bias=False, weight_scale=0.7, **kwargs):
    """A built SparseMoE with random weights, and those weights as numpy."""
    kwargs.setdefault("aux_loss_weight", 0.0)
    layer = SparseMoE(
        kwargs.pop("num_experts", NUM_EXPERTS),
        kwargs.pop("intermediate_dim", 5),
        use_bias=use_bias,
        **kwargs,
    )
    layer.build((None, HIDDEN_DIM))
    weights = {"router_kernel": layer.router.kernel}
    for name in ("gate_kernel", "up_kernel", "down_kernel"):
        if hasattr(layer.experts, name):
            weights[name] = getattr(layer.experts, name)
    for name in ("gate_bias", "up_bias", "down_bias"):
        if use_bias and hasattr(layer.experts, name):
            weights[name] = getattr(layer.experts, name)
    arrays = {}
    for name, variable in weights.items():
        value = rng.normal(scale=weight_scale, size=variable.shape)
        variable.assign(value.astype("float32"))
        # The reference sees exactly the float32 values the layer holds.
        arrays[name] = value.astype("float32").astype("float64")
    return layer, arrays


def reference_for(layer, arrays, tokens, capacity_factor, token_mask=None):
    return moe_reference.sparse_moe(
        tokens,
        arrays,
        num_experts=layer.num_experts,
        top_k=layer.top_k,
        capacity_factor=capacity_factor,
        activation=layer.experts.activation,
        gated=layer.experts.gated,
        normalize_top_k=layer.router.normalize_top_k,
        token_mask=token_mask,
    )


EXPERT_KINDS = [
    dict(activation="silu", gated=True),
    dict(activation="gelu", gated=True),
    dict(activation="relu", gated=False),
]


@pytest.mark.parametrize("expert_kind", EXPERT_KINDS, ids=["swiglu", "geglu", "relu"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
def test_outputs_and_losses_match_reference(expert_kind, top_k, capacity_factor):
    rng = np.random.default_rng(top_k * 10 + len(expert_kind["activation"]))
    layer, arrays = make_layer(
        rng,
        top_k=top_k,
        capacity_factor=capacity_factor,
        use_bias=not expert_kind["gated"],
        normalize_top_k=top_k > 1,
        aux_loss_weight=0.01,
        z_loss_weight=0.001,
        **expert_kind,
    )
    inputs = rng.normal(size=(3, 8, HIDDEN_DIM)).astype("float32")
    outputs = layer(inputs, training=True)
    reference = reference_for(
        layer, arrays, inputs.reshape(-1, HIDDEN_DIM), capacity_factor
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(outputs).reshape(-1, HIDDEN_DIM),
        reference["outputs"],
        rtol=1e-4,
        atol=1e-5,
    )
    aux_loss, z_loss = [float(ops.convert_to_numpy(loss)) for loss in layer.losses]
    np.testing.assert_allclose(aux_loss, 0.01 * reference["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(z_loss, 0.001 * reference["z_loss"], rtol=1e-5)
    if capacity_factor == 0.5:
        # The case is only meaningful if capacity really dropped something.
        assert not reference["kept"].all()


def test_eval_uses_eval_capacity_factor():
    rng = np.random.default_rng(0)
    layer, arrays = make_layer(rng, capacity_factor=0.5, eval_capacity_factor=1.0)
    inputs = rng.normal(size=(24, HIDDEN_DIM)).astype("float32")
    for training, factor in [(True, 0.5), (False, 1.0)]:
        reference = reference_for(layer, arrays, inputs, factor)
        np.testing.assert_allclose(
            ops.convert_to_numpy(layer(inputs, training=training)),
            reference["outputs"],
            rtol=1e-4,
            atol=1e-5,
        )
    # Losses are a training-time signal only.
    layer(inputs, training=False)
    assert layer.losses == []


# "tiles": the grouped dropless path (keras_moe.ops.grouped_matmul), whose
# gradients are hand-written loops; "auto" runs buffers at these few tokens.
@pytest.mark.parametrize(
    "capacity_factor,expert_kernel", [(None, "auto"), (None, "tiles"), (0.5, "auto")]
)
@pytest.mark.parametrize("use_bias", [False, True])
def test_gradients_match_finite_differences(capacity_factor, expert_kernel, use_bias):
    rng = np.random.default_rng(7)
    layer, arrays = make_layer(
        rng,
        top_k=2,
        capacity_factor=capacity_factor,
        expert_kernel=expert_kernel,
        use_bias=use_bias,
        aux_loss_weight=0.1,
        z_loss_weight=0.01,
    )
    inputs = rng.normal(size=(2, 6, HIDDEN_DIM)).astype("float32")

    def reference_objective(inputs64):
        tokens = inputs64.reshape(-1, HIDDEN_DIM)
        reference = reference_for(layer, arrays, tokens, capacity_factor)
        return reference["outputs"], 0.1 * reference["aux_loss"] + 0.01 * reference["z_loss"]

    paths = {
        name: (layer.router.kernel if name == "router_kernel" else getattr(layer.experts, name)).path
        for name in arrays
    }
    check_gradients(
        layer, inputs, {paths[name]: array for name, array in arrays.items()},
        reference_objective, rng, min_gradient=1e-3, training=True,
    )


def test_mask_excludes_padding_from_routing_capacity_and_losses():
    rng = np.random.default_rng(3)
    layer, arrays = make_layer(
        rng, capacity_factor=0.75, aux_loss_weight=0.01, z_loss_weight=0.001
    )
    inputs = rng.normal(size=(2, 8, HIDDEN_DIM)).astype("float32")
    mask = np.ones((2, 8), dtype=bool)
    mask[0, 5:] = False
    mask[1, 2:4] = False
    outputs = ops.convert_to_numpy(layer(inputs, mask=mask, training=True))
    losses = [float(ops.convert_to_numpy(loss)) for loss in layer.losses]

    reference = reference_for(
        layer, arrays, inputs.reshape(-1, HIDDEN_DIM), 0.75, mask.reshape(-1)
    )
    np.testing.assert_allclose(
        outputs.reshape(-1, HIDDEN_DIM), reference["outputs"], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(losses[0], 0.01 * reference["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(losses[1], 0.001 * reference["z_loss"], rtol=1e-5)
    assert np.all(outputs[~mask] == 0.0)

    # Whatever sits in padded positions, real tokens see the same result.
    scrambled = inputs.copy()
    scrambled[~mask] = rng.normal(scale=100.0, size=scrambled[~mask].shape)
    scrambled[0, 6] = np.nan
    outputs_again = ops.convert_to_numpy(layer(scrambled, mask=mask, training=True))
    losses_again = [float(ops.convert_to_numpy(loss)) for loss in layer.losses]
    np.testing.assert_array_equal(outputs_again[mask], outputs[mask])
    np.testing.assert_allclose(losses_again, losses, rtol=1e-6)


def test_keras_mask_is_used_and_propagated():
    import keras

    rng = np.random.default_rng(4)
    token_ids = rng.integers(1, 20, size=(2, 7))
    token_ids[0, 4:] = 0
    inputs = keras.Input((7,), dtype="int32")
    embedded = keras.layers.Embedding(20, HIDDEN_DIM, mask_zero=True)(inputs)
    moe = SparseMoE(NUM_EXPERTS, 5)
    mixed = moe(embedded)
    assert mixed._keras_mask is not None or keras.backend.backend() != "tensorflow"
    model = keras.Model(inputs, mixed)
    outputs = ops.convert_to_numpy(model(token_ids))

    embedding = model.layers[1]
    explicit = moe(embedding(token_ids), mask=token_ids != 0)
    np.testing.assert_allclose(outputs, ops.convert_to_numpy(explicit), rtol=1e-6)
    assert np.all(outputs[0, 4:] == 0.0)
    assert np.any(outputs[1] != 0.0)


def test_dropless_never_drops_when_every_token_picks_one_expert():
    rng = np.random.default_rng(5)
    layer, arrays = make_layer(rng, top_k=2, capacity_factor=None)
    # A router that sends every (positive) token to experts 0 then 1.
    router = np.zeros((HIDDEN_DIM, NUM_EXPERTS))
    router[:, 0], router[:, 1] = 3.0, 1.0
    layer.router.kernel.assign(router.astype("float32"))
    arrays["router_kernel"] = router
    inputs = np.abs(rng.normal(size=(40, HIDDEN_DIM))).astype("float32") + 0.1
    reference = reference_for(layer, arrays, inputs, None)
    assert (reference["expert_ids"][:, 0] == 0).all()
    assert reference["kept"].all()
    for training in (True, False):
        np.testing.assert_allclose(
            ops.convert_to_numpy(layer(inputs, training=training)),
            reference["outputs"],
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.parametrize("leading_shape", [(9,), (2, 3), (2, 1, 5)])
def test_any_leading_dimensions(leading_shape):
    rng = np.random.default_rng(6)
    layer, arrays = make_layer(rng, capacity_factor=None)
    inputs = rng.normal(size=leading_shape + (HIDDEN_DIM,)).astype("float32")
    outputs = ops.convert_to_numpy(layer(inputs))
    assert outputs.shape == inputs.shape
    reference = reference_for(layer, arrays, inputs.reshape(-1, HIDDEN_DIM), None)
    np.testing.assert_allclose(
        outputs.reshape(-1, HIDDEN_DIM), reference["outputs"], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("shape", [(2, 0, HIDDEN_DIM), (0, 5, HIDDEN_DIM)])
@pytest.mark.parametrize(
    "layer_class,arguments",
    [
        (SparseMoE, dict(num_experts=4, intermediate_dim=5)),
        (SparseMoE, dict(num_experts=4, intermediate_dim=5, routing="expert_choice")),
        (SharedExpertMoE, dict(num_experts=4, intermediate_dim=5, shared_expert_gate=True)),
        (HierarchicalMoE, dict(num_groups=2, experts_per_group=2, intermediate_dim=5)),
    ],
    ids=["sparse", "expert_choice", "shared", "hierarchical"],
)
def test_empty_inputs_give_empty_outputs(layer_class, arguments, shape):
    layer = layer_class(
        **arguments, z_loss_weight=0.1, sequence_aux_loss_weight=0.1
    )
    layer.build((None, None, HIDDEN_DIM))
    for training in (False, True):
        outputs = layer(np.zeros(shape, "float32"), training=training)
        assert tuple(outputs.shape) == shape
        # Nothing routed: no loss (rather than a mean over no tokens, NaN)
        # and no statistics recorded.
        assert layer.losses == []
    assert layer.router_stats.values()["steps"] == 0
    # The layer still works on the next, non-empty batch.
    inputs = np.ones((2, 3, HIDDEN_DIM), "float32")
    outputs = layer(inputs, training=True)
    assert np.isfinite(ops.convert_to_numpy(outputs)).all()
    assert len(layer.losses) >= 1
    stats = layer.router_stats.values()
    assert stats["steps"] == 1
    assert all(np.isfinite(value).all() for value in stats.values())


@pytest.mark.parametrize("mask_shape", [(2, 4), (3, 5), (5, 2)])
def test_mask_of_the_wrong_dimensions_is_refused(mask_shape):
    layer = SparseMoE(NUM_EXPERTS, 5)
    with pytest.raises(
        ValueError,
        match=r"`mask` of shape \[\.\.\.\], the leading dimensions of the "
        rf"inputs: \(2, 5\).*mask\.shape=\({mask_shape[0]}, {mask_shape[1]}\)",
    ):
        layer(np.zeros((2, 5, HIDDEN_DIM), "float32"), mask=np.ones(mask_shape, bool))
