"""Saving: every layer and every preset round-trips through a `.keras` file
in safe mode (and presets through `save_to_preset`), balancing bias
included, with the same weights and bit-identical outputs."""

import warnings

import keras
import keras_hub
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
from testing import tiny_preset
from testing import to_numpy
from testing import token_batch

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
    # top_k=3: 30 choices over 4 experts, a mean load of 7.5 that no expert
    # can equal, so every balancing bias moves in the training call (with
    # top_k=2 an expert at exactly the mean keeps its bias at zero).
    "SharedExpertMoE": (
        SharedExpertMoE,
        dict(num_experts=4, intermediate_dim=4, top_k=3, num_shared_experts=2,
             shared_expert_gate=True, bias_update_rate=0.01, score_function="sigmoid",
             expert_dropout=0.1),
        (2, 5, HIDDEN_DIM), {},
    ),
    "HierarchicalMoE": (
        HierarchicalMoE,
        dict(num_groups=2, experts_per_group=2, intermediate_dim=4, top_groups=2,
             z_loss_weight=0.01),
        (2, 5, HIDDEN_DIM), {},
    ),
    "SoftMoE": (SoftMoE, dict(num_experts=2, intermediate_dim=4, slots_per_expert=2,
                              expert_dropout=0.1),
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
    # Switch encoder-decoder presets are saved in test_switch_transformers.py.
    decoder_only = [
        name for name in presets.names()
        if "encoder_sparse_step" not in presets.config(name)
    ]
    assert sorted(TINY_PRESET_OVERRIDES) == decoder_only


# Presets of one family differ only in sizes and options, which the layers'
# own saving cases cover on every backend; all presets run under PyTorch,
# whose eager building is the fastest, one per family elsewhere.
PRESETS_PER_BACKEND = (
    sorted(TINY_PRESET_OVERRIDES)
    if keras.backend.backend() == "torch"
    else ["deepseek_v3", "gpt_oss_small", "llama4_scout", "mixtral_small",
          "switch_decoder_small"]
)


@pytest.mark.parametrize("name", PRESETS_PER_BACKEND)
def test_every_preset_round_trips_through_keras_files_and_presets(name, tmp_path):
    run_preset_test(name, tmp_path=tmp_path)


# A compiled `MoECausalLM`: the optimizer (and its state), the loss and the
# sampler come back with `load_model`, and `fit` resumes where it stopped.


def _train_batch():
    batch = token_batch(batch=4, length=10, vocabulary_size=64, seed=4)
    return batch, np.roll(batch["token_ids"], -1, axis=1)


def _fit(model, epochs=1):
    x, y = _train_batch()
    history = model.fit(x, y, batch_size=2, epochs=epochs, shuffle=False, verbose=0)
    return history.history["loss"]


@pytest.mark.parametrize(
    "lora_targets, quantized",
    [(None, False), (["query", "value", "experts"], False), (["experts"], True)],
    ids=["full", "lora", "int8-lora"],
)
def test_load_model_keeps_optimizer_sampler_and_resumes_fit(
    lora_targets, quantized, tmp_path
):
    model = tiny_preset("mixtral_small")
    if quantized:
        with pytest.warns(UserWarning):  # layers without `quantize`
            model.quantize("int8")
    if lora_targets:
        model.backbone.enable_lora(2, target_layer_names=lora_targets)
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3, weight_decay=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler=keras_hub.samplers.TopKSampler(k=5, seed=1),
    )
    _fit(model)
    path = tmp_path / "model.keras"
    model.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = keras.saving.load_model(path, safe_mode=True)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "compile()" in m or "optimizer" in m], messages

    optimizer = restored.optimizer
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.get_config() == model.optimizer.get_config()
    assert type(restored.sampler) is keras_hub.samplers.TopKSampler
    assert restored.sampler.k == 5
    assert type(restored.loss) is keras.losses.SparseCategoricalCrossentropy
    # The LoRA state: the same trainable variables, the optimizer's state
    # (Adam moments, iterations) for each, and identical outputs.
    assert [v.path for v in restored.trainable_variables] == [
        v.path for v in model.trainable_variables
    ]
    if lora_targets:
        assert all("lora" in v.path for v in restored.trainable_variables)
    assert len(optimizer.variables) == len(model.optimizer.variables)
    for saved, loaded in zip(model.optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(to_numpy(loaded), to_numpy(saved))
    assert int(to_numpy(optimizer.iterations)) == 2
    x, _ = _train_batch()
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(model(x)))
    # The same sampler, seeded alike: the same generated tokens.
    prompt = {"token_ids": np.pad(x["token_ids"][:1, :3], ((0, 0), (0, 5))),
              "padding_mask": np.arange(8)[None] < 3}
    np.testing.assert_array_equal(
        to_numpy(restored.generate(prompt, stop_token_ids=None)["token_ids"]),
        to_numpy(model.generate(prompt, stop_token_ids=None)["token_ids"]),
    )

    # Training resumes with the same numbers as the original model.
    np.testing.assert_allclose(_fit(restored, 2), _fit(model, 2), rtol=1e-6)
    for saved, loaded in zip(model.weights, restored.weights):
        np.testing.assert_allclose(
            to_numpy(loaded), to_numpy(saved), rtol=1e-6, atol=1e-7, err_msg=saved.path
        )


def test_lora_state_from_other_targets_or_ranks_fails_naming_the_layer(tmp_path):
    model = tiny_preset("mixtral_small")
    model.backbone.enable_lora(2, target_layer_names=["experts"])
    path = str(tmp_path / "lora.weights.h5")
    model.save_weights(path)
    other_targets = tiny_preset("mixtral_small")
    other_targets.backbone.enable_lora(2, target_layer_names=["query"])
    with pytest.raises(ValueError, match="The saved LoRA state has no variable"):
        other_targets.load_weights(path)
    other_rank = tiny_preset("mixtral_small")
    other_rank.backbone.enable_lora(3, target_layer_names=["experts"])
    with pytest.raises(ValueError, match=r"The saved LoRA state of '.*experts.*' has shape"):
        other_rank.load_weights(path)
    with pytest.raises(ValueError, match="must be a dict from `get_compile_config"):
        model.compile_from_config("adam")


def test_load_model_of_a_model_compiled_but_never_trained(tmp_path):
    # Its optimizer was never built: it loads as it was saved, and `fit`
    # then builds it as usual.
    model = tiny_preset("mixtral_small")
    model.compile(optimizer=keras.optimizers.SGD(0.5), sampler="greedy")
    path = tmp_path / "model.keras"
    model.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = keras.saving.load_model(path)
    assert not [str(w.message) for w in caught if "optimizer" in str(w.message)]
    assert isinstance(restored.optimizer, keras.optimizers.SGD)
    assert type(restored.sampler) is keras_hub.samplers.GreedySampler
    assert np.isfinite(_fit(restored)).all()
