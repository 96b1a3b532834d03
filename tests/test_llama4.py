"""Llama 4 text checkpoints: loading, export and generation.

A tiny random `Llama4ForCausalLM` is made with transformers with every
Llama 4 mechanism on and reached: chunks of 3 tokens in batches of 9,
NoPE layers (every second layer), the weightless q/k norm, attention
temperature tuning with a floor scale of 2, llama3 RoPE scaling, dense
layers between MoE layers, and top-1 sigmoid routing that weighs the
experts' inputs. `test_mechanisms_change_the_outputs` checks that turning
each one off changes transformers' logits, so the comparisons below would
fail without it.
"""

import json
import warnings

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from testing.hf_checkpoints import TOLERANCE  # noqa: E402
from testing.hf_checkpoints import VOCABULARY_SIZE  # noqa: E402
from testing.hf_checkpoints import assert_same_tensors  # noqa: E402
from testing.hf_checkpoints import greedy_continuation  # noqa: E402
from testing.hf_checkpoints import keras_logits  # noqa: E402
from testing.hf_checkpoints import max_difference  # noqa: E402
from testing.hf_checkpoints import padded_batch  # noqa: E402
from testing.hf_checkpoints import randomize_weights  # noqa: E402
from testing.hf_checkpoints import transformers_logits  # noqa: E402

from keras_moe import convert  # noqa: E402
from keras_moe import presets  # noqa: E402
from keras_moe.convert import ConversionError  # noqa: E402

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 4,
}
SETTINGS = dict(
    vocab_size=VOCABULARY_SIZE,
    hidden_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=8,
    intermediate_size_mlp=12,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
    attention_chunk_size=3,
    no_rope_layer_interval=2,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=2,
    attn_scale=0.5,
    rope_parameters=LLAMA3_ROPE,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)
# Changes that switch off one mechanism each.
MECHANISMS = {
    "chunked attention": {"attention_chunk_size": None},
    "NoPE layers": {"no_rope_layers": [1, 1, 1, 1]},
    "q/k norm": {"use_qk_norm": False},
    "temperature tuning": {"attn_temperature_tuning": False},
    "llama3 RoPE": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}


