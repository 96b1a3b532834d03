"""Under a mask, whatever the padded positions hold (huge values, NaN, Inf)
changes nothing for real tokens: outputs, gradients, losses, router
statistics, balancing bias and capacity use."""

import keras
import numpy as np
import pytest

from testing import ROUTED_LAYER_CASES
from testing import assert_finite_outputs_and_gradients
from testing import to_numpy
from testing import training_outputs_and_grads
from keras_moe.layers import SparseMoE

HIDDEN_DIM = 8

PADDING_LAYERS = dict(
    ROUTED_LAYER_CASES,
    softmax_capacity=lambda: SparseMoE(
        4, 4, top_k=2, capacity_factor=0.5, z_loss_weight=0.01, aux_loss_weight=0.01
    ),
)


def masked_run(layer, x, mask, state):
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
    _, _, _, input_grad, weight_grads = training_outputs_and_grads(layer, x, mask=mask)
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
    clean = masked_run(layer, x, mask, state)

    hostile = x.copy()
    hostile[~mask] = rng.normal(scale=1e4, size=hostile[~mask].shape)
    hostile[0, 4, 0] = np.nan
    hostile[1, 2, 3] = np.inf
    hostile[0, 5, :] = -np.inf
    scrambled = masked_run(layer, hostile, mask, state)

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
    outputs = assert_finite_outputs_and_gradients(layer, hostile, mask=np.zeros_like(mask))
    assert np.all(outputs == 0.0)
