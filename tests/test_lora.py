"""LoRA on `MoEBackbone`: default targets in every attention type, errors
that name the target, and `.lora.h5` files for every target."""

import numpy as np
import pytest

import testing
from testing import to_numpy
from testing import token_batch


def _lora_model(name, targets=None, rank=2, seed=0):
    model = testing.tiny_preset(name, seed=seed)
    model.backbone.enable_lora(rank, target_layer_names=targets)
    return model


@pytest.mark.parametrize(
    "name, q_lora_rank, expected",
    [
        ("mixtral_small", None, {"query", "value"}),
        ("deepseek_small", 8, {"q_b_proj", "kv_b_proj"}),
        ("deepseek_v2_lite", None, {"q_proj", "kv_b_proj"}),
    ],
)
def test_default_targets_exist_in_every_attention_type_and_train(name, q_lora_rank, expected):
    model = _lora_model(name)
    assert model.backbone.q_lora_rank == q_lora_rank
    trainable = model.trainable_weights
    # One (A, B) pair per default target per layer, and nothing else.
    layers = {w.path.split("/")[-2] for w in trainable}
    assert layers == expected
    assert len(trainable) == 2 * len(expected) * model.backbone.num_layers
    assert all("lora_kernel_" in w.path for w in trainable)
    # The adaptation reaches the outputs (B starts at zero: nothing moves).
    batch = token_batch()
    before = to_numpy(model(batch))
    for weight in trainable:
        weight.assign(np.full(weight.shape, 0.1, "float32"))
    assert not np.allclose(to_numpy(model(batch)), before, atol=1e-4)


def test_target_names_that_match_nothing_raise_naming_them():
    model = testing.tiny_preset("deepseek_small")
    # keras-hub's own defaults: GQA names, absent from latent attention.
    with pytest.raises(ValueError, match=r"no layer with LoRA support: \['query'\]") as error:
        model.backbone.enable_lora(2, target_layer_names=["query", "kv_b_proj"])
    assert "'kv_b_proj'" in str(error.value) and "'experts'" in str(error.value)
    with pytest.raises(ValueError, match="must be a list of layer names"):
        model.backbone.enable_lora(2, target_layer_names="experts")
    with pytest.raises(ValueError, match="`rank` must be an integer >= 1"):
        model.backbone.enable_lora(0)
    assert not model.trainable_weights or not any(
        "lora" in w.path for w in model.weights
    )


@pytest.mark.parametrize(
    "name, targets",
    [
        ("mixtral_small", None),
        ("mixtral_small", ["experts"]),
        ("deepseek_small", None),
        ("deepseek_small", ["experts", "shared_experts", "feedforward", "o_proj"]),
    ],
)
def test_lora_weights_save_and_load_for_every_target(name, targets, tmp_path):
    model = _lora_model(name, targets)
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(scale=0.1, size=weight.shape).astype("float32"))
    batch = token_batch()
    outputs = to_numpy(model(batch))
    path = str(tmp_path / "adapter.lora.h5")
    model.backbone.save_lora_weights(path)

    # A fresh model with the same base weights: loading enables LoRA on the
    # layers the file was saved from, then restores the factors.
    fresh = testing.tiny_preset(name)
    assert not np.allclose(to_numpy(fresh(batch)), outputs)
    fresh.backbone.load_lora_weights(path)
    assert sorted(w.path for w in fresh.trainable_weights) == sorted(
        w.path for w in model.trainable_weights
    )
    np.testing.assert_allclose(to_numpy(fresh(batch)), outputs, rtol=1e-5, atol=1e-5)

    other_rank = _lora_model(name, targets, rank=3)
    with pytest.raises(ValueError, match="rank=2"):
        other_rank.backbone.load_lora_weights(path)
    # LoRA on more layers than the file holds: the first missing one is named.
    saved_targets = targets or model.backbone.default_lora_layer_names()
    extra = "experts" if targets is None else "kv_b_proj" if "deepseek" in name else "query"
    wider = _lora_model(name, saved_targets + [extra])
    with pytest.raises(ValueError, match="has no LoRA weights for layer"):
        wider.backbone.load_lora_weights(path)


def test_lora_state_survives_presets_unmerged(tmp_path):
    # `save_to_preset` / `presets.load`: LoRA comes back enabled on the same
    # layers, with the base kernels and factors as they were (unmerged), so
    # fine-tuning continues from the same point.
    model = _lora_model("deepseek_small", ["kv_b_proj", "experts"])
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(scale=0.1, size=weight.shape).astype("float32"))
    restored = testing.reload_preset(model, tmp_path)
    assert restored.backbone.get_config()["lora_target_layer_names"] == [
        "kv_b_proj", "experts"
    ]
    assert [w.path for w in restored.trainable_weights] == [
        w.path for w in model.trainable_weights
    ]
    for saved, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(to_numpy(loaded), to_numpy(saved), err_msg=saved.path)