def make_model(**changes):
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(**{**SETTINGS, **changes})
    config._attn_implementation = "eager"
    model = transformers.Llama4ForCausalLM(config).eval()
    randomize_weights(model)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`(directory, reference logits)` of the tiny checkpoint."""
    token_ids, padding_mask = padded_batch()
    model = make_model()
    directory = tmp_path_factory.mktemp("llama4_text")
    model.save_pretrained(directory)
    return directory, transformers_logits(model, token_ids, padding_mask)


def test_mechanisms_change_the_outputs(checkpoint):
    _, expected = checkpoint
    token_ids, padding_mask = padded_batch()
    for mechanism, changes in MECHANISMS.items():
        logits = transformers_logits(make_model(**changes), token_ids, padding_mask)
        assert max_difference(logits, expected, padding_mask) > 1e-2, mechanism


def test_logits_match_transformers(checkpoint):
    directory, expected = checkpoint
    token_ids, padding_mask = padded_batch()
    model = presets.load(directory, preprocessor=None)
    backbone = model.backbone
    assert backbone.nope_layers == [1, 3] and backbone.moe_layers == [1, 3]
    assert backbone.attention_layer_types == ["chunked_attention", "full_attention"] * 2
    logits = keras_logits(model, token_ids, padding_mask)
    assert np.abs(expected).max() > 1.0  # Not a vanishing signal.
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_weighting_the_expert_inputs_matters(checkpoint):
    # Llama 4 multiplies the token by its routing weight before the expert;
    # weighting the expert's output instead gives other logits.
    directory, expected = checkpoint
    token_ids, padding_mask = padded_batch()
    model = convert.from_transformers(
        directory, preprocessor=None, moe_options={"routing_weights_on": "outputs"}
    )
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) > 1e-2


def test_multimodal_llama4_config_loads_its_text_model(checkpoint, tmp_path):
    # A `Llama4ForConditionalGeneration` checkpoint: the text settings in
    # `text_config` (here with transformers 4's top-level `rope_theta` and
    # `rope_scaling`), the text tensors under `language_model.`, and vision
    # tensors that are not converted.
    directory, expected = checkpoint
    text = json.loads((directory / "config.json").read_text())
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text,
        "vision_config": {"model_type": "llama4_vision_model"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(directory / "model.safetensors")
    tensors = {f"language_model.{name}": value for name, value in tensors.items()}
    tensors["vision_model.patch_embedding.weight"] = np.ones((2, 2), "float32")
    save_file(tensors, tmp_path / "model.safetensors", {"format": "pt"})
    token_ids, padding_mask = padded_batch()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model = convert.from_transformers(tmp_path, preprocessor=None)
    # Every tensor of the text model is used; vision tensors are not text.
    assert not [r for r in records if "checkpoint" in str(r.message).lower()]
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE
    with pytest.raises(ConversionError, match="llama4_text"):
        convert.to_transformers(model, tmp_path / "out", model_type="llama4")


def test_export_round_trip_is_bit_identical(checkpoint, tmp_path):
    directory, expected = checkpoint
    model = presets.load(directory, preprocessor=None)
    convert.to_transformers(model, tmp_path / "exported", model_type="llama4_text")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == "llama4_text"
    reloaded = transformers.Llama4ForCausalLM.from_pretrained(
        tmp_path / "exported", attn_implementation="eager"
    ).eval()
    assert_same_tensors(
        reloaded, transformers.Llama4ForCausalLM.from_pretrained(directory)
    )
    # The exported config.json describes the same computation.
    token_ids, padding_mask = padded_batch()
    logits = transformers_logits(reloaded, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_cached_generation_is_greedy_decoding_of_full_passes(checkpoint):
    # Chunks of 3 tokens, 9 positions: decoding crosses two chunk borders.
    directory, _ = checkpoint
    causal_lm = presets.load(directory, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    token_ids = np.zeros((2, 9), "int32")
    token_ids[0, :2] = [3, 9]
    token_ids[1, :1] = [5]
    padding_mask = token_ids > 0
    generated = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    generated = keras.ops.convert_to_numpy(generated["token_ids"])
    np.testing.assert_array_equal(
        generated, greedy_continuation(causal_lm, token_ids, padding_mask)
    )


def test_unsupported_rope_scaling_is_named(checkpoint, tmp_path):
    directory, _ = checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ConversionError, match="rope_type='dynamic'"):
        convert.backbone_config_from_transformers(config)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"attention_layer_types": ["chunked_attention", "full_attention"]},
            "need an `attention_chunk_size`",
        ),
        ({"attention_chunk_size": 0}, "attention_chunk_size"),
        ({"nope_layers": [2]}, "nope_layers"),
        ({"attention_temperature_floor_scale": 0}, "attention_temperature_floor_scale"),
        ({"attention_chunk_size": 4, "sliding_window": 4}, "which layers slide"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_backbone_names_a_bad_llama4_option(options, message):
    from keras_moe.models import MoEBackbone

    with pytest.raises(ValueError, match=message):
        MoEBackbone(
            vocabulary_size=8, num_layers=2, hidden_dim=8, num_query_heads=2,
            num_experts=2, top_k=1, moe_intermediate_dim=4, **options,
        )


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    "rope_scaling, message",
    [
        ({**LLAMA3, "beta_fast": 32.0}, "Unknown llama3 `rope_scaling` keys"),
        ({**LLAMA3, "high_freq_factor": 0.5}, "high_freq_factor >= low_freq_factor"),
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'yarn' or 'llama3'"),
    ],
)
def test_rope_scaling_names_what_is_wrong(rope_scaling, message):
    from keras_moe.models.rope_scaling import normalize_gqa_rope_scaling

    with pytest.raises(ValueError, match=message):
        normalize_gqa_rope_scaling(rope_scaling)


def test_llama3_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from keras_moe.models.rope_scaling import llama3_inverse_frequencies

    config = transformers.Llama4TextConfig(
        **{**SETTINGS, "rope_parameters": {**LLAMA3, "rope_theta": 10000.0}}
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    frequencies = llama3_inverse_frequencies(LLAMA3, 8, 10000.0)
    np.testing.assert_allclose(frequencies, expected.numpy(), rtol=1e-6)
    assert not np.allclose(frequencies, 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8))


def test_routing_weights_on_is_checked():
    from keras_moe.layers import SparseMoE

    with pytest.raises(ValueError, match="`routing_weights_on` must be one of"):
        SparseMoE(4, 8, routing_weights_on="middle")
    with pytest.raises(ValueError, match="applies to token-choice routing"):
        SparseMoE(
            4, 8, routing="expert_choice", routing_weights_on="inputs",
            capacity_factor=1.0,
        )
