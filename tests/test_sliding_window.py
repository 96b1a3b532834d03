"""Sliding-window attention: masks, cached decoding, checkpoints.

Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints with a `sliding_window`
shorter than the batch's sequences give transformers' logits (with
padding), and export writes the window back. The mask is checked against
a loop over positions, and cached decoding against the full forward pass
with windows shorter than the decoded length.
"""

import json
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.models import GroupedQueryAttention
from keras_moe.models import MoEBackbone
from keras_moe.models.attention_masks import attention_mask

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from test_convert import CONFIGS  # noqa: E402
from testing.hf_checkpoints import TOLERANCE  # noqa: E402
from testing.hf_checkpoints import keras_logits  # noqa: E402
from testing.hf_checkpoints import max_difference  # noqa: E402
from testing.hf_checkpoints import padded_batch  # noqa: E402
from testing.hf_checkpoints import randomize_weights  # noqa: E402
from testing.hf_checkpoints import transformers_logits  # noqa: E402

from keras_moe import convert  # noqa: E402

WINDOW = 3
# A window of 3 positions on a batch of 9: every layer type matters.
WINDOWED = {
    "mixtral": dict(sliding_window=WINDOW),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW),
    # Sliding on the even layers below max_window_layers: layer 0 only.
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
}
# TensorFlow runs every family; JAX and PyTorch run Qwen2-MoE, whose layers
# hold both kinds of attention (the families differ only in their
# conversion, which is backend-independent NumPy).
FAMILIES = (
    tuple(WINDOWED) if keras.backend.backend() == "tensorflow" else ("qwen2_moe",)
)


@pytest.fixture(scope="module")
def windowed_checkpoints(tmp_path_factory):
    token_ids, padding_mask = padded_batch()
    made = {}
    for family in FAMILIES:
        fields = CONFIGS[family]().to_dict()
        fields.pop("layer_types", None)  # transformers derives it again.
        config = type(CONFIGS[family]()).from_dict({**fields, **WINDOWED[family]})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        randomize_weights(model)
        directory = tmp_path_factory.mktemp(f"{family}_window")
        model.save_pretrained(directory)
        made[family] = (directory, transformers_logits(model, token_ids, padding_mask))
    return made


def test_mask_matches_a_loop_over_positions():
    length, start, window = 5, 3, 2
    keys = start + length
    padding = np.ones((1, keys), bool)
    padding[0, 1] = False
    mask = ops.convert_to_numpy(
        attention_mask(length, keys, start, padding, sliding_window=window)
    )[0]
    for query in range(length):
        position = start + query
        for key in range(keys):
            visible = key <= position and key > position - window and padding[0, key]
            assert mask[query, key] == visible, (query, key)


