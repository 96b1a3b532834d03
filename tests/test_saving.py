"""Saving: every layer and every preset round-trips through a `.keras` file
in safe mode (and presets through `save_to_preset`), balancing bias
included, with the same weights and bit-identical outputs."""

import keras
import numpy as np
import pytest

from keras_moe import layers as moe_layers
from keras_moe import presets
from keras_moe.layers import ExpertChoiceRouter
from keras_moe.layers import Experts
from keras_moe.layers import FeedForward
from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import HierarchicalRouter
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.layers import TopKRouter
from testing import TINY_PRESET_OVERRIDES
from testing import run_layer_test
from testing import run_preset_test
from testing import to_numpy

HIDDEN_DIM = 8


def routing_outputs(routing):
    return [routing.expert_ids, routing.expert_weights]


# name -> (class, arguments, input shape, options of `run_layer_test`). The
# MoE layers use the options that carry state: bias balancing, shared-expert
# gates, two-level routers.
LAYER_CASES = {
    "Experts": (Experts, dict(num_experts=3, intermediate_dim=4, use_bias=True),
                (2, 3, 5, HIDDEN_DIM), {}),
    "FeedForward": (FeedForward, dict(intermediate_dim=6, activation="relu", gated=False,
                                      use_bias=True), (2, 5, HIDDEN_DIM), {}),
    "TopKRouter": (
        TopKRouter,
        dict(num_experts=8, top_k=2, score_function="sigmoid", expert_groups=4,
             top_groups=2, bias_update_rate=0.01, noisy_gating=True),
        (6, HIDDEN_DIM),
        dict(select_outputs=routing_outputs, expected_output_shape=[(6, 2), (6, 2)]),
    ),
    "ExpertChoiceRouter": (
        ExpertChoiceRouter, dict(num_experts=4, noisy_gating=True), (6, HIDDEN_DIM),
        dict(select_outputs=list, expected_output_shape=[(6, 4)] * 3),  # logits, scores, probs
    ),
    "HierarchicalRouter": (
        HierarchicalRouter, dict(num_groups=2, experts_per_group=3, top_groups=2, top_k=2),
        (6, HIDDEN_DIM),  # top_k experts in each of the top_groups groups
        dict(select_outputs=routing_outputs, expected_output_shape=[(6, 4), (6, 4)]),
    ),
    "SparseMoE": (
        SparseMoE,
        dict(num_experts=8, intermediate_dim=4, top_k=2, score_function="sigmoid",
             expert_groups=4, top_groups=2, bias_update_rate=0.01, capacity_factor=1.0),
        (2, 5, HIDDEN_DIM), {},
    ),
    "SharedExpertMoE": (
        SharedExpertMoE,
        dict(num_experts=4, intermediate_dim=4, num_shared_experts=2,
             shared_expert_gate=True, bias_update_rate=0.01, score_function="sigmoid"),
        (2, 5, HIDDEN_DIM), {},
    ),
    "HierarchicalMoE": (
        HierarchicalMoE,
        dict(num_groups=2, experts_per_group=2, intermediate_dim=4, top_groups=2,
             z_loss_weight=0.01),
        (2, 5, HIDDEN_DIM), {},
    ),
    "SoftMoE": (SoftMoE, dict(num_experts=2, intermediate_dim=4, slots_per_expert=2),
                (2, 5, HIDDEN_DIM), {}),
}


def test_every_public_layer_has_a_saving_case():
    # Router base classes without a `call` of their own are interfaces.
    public = {
        name
        for name, value in vars(moe_layers).items()
        if isinstance(value, type) and issubclass(value, keras.layers.Layer)
        and value.call is not keras.layers.Layer.call
    }
    assert public == set(LAYER_CASES)


def biases_moved(layer):
    """Saving must keep balancing biases: none may be left at zero."""
    if isinstance(layer, TopKRouter):  # alone, a router is not trained here
        layer.expert_bias.assign(np.linspace(-0.1, 0.1, 8).astype("float32"))
    biases = [w for w in layer.weights if w.name == "expert_bias"]
    assert all(np.abs(to_numpy(bias)).max() > 0 for bias in biases)


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_every_layer_round_trips_through_a_safe_keras_file(name, tmp_path):
    layer_class, init_kwargs, shape, options = LAYER_CASES[name]
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    run_layer_test(layer_class, init_kwargs, x, before_saving=biases_moved,
                   tmp_path=tmp_path, **options)


def test_every_preset_has_a_saving_case():
    assert sorted(TINY_PRESET_OVERRIDES) == presets.names()


# Presets of one family differ only in sizes and options, which the layers'
# own saving cases cover on every backend; all presets run under PyTorch,
# whose eager building is the fastest, one per family elsewhere.
PRESETS_PER_BACKEND = (
    sorted(TINY_PRESET_OVERRIDES)
    if keras.backend.backend() == "torch"
    else ["deepseek_v3", "mixtral_small", "switch_small"]
)


@pytest.mark.parametrize("name", PRESETS_PER_BACKEND)
def test_every_preset_round_trips_through_keras_files_and_presets(name, tmp_path):
    run_preset_test(name, tmp_path=tmp_path)
