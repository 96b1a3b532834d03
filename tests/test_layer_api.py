"""Keras conventions: configs, saving, dtype policies, clear errors."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import Experts
from keras_moe.layers import SparseMoE
from keras_moe.layers import TopKRouter
from testing import moe_reference
from testing import run_layer_test


def test_experts_match_per_expert_numpy():
    rng = np.random.default_rng(0)
    experts = Experts(3, 7, activation="gelu", gated=True, use_bias=True)
    buffers = rng.normal(size=(3, 5, 4)).astype("float32")
    outputs = ops.convert_to_numpy(experts(buffers))
    weights = {
        v.name: ops.convert_to_numpy(v).astype("float64") for v in experts.weights
    }
    assert set(weights) == {
        "gate_kernel", "up_kernel", "down_kernel", "gate_bias", "up_bias", "down_bias"
    }
    for expert in range(3):
        for slot in range(5):
            expected = moe_reference.expert_ffn(
                buffers[expert, slot].astype("float64"), weights, expert, "gelu", True
            )
            np.testing.assert_allclose(
                outputs[expert, slot], expected, rtol=1e-5, atol=1e-5
            )


def test_expert_kernels_are_initialised_per_expert():
    experts = Experts(64, 256, kernel_initializer="glorot_uniform")
    experts.build((64, None, 128))
    kernel = ops.convert_to_numpy(experts.up_kernel)
    # Glorot uniform over one expert's [128, 256] matrix.
    expected_std = np.sqrt(2.0 / (128 + 256))
    assert kernel.shape == (64, 128, 256)
    np.testing.assert_allclose(kernel.std(), expected_std, rtol=0.05)
    # Experts start different from each other.
    assert not np.allclose(kernel[0], kernel[1])


def test_router_math_is_float32_under_mixed_precision():
    moe = SparseMoE(4, 8, dtype="mixed_bfloat16")
    inputs = np.random.default_rng(1).normal(size=(2, 5, 16)).astype("float32")
    outputs = moe(inputs, training=True)
    assert moe.router.kernel.dtype == "float32"
    assert moe.router.compute_dtype == "float32"
    assert moe.experts.compute_dtype == "bfloat16"
    assert moe.experts.up_kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    routing = moe.router(ops.cast(inputs, "bfloat16"))
    assert keras.backend.standardize_dtype(routing.router_logits.dtype) == "float32"
    assert keras.backend.standardize_dtype(routing.expert_weights.dtype) == "float32"
    assert all(
        keras.backend.standardize_dtype(loss.dtype) == "float32" for loss in moe.losses
    )


def test_top_k_router_choices_and_weights():
    rng = np.random.default_rng(2)
    router = TopKRouter(6, top_k=3, normalize_top_k=False)
    inputs = rng.normal(size=(4, 5)).astype("float32")
    routing = router(inputs)
    logits = inputs.astype("float64") @ ops.convert_to_numpy(router.kernel)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected_ids = np.argsort(-probs, axis=-1)[:, :3]
    np.testing.assert_array_equal(ops.convert_to_numpy(routing.expert_ids), expected_ids)
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing.expert_weights),
        np.take_along_axis(probs, expected_ids, -1),
        rtol=1e-5,
    )


def custom_config_layer():
    return SparseMoE(
        6,
        12,
        top_k=3,
        capacity_factor=None,
        eval_capacity_factor=1.5,
        activation="gelu",
        gated=False,
        normalize_top_k=False,
        aux_loss_weight=0.02,
        z_loss_weight=0.001,
        use_bias=True,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        router_initializer="zeros",
        name="moe",
    )


def test_get_config_round_trip():
    layer = custom_config_layer()
    config = layer.get_config()
    restored = SparseMoE.from_config(config)
    assert restored.get_config() == config
    for key in (
        "num_experts", "intermediate_dim", "top_k", "capacity_factor",
        "eval_capacity_factor", "activation", "gated", "normalize_top_k",
        "aux_loss_weight", "z_loss_weight", "use_bias", "kernel_initializer",
        "bias_initializer", "router_initializer",
    ):
        assert key in config
    assert config["capacity_factor"] is None and config["top_k"] == 3


def test_keras_file_round_trip(tmp_path):
    data = np.random.default_rng(3).normal(size=(3, 5, 8)).astype("float32")
    run_layer_test(
        SparseMoE, dict(num_experts=4, intermediate_dim=16, top_k=2), data,
        mask=np.arange(5) < np.array([[5], [3], [1]]), tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(num_experts=0, intermediate_dim=8), "num_experts"),
        (dict(num_experts=2.5, intermediate_dim=8), "num_experts"),
        (dict(num_experts=4, intermediate_dim=0), "intermediate_dim"),
        (dict(num_experts=4, intermediate_dim=8, top_k=0), "top_k"),
        (dict(num_experts=4, intermediate_dim=8, top_k=5), "top_k"),
        (dict(num_experts=4, intermediate_dim=8, capacity_factor=0.0), "capacity_factor"),
        (dict(num_experts=4, intermediate_dim=8, capacity_factor=-1), "capacity_factor"),
        (dict(num_experts=4, intermediate_dim=8, eval_capacity_factor=0), "eval_capacity_factor"),
        (dict(num_experts=4, intermediate_dim=8, activation="swishy"), "activation"),
        (dict(num_experts=4, intermediate_dim=8, aux_loss_weight=-0.1), "aux_loss_weight"),
        (dict(num_experts=4, intermediate_dim=8, z_loss_weight="big"), "z_loss_weight"),
        (dict(num_experts=4, intermediate_dim=8, gated="yes"), "gated"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, argument):
    with pytest.raises(ValueError) as error:
        SparseMoE(**kwargs)
    message = str(error.value)
    assert f"`{argument}`" in message
    assert f"{argument}={kwargs[argument]!r}" in message


def test_rank_one_input_is_refused():
    with pytest.raises(ValueError, match=r"rank >= 2.*input_shape=\(8,\)"):
        SparseMoE(4, 8)(np.zeros((8,), "float32"))


def test_changing_last_dimension_after_build_is_refused():
    layer = SparseMoE(4, 8)
    layer(np.zeros((3, 8), "float32"))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*inputs.shape=\(3, 6\)"):
        layer(np.zeros((3, 6), "float32"))