@pytest.mark.parametrize("family", FAMILIES)
def test_windowed_checkpoint_gives_transformers_logits(windowed_checkpoints, family):
    directory, expected = windowed_checkpoints[family]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sliding_window.*")
        model = convert.from_transformers(directory, preprocessor=None)
    assert model.backbone.sliding_window == WINDOW
    token_ids, padding_mask = padded_batch()
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_qwen2_moe_slides_on_the_layers_transformers_does(windowed_checkpoints):
    directory, _ = windowed_checkpoints["qwen2_moe"]
    model = convert.from_transformers(directory, preprocessor=None)
    types = model.backbone.attention_layer_types
    assert types == ["sliding_attention", "full_attention", "full_attention"]
    blocks = model.backbone.transformer_layers
    assert [block.attention.sliding_window for block in blocks] == [WINDOW, None, None]


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_the_window_back(windowed_checkpoints, family, tmp_path):
    directory, expected = windowed_checkpoints[family]
    model = convert.from_transformers(directory, preprocessor=None)
    convert.to_transformers(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((directory / "config.json").read_text())
    assert written["sliding_window"] == WINDOW
    if family != "mixtral":
        assert written["use_sliding_window"] is True
    if family == "qwen2_moe":
        assert written["layer_types"] == source["layer_types"]
    # Bit-identical weights both ways, and transformers' logits again.
    again = convert.from_transformers(tmp_path / "out", preprocessor=None)
    for before, after in zip(model.backbone.weights, again.backbone.weights):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(before), ops.convert_to_numpy(after)
        )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reloaded.eval()
    token_ids, padding_mask = padded_batch()
    logits = transformers_logits(reloaded, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def attention_layer(**options):
    layer = GroupedQueryAttention(
        num_query_heads=4, num_key_value_heads=2, use_bias=True, **options
    )
    layer.build((None, None, 16))
    return layer


def test_cached_decoding_matches_full_forward_with_short_windows():
    # A window of 2 with sinks and an output bias; prompt of 3, then the
    # decoded positions drop keys from their window one by one.
    keras.utils.set_random_seed(3)
    layer = attention_layer(sliding_window=2, use_sinks=True, use_output_bias=True)
    x = np.random.default_rng(7).normal(size=(2, 6, 16)).astype("float32")
    expected = ops.convert_to_numpy(layer(x))
    cache = np.zeros((2,) + layer.cache_shape(6), "float32")
    outputs, cache = layer(x[:, :3], cache=cache, cache_update_index=0)
    steps = [ops.convert_to_numpy(outputs)]
    for index in range(3, 6):
        outputs, cache = layer(
            x[:, index : index + 1], cache=cache, cache_update_index=index
        )
        steps.append(ops.convert_to_numpy(outputs))
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1), expected, atol=1e-5, rtol=1e-5
    )


def test_window_changes_only_what_lies_beyond_it():
    # The first `window` positions see the same keys with and without it.
    keras.utils.set_random_seed(4)
    full = attention_layer()
    windowed = attention_layer(sliding_window=3)
    windowed.set_weights(full.get_weights())
    x = np.random.default_rng(8).normal(size=(1, 8, 16)).astype("float32")
    a, b = (ops.convert_to_numpy(layer(x)) for layer in (full, windowed))
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert np.abs(a[:, 3:] - b[:, 3:]).max() > 1e-3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sliding_window=0), "sliding_window"),
        (dict(attention_layer_types=["full_attention"] * 3), "num_layers=2"),
        (
            dict(sliding_window=4, attention_layer_types=["sliding", "full"]),
            "sliding_attention",
        ),
        (
            dict(attention_layer_types=["sliding_attention", "full_attention"]),
            "need a `sliding_window`",
        ),
        (dict(swiglu_limit=7.0), "go together"),
        (
            dict(swiglu_alpha=1.7, swiglu_limit=7.0, ffn_activation="gelu"),
            "ffn_activation='silu'",
        ),
    ],
)
def test_bad_window_and_swiglu_arguments_are_named(overrides, message):
    config = dict(
        vocabulary_size=32, num_layers=2, hidden_dim=16, num_query_heads=4,
        num_experts=2, top_k=1, moe_intermediate_dim=8,
    )
    with pytest.raises(ValueError, match=message):
        MoEBackbone(**{**config, **overrides})


def test_window_options_are_refused_for_latent_attention():
    with pytest.raises(ValueError, match="attention_type='gqa'"):
        MoEBackbone(
            vocabulary_size=32, num_layers=1, hidden_dim=16, num_query_heads=2,
            attention_type="mla", kv_lora_rank=8, qk_nope_head_dim=4,
            qk_rope_head_dim=4, v_head_dim=4, num_experts=2, top_k=1,
            moe_intermediate_dim=8, attention_sinks=True,
        )


def test_a_shorter_layer_type_list_is_a_repeated_pattern():
    backbone = MoEBackbone(
        vocabulary_size=32, num_layers=4, hidden_dim=16, num_query_heads=4,
        num_experts=2, top_k=1, moe_intermediate_dim=8, sliding_window=2,
        attention_layer_types=["sliding_attention", "full_attention"],
    )
    windows = [block.attention.sliding_window for block in backbone.transformer_layers]
    assert windows == [2, None, 2, None]
    assert backbone.get_config()["attention_layer_types"] == [
        "sliding_attention", "full_attention"
    ] * 2
