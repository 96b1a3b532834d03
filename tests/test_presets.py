"""Presets: names, configs, parameter counts, loading, training, saving, errors.

Models built here are shrunk with overrides (fewer layers, shorter sequences)
wherever the test is not about the preset's own size, to keep the suite fast
on a small CPU.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from script_backends import runs_on
from keras_moe import presets
from keras_moe.models import memory
from testing import reload_keras_file

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_PRESETS = [
    "deepseek_small", "gpt_oss_small", "mixtral_small", "switch_decoder_small",
]
FULL_SIZE_PRESETS = [
    "dbrx",
    "deepseek_v2",
    "deepseek_v2_lite",
    "deepseek_v3",
    "glm_4_5",
    "glm_4_5_air",
    "gpt_oss_120b",
    "gpt_oss_20b",
    "grok_1",
    "llama4_maverick",
    "llama4_scout",
    "mixtral_8x22b",
    "mixtral_8x7b",
    "olmoe_1b_7b",
    "switch_decoder_base_8",
]
# Switch Transformer encoder-decoders (`SwitchEncoderDecoderBackbone`),
# tested in test_switch_transformers.py.
ENCODER_DECODER_PRESETS = [
    "switch_base_128",
    "switch_base_16",
    "switch_base_256",
    "switch_base_32",
    "switch_base_64",
    "switch_base_8",
    "switch_c_2048",
    "switch_large_128",
    "switch_t5_small",
    "switch_xxl_128",
]
PUBLISHED_PRESETS = [
    "dbrx",
    "deepseek_v2",
    "deepseek_v2_lite",
    "deepseek_v3",
    "glm_4_5",
    "glm_4_5_air",
    "gpt_oss_120b",
    "gpt_oss_20b",
    "llama4_maverick",
    "llama4_scout",
    "mixtral_8x22b",
    "mixtral_8x7b",
    "olmoe_1b_7b",
]
# Published counts given to two digits (1.3B, 12B): up to 2% is rounding.
TWO_DIGIT_COUNTS = ("glm_4_5_air", "llama4_maverick", "llama4_scout", "olmoe_1b_7b")
# Published totals that include a part the preset leaves out: Llama 4
# Scout's 109B counts its vision encoder (the text model is 107.8B).
TOTAL_TOLERANCE = {"llama4_scout": 0.02}
GIB = 1024**3


def models():
    from keras_moe import models

    return models


def test_names_lists_every_preset_file_sorted():
    assert presets.names() == sorted(
        SMALL_PRESETS + FULL_SIZE_PRESETS + ENCODER_DECODER_PRESETS
    )
    files = sorted(path.stem for path in (REPO_ROOT / "presets").glob("*.json"))
    assert presets.names() == files


@pytest.mark.parametrize("name", sorted(SMALL_PRESETS + FULL_SIZE_PRESETS))
def test_each_preset_record_is_complete(name):
    record = presets.info(name)
    assert record["name"] == name
    assert len(record["description"]) > 40
    assert record["reference"].startswith("https://")
    backbone_config = presets.config(name)
    assert backbone_config == record["backbone"]
    for key in ("vocabulary_size", "num_layers", "hidden_dim"):
        assert isinstance(backbone_config[key], int), key
    # Every key is a `MoEBackbone` argument.
    assert set(backbone_config) <= backbone_arguments()
    # `config` and `info` hand out copies.
    backbone_config["num_layers"] = -1
    record["backbone"]["moe_options"]["top_groups"] = -1
    assert presets.config(name)["num_layers"] > 0
    assert presets.config(name)["moe_options"].get("top_groups") != -1
    training = presets.info(name)["training"]
    assert training["sequence_length"] > 0 and training["batch_size"] > 0
    assert training["learning_rate"] > 0
    if name in SMALL_PRESETS:
        assert record["tokenizer"] == "byte"
        assert "published" not in record
    else:
        assert "tokenizer" not in record
        assert record["notes"], "full-size presets say what they reproduce"


def backbone_arguments():
    import inspect

    parameters = inspect.signature(models().MoEBackbone.__init__).parameters
    return {name for name in parameters if name not in ("self", "kwargs")}


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_small_presets_fit_the_byte_tokenizer(name):
    tokenizer = models().MoETokenizer()
    vocabulary_size = presets.config(name)["vocabulary_size"]
    assert vocabulary_size == tokenizer.vocabulary_size()


def test_small_presets_have_their_documented_routing():
    switch = presets.config("switch_decoder_small")
    assert (switch["top_k"], switch["ffn_activation"], switch["ffn_gated"]) == (
        1,
        "relu",
        False,
    )
    assert switch["moe_layer_frequency"] == 2
    assert switch["moe_options"] == {
        **switch["moe_options"],
        "capacity_factor": 1.25,
        "eval_capacity_factor": 2.0,
        "jitter": 0.01,
        "normalize_top_k": False,
    }
    mixtral = presets.config("mixtral_small")
    assert (
        mixtral["num_layers"],
        mixtral["hidden_dim"],
        mixtral["num_query_heads"],
        mixtral["num_key_value_heads"],
        mixtral["num_experts"],
        mixtral["top_k"],
        mixtral["moe_intermediate_dim"],
    ) == (4, 256, 8, 2, 8, 2, 512)
    assert mixtral["moe_options"]["capacity_factor"] == 1.25
    assert mixtral["moe_options"]["eval_capacity_factor"] is None
    deepseek = presets.config("deepseek_small")
    assert deepseek["attention_type"] == "mla"
    assert deepseek["first_k_dense"] == 1
    assert deepseek["num_shared_experts"] in (1, 2)
    options = deepseek["moe_options"]
    assert options["score_function"] == "sigmoid"
    assert options["bias_update_rate"] == 0.001
    assert options["top_groups"] < options["expert_groups"]
    assert options["routed_scaling_factor"] > 1


# The published configurations (REFERENCES), field by field.
PUBLISHED_SHAPES = {
    "mixtral_8x7b": dict(
        hidden_dim=4096, num_layers=32, num_query_heads=32,
        num_key_value_heads=8, moe_intermediate_dim=14336, num_experts=8,
        top_k=2, vocabulary_size=32000, rope_max_wavelength=1e6,
        tie_word_embeddings=False,
    ),
    "mixtral_8x22b": dict(
        hidden_dim=6144, num_layers=56, num_query_heads=48,
        num_key_value_heads=8, moe_intermediate_dim=16384, num_experts=8,
        top_k=2, vocabulary_size=32000, rope_max_wavelength=1e6,
    ),
    "deepseek_v2": dict(
        hidden_dim=5120, num_layers=60, num_query_heads=128,
        moe_intermediate_dim=1536, intermediate_dim=12288, num_experts=160,
        num_shared_experts=2, top_k=6, attention_type="mla", q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_k_dense=1, vocabulary_size=102400,
    ),
    "gpt_oss_20b": dict(
        hidden_dim=2880, num_layers=24, num_query_heads=64,
        num_key_value_heads=8, head_dim=64, moe_intermediate_dim=2880,
        num_experts=32, top_k=4, vocabulary_size=201088, sliding_window=128,
        attention_sinks=True, swiglu_limit=7.0, rope_max_wavelength=150000.0,
    ),
    "gpt_oss_120b": dict(
        hidden_dim=2880, num_layers=36, num_query_heads=64,
        num_key_value_heads=8, head_dim=64, moe_intermediate_dim=2880,
        num_experts=128, top_k=4, vocabulary_size=201088, sliding_window=128,
        attention_sinks=True, swiglu_limit=7.0, rope_max_wavelength=150000.0,
    ),
    "llama4_scout": dict(
        hidden_dim=5120, num_layers=48, num_query_heads=40,
        num_key_value_heads=8, head_dim=128, intermediate_dim=16384,
        moe_intermediate_dim=8192, num_experts=16, top_k=1,
        num_shared_experts=1, vocabulary_size=202048,
        attention_chunk_size=8192, use_qk_l2_norm=True,
        nope_layers=list(range(3, 48, 4)),
    ),
    "llama4_maverick": dict(
        hidden_dim=5120, num_layers=48, num_query_heads=40,
        num_key_value_heads=8, head_dim=128, intermediate_dim=16384,
        moe_intermediate_dim=8192, num_experts=128, top_k=1,
        num_shared_experts=1, moe_layer_frequency=2, vocabulary_size=202048,
        attention_chunk_size=8192, nope_layers=list(range(3, 48, 4)),
    ),
    "grok_1": dict(
        hidden_dim=6144, num_layers=64, num_query_heads=48,
        num_key_value_heads=8, head_dim=128, moe_intermediate_dim=32768,
        num_experts=8, top_k=2, vocabulary_size=131072, ffn_activation="gelu",
        ffn_gated=True, tie_word_embeddings=True,
    ),
    "deepseek_v2_lite": dict(
        hidden_dim=2048, num_layers=27, num_query_heads=16,
        moe_intermediate_dim=1408, intermediate_dim=10944, num_experts=64,
        num_shared_experts=2, top_k=6, attention_type="mla", q_lora_rank=None,
        kv_lora_rank=512, first_k_dense=1, vocabulary_size=102400,
    ),
    "deepseek_v3": dict(
        hidden_dim=7168, num_layers=61, num_query_heads=128,
        moe_intermediate_dim=2048, intermediate_dim=18432, num_experts=256,
        num_shared_experts=1, top_k=8, attention_type="mla", q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_k_dense=3, vocabulary_size=129280,
    ),
    "dbrx": dict(
        hidden_dim=6144, num_layers=40, num_query_heads=48,
        num_key_value_heads=8, moe_intermediate_dim=10752, num_experts=16,
        top_k=4, vocabulary_size=100352, rope_max_wavelength=5e5,
        clip_qkv=8.0, norm_type="layer", tie_word_embeddings=False,
    ),
    "glm_4_5": dict(
        hidden_dim=5120, num_layers=92, num_query_heads=96,
        num_key_value_heads=8, head_dim=128, attention_bias=True,
        use_qk_norm=True, partial_rotary_factor=0.5, intermediate_dim=12288,
        moe_intermediate_dim=1536, num_experts=160, num_shared_experts=1,
        top_k=8, first_k_dense=3, vocabulary_size=151552,
        rope_max_wavelength=1e6,
    ),
    "glm_4_5_air": dict(
        hidden_dim=4096, num_layers=46, num_query_heads=96,
        num_key_value_heads=8, head_dim=128, attention_bias=True,
        use_qk_norm=False, partial_rotary_factor=0.5, intermediate_dim=10944,
        moe_intermediate_dim=1408, num_experts=128, num_shared_experts=1,
        top_k=8, first_k_dense=1, vocabulary_size=151552,
        rope_max_wavelength=1e6,
    ),
    "olmoe_1b_7b": dict(
        hidden_dim=2048, num_layers=16, num_query_heads=16,
        num_key_value_heads=16, moe_intermediate_dim=1024, num_experts=64,
        top_k=8, vocabulary_size=50304, use_qk_norm=True,
        qk_norm_per_head=False, tie_word_embeddings=False,
    ),
    "switch_decoder_base_8": dict(
        hidden_dim=768, num_query_heads=12, intermediate_dim=3072,
        moe_intermediate_dim=3072, ffn_activation="relu", ffn_gated=False,
        num_experts=8, top_k=1, moe_layer_frequency=2, vocabulary_size=32128,
    ),
}


@pytest.mark.parametrize("name", FULL_SIZE_PRESETS)
def test_full_size_presets_have_the_published_shapes(name):
    backbone_config = presets.config(name)
    for key, value in PUBLISHED_SHAPES[name].items():
        assert backbone_config[key] == value, key


def test_deepseek_v3_routes_like_the_paper():
    options = presets.config("deepseek_v3")["moe_options"]
    assert options == {
        **options,
        "score_function": "sigmoid",
        "expert_groups": 8,
        "top_groups": 4,
        "routed_scaling_factor": 2.5,
        "bias_update_rate": 0.001,
        "normalize_top_k": True,
        "capacity_factor": None,
    }


def test_deepseek_v2_routes_like_its_checkpoint():
    # config.json: topk_method group_limited_greedy, n_group 8, topk_group 3,
    # routed_scaling_factor 16.0, norm_topk_prob false, scoring softmax.
    options = presets.config("deepseek_v2")["moe_options"]
    assert options == {
        **options,
        "score_function": "softmax",
        "expert_groups": 8,
        "top_groups": 3,
        "group_score": "max",
        "routed_scaling_factor": 16.0,
        "normalize_top_k": False,
        "capacity_factor": None,
    }


def test_grok_1_count_matches_its_published_total():
    # xAI published the total (314B) and "25% of the weights active on a
    # given token", not an active count.
    published = presets.info("grok_1")["published"]
    assert published["active_params"] is None
    counts = presets.count_params("grok_1")
    assert abs(counts["total"] / published["total_params"] - 1) < 0.01
    assert round(counts["active"] / counts["total"], 2) == 0.27


@pytest.mark.parametrize("name", PUBLISHED_PRESETS)
def test_count_params_matches_the_published_counts(name):
    published = presets.info(name)["published"]
    counts = presets.count_params(
        name,
        active_embedding=published["active_params_include_embedding"],
        active_head=published.get("active_params_include_head", True),
    )
    total_error = abs(counts["total"] / published["total_params"] - 1)
    active_error = abs(counts["active"] / published["active_params"] - 1)
    assert total_error < TOTAL_TOLERANCE.get(name, 0.01)
    if name.startswith("deepseek"):
        assert active_error < 0.03
    else:
        assert active_error < (0.02 if name in TWO_DIGIT_COUNTS else 0.01)


def test_count_params_exact_known_totals():
    # Mixtral-8x7B's checkpoint holds exactly 46,702,792,704 weights.
    assert presets.count_params("mixtral_8x7b")["total"] == 46_702_792_704
    # DeepSeek-V3: "36.6B activated, including 0.9B for the output head".
    active = presets.count_params("deepseek_v3", active_embedding=False)
    assert round(active["active"] / 1e9, 1) == 36.6


def test_active_embedding_only_changes_untied_active_counts():
    untied = presets.count_params("mixtral_8x7b")
    without = presets.count_params("mixtral_8x7b", active_embedding=False)
    assert without["total"] == untied["total"]
    assert untied["active"] - without["active"] == 32000 * 4096
    tied = presets.count_params("switch_decoder_base_8")
    assert presets.count_params("switch_decoder_base_8", active_embedding=False) == tied


def test_active_head_leaves_out_the_untied_output_head():
    with_head = presets.count_params("mixtral_8x7b", active_embedding=False)
    without = presets.count_params(
        "mixtral_8x7b", active_embedding=False, active_head=False
    )
    assert without["total"] == with_head["total"]
    assert with_head["active"] - without["active"] == 4096 * 32000
    # Tied: the one table is left out only when neither is counted.
    tied = presets.count_params("switch_decoder_base_8")
    assert presets.count_params("switch_decoder_base_8", active_head=False) == tied
    neither = presets.count_params(
        "switch_decoder_base_8", active_embedding=False, active_head=False
    )
    assert tied["active"] - neither["active"] == 32128 * 768


def test_count_params_accepts_names_configs_and_records():
    by_name = presets.count_params("mixtral_small")
    assert presets.count_params(presets.config("mixtral_small")) == by_name
    assert presets.count_params(presets.info("mixtral_small")) == by_name
    serialized = {
        "class_name": "MoEBackbone",
        "config": presets.config("mixtral_small"),
    }
    assert presets.count_params(serialized) == by_name


# Small configurations covering every family of weights the formula counts.
TINY = dict(vocabulary_size=37, hidden_dim=16, num_query_heads=2)
FAMILIES = {
    "gqa_untied_moe_every_layer": dict(
        num_layers=2, num_key_value_heads=1, num_experts=4, top_k=2,
        moe_intermediate_dim=8,
    ),
    "gqa_tied_plain_relu_every_other_layer_noisy": dict(
        num_layers=3, num_experts=4, top_k=1, moe_intermediate_dim=8,
        intermediate_dim=12, moe_layer_frequency=2, ffn_activation="relu",
        ffn_gated=False, tie_word_embeddings=True,
        moe_options={"noisy_gating": True, "jitter": 0.01},
    ),
    "gqa_qkv_bias_qk_norm_head_dim_gated_shared_expert": dict(
        num_layers=2, num_query_heads=4, num_key_value_heads=2, head_dim=6,
        attention_bias=True, use_qk_norm=True, num_experts=6, top_k=3,
        moe_intermediate_dim=4, num_shared_experts=1,
        shared_intermediate_dim=20, shared_expert_gate=True,
        moe_options={"normalize_top_k": False},
    ),
    "gqa_sinks_all_biases_clamped_swiglu_sliding": dict(
        num_layers=2, num_query_heads=4, num_key_value_heads=2,
        attention_bias=True, attention_output_bias=True, attention_sinks=True,
        sliding_window=3, attention_layer_types=["sliding_attention", "full_attention"],
        num_experts=4, top_k=2, moe_intermediate_dim=8, swiglu_alpha=1.702,
        swiglu_limit=7.0, moe_options={"use_bias": True, "router_bias": True},
    ),
    "mla_q_lora_first_dense_shared_bias_balancing": dict(
        num_layers=3, attention_type="mla", q_lora_rank=12, kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=6,
        intermediate_dim=24, num_experts=8, top_k=2, moe_intermediate_dim=4,
        num_shared_experts=1, first_k_dense=1,
        moe_options={
            "score_function": "sigmoid", "expert_groups": 4, "top_groups": 2,
            "bias_update_rate": 0.001, "routed_scaling_factor": 2.5,
        },
    ),
    "mla_no_q_lora_two_shared_mixed_pattern": dict(
        num_layers=5, attention_type="mla", kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
        intermediate_dim=20, num_experts=4, top_k=2, moe_intermediate_dim=6,
        num_shared_experts=2, first_k_dense=1, moe_layer_frequency=2,
    ),
    "explicit_moe_layers_rope_interleave": dict(
        num_layers=4, attention_type="mla", kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
        rope_interleave=False, intermediate_dim=20, num_experts=4, top_k=2,
        moe_intermediate_dim=6, moe_layers=[0, 3],
    ),
    "expert_biases": dict(
        num_layers=1, num_experts=3, top_k=1, moe_intermediate_dim=5,
        moe_options={"use_bias": True},
    ),
}


def active_from_weights(model, backbone_config):
    """Every weight, minus the routed experts a token does not use."""
    top_k = backbone_config["top_k"]
    num_experts = backbone_config["num_experts"]
    active = 0
    for weight in model.weights:
        size = math.prod(weight.shape)
        if "/moe/experts/" in weight.path:
            size = size * top_k // num_experts
        active += size
    return active


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_count_params_formula_equals_a_built_model(family):
    backbone_config = {**TINY, **FAMILIES[family]}
    backbone = models().MoEBackbone(**backbone_config)
    model = models().MoECausalLM(backbone=backbone, preprocessor=None)
    counts = presets.count_params(backbone_config)
    assert counts["total"] == backbone.count_params() == model.count_params()
    assert counts["active"] == active_from_weights(model, backbone_config)
    # The built backbone's own config counts the same.
    assert presets.count_params(backbone.get_config()) == counts


# Each full-size preset shrunk to a few small layers of the same structure.
SHRINK = dict(
    vocabulary_size=50, hidden_dim=32, num_query_heads=4, intermediate_dim=24,
    moe_intermediate_dim=8,
)
SHRINK_BY_PRESET = {
    "mixtral_8x7b": dict(num_layers=2, num_key_value_heads=2, head_dim=8),
    "mixtral_8x22b": dict(num_layers=2, num_key_value_heads=2, head_dim=8),
    "switch_decoder_base_8": dict(num_layers=4, num_key_value_heads=4, head_dim=8),
    "olmoe_1b_7b": dict(num_layers=2, num_key_value_heads=2, num_experts=16),
    "dbrx": dict(num_layers=2, num_key_value_heads=2, num_experts=4, top_k=2),
    "glm_4_5": dict(
        num_layers=4, num_key_value_heads=2, head_dim=8, num_experts=16,
    ),
    "glm_4_5_air": dict(
        num_layers=2, num_key_value_heads=2, head_dim=8, num_experts=16,
    ),
    "grok_1": dict(num_layers=2, num_key_value_heads=2, head_dim=8),
    "llama4_scout": dict(
        num_layers=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        shared_intermediate_dim=8, nope_layers=[3],
    ),
    "llama4_maverick": dict(
        num_layers=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        shared_intermediate_dim=8, nope_layers=[3],
    ),
    "gpt_oss_20b": dict(
        num_layers=2, num_key_value_heads=2, head_dim=8, num_experts=8,
        attention_layer_types=["sliding_attention", "full_attention"],
    ),
    "gpt_oss_120b": dict(
        num_layers=2, num_key_value_heads=2, head_dim=8, num_experts=8,
        attention_layer_types=["sliding_attention", "full_attention"],
    ),
    "deepseek_v2": dict(
        num_layers=3, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=4, v_head_dim=4, num_experts=16,
    ),
    "deepseek_v2_lite": dict(
        num_layers=3, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
        v_head_dim=4, num_experts=16,
    ),
    "deepseek_v3": dict(
        num_layers=5, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=4, v_head_dim=4, num_experts=16, top_k=4,
    ),
}


@pytest.mark.parametrize("name", FULL_SIZE_PRESETS)
def test_count_params_formula_equals_shrunk_full_size_presets(name):
    overrides = {**SHRINK, **SHRINK_BY_PRESET[name]}
    model = presets.load(name, preprocessor=None, **overrides)
    backbone_config = {**presets.config(name), **overrides}
    counts = presets.count_params(backbone_config)
    assert model.count_params() == counts["total"]
    assert counts["active"] == active_from_weights(model, backbone_config)


# Small presets: build, train, save, reload, generate.


@pytest.fixture(scope="module", params=SMALL_PRESETS)
def trained_small_preset(request, tmp_path_factory):
    """A small preset, shrunk to 2 layers and 24 tokens, fitted 2 steps."""
    name = request.param
    keras.utils.set_random_seed(0)
    model = presets.load(name, num_layers=2)
    model.preprocessor.sequence_length = 24
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    texts = ["def add(a, b):\n    return a + b\n"] * 4
    history = model.fit(texts, batch_size=4, epochs=2, verbose=0)
    return name, model, history, tmp_path_factory.mktemp(name)


def test_small_presets_build_at_full_size_with_exact_counts():
    for name in SMALL_PRESETS:
        model = presets.load(name)
        assert model.count_params() == presets.count_params(name)["total"]
        assert model.preprocessor is not None
        assert model.preprocessor.sequence_length == (
            presets.info(name)["training"]["sequence_length"]
        )


def test_small_preset_loss_falls_in_two_steps(trained_small_preset):
    _, _, history, _ = trained_small_preset
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert losses[1] < losses[0]


def token_inputs(model):
    x, _, _ = model.preprocessor(["print('hi')", "x = [1, 2]"])
    return {key: np.asarray(value) for key, value in x.items()}


def logits_of(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs, training=False))


def test_small_preset_keras_file_reloads_to_identical_logits(
    trained_small_preset,
):
    name, model, _, directory = trained_small_preset
    inputs = token_inputs(model)
    logits = logits_of(model, inputs)
    assert logits.shape == (2, 24, presets.config(name)["vocabulary_size"])
    reloaded = reload_keras_file(model, directory, name)
    np.testing.assert_array_equal(logits_of(reloaded, inputs), logits)


def test_small_preset_saved_to_preset_loads_back(trained_small_preset):
    name, model, _, directory = trained_small_preset
    inputs = token_inputs(model)
    logits = logits_of(model, inputs)
    preset_dir = directory / "preset"
    model.save_to_preset(str(preset_dir))
    reloaded = presets.load(preset_dir)
    assert type(reloaded) is type(model)
    assert reloaded.preprocessor is not None
    np.testing.assert_array_equal(logits_of(reloaded, inputs), logits)
    assert presets.load(str(preset_dir), preprocessor=None).preprocessor is None


def test_small_preset_generates_text(trained_small_preset):
    _, model, _, _ = trained_small_preset
    output = model.generate("def ", max_length=12)
    assert isinstance(output, str)
    assert output.startswith("def ")
    batch = model.generate(["a", "b"], max_length=6)
    assert len(batch) == 2 and all(isinstance(text, str) for text in batch)


def test_preprocessor_none_gives_a_token_id_model():
    model = presets.load("mixtral_small", preprocessor=None, num_layers=1)
    assert model.preprocessor is None
    token_ids = np.array([[256, 100, 101, 102]], "int32")
    padding_mask = np.ones_like(token_ids)
    logits = model({"token_ids": token_ids, "padding_mask": padding_mask})
    assert tuple(logits.shape) == (1, 4, 259)


def test_overrides_change_the_backbone_config():
    model = presets.load(
        "mixtral_small",
        preprocessor=None,
        num_layers=1,
        hidden_dim=64,
        moe_options={"capacity_factor": 2.0},
    )
    backbone_config = model.backbone.get_config()
    assert backbone_config["num_layers"] == 1
    assert backbone_config["hidden_dim"] == 64
    # `moe_options` merge into the preset's options.
    assert backbone_config["moe_options"]["capacity_factor"] == 2.0
    assert backbone_config["moe_options"]["aux_loss_weight"] == 0.02


# The memory guard.


def test_full_size_preset_refuses_to_build_without_memory(monkeypatch):
    monkeypatch.setattr(
        memory, "available_memory", lambda: ("this machine", 16 * GIB)
    )
    with pytest.raises(presets.PresetTooLargeError) as error_info:
        presets.load("mixtral_8x7b")
    error = error_info.value
    assert isinstance(error, MemoryError)
    total = presets.count_params("mixtral_8x7b")["total"]
    assert error.needed_bytes == 4 * total
    assert error.available_bytes == 16 * GIB
    message = str(error)
    assert f"{total:,} parameters" in message
    assert f"{4 * total / GIB:,.1f} GiB" in message and "float32" in message
    assert "16.0 GiB" in message
    for advice in ("bfloat16", "ModelParallel", "get_layout_map", "devices"):
        assert advice in message


def test_memory_guard_counts_the_requested_dtype(monkeypatch):
    monkeypatch.setattr(
        memory, "available_memory", lambda: ("this machine", 16 * GIB)
    )
    total = presets.count_params("deepseek_v3")["total"]
    with pytest.raises(presets.PresetTooLargeError, match="bfloat16") as info:
        presets.load("deepseek_v3", dtype="bfloat16")
    assert info.value.needed_bytes == 2 * total
    assert f"{2 * total / GIB:,.1f} GiB" in str(info.value)


def test_memory_guard_lets_small_and_unchecked_loads_through(monkeypatch):
    monkeypatch.setattr(
        memory, "available_memory", lambda: ("this machine", 1 * GIB)
    )
    presets.load("switch_decoder_small", preprocessor=None, num_layers=1)
    # The full-size check runs on the shrunk config, which fits.
    presets.load(
        "mixtral_8x7b",
        preprocessor=None,
        **{**SHRINK, **SHRINK_BY_PRESET["mixtral_8x7b"]},
    )
    monkeypatch.setattr(
        memory, "available_memory", lambda: ("this machine", 1024)
    )
    with pytest.raises(presets.PresetTooLargeError):
        presets.load("switch_decoder_small", preprocessor=None, num_layers=1)
    presets.load(
        "switch_decoder_small", preprocessor=None, num_layers=1, check_memory=False
    )


def test_available_memory_is_read_from_the_system(monkeypatch):
    host = memory.host_memory_bytes()
    assert host is None or host > 0
    where, free_bytes = memory.available_memory()
    assert free_bytes > 0
    if memory.accelerator_memory_bytes() is None:
        assert where == "this machine"
        # Free memory moves between two reads (other processes allocate);
        # the same source read twice agrees to within a few percent.
        assert abs(free_bytes - host) <= 0.05 * host
        # The wiring itself, with a reading that cannot move.
        monkeypatch.setattr(memory, "host_memory_bytes", lambda: 12_345)
        assert memory.available_memory() == ("this machine", 12_345)


# Bad input.


def test_unknown_preset_name_lists_close_matches():
    with pytest.raises(ValueError, match="preset 'mixtral_smal'") as error:
        presets.load("mixtral_smal")
    assert "Did you mean 'mixtral_small'" in str(error.value)
    with pytest.raises(ValueError, match="'deepseek_v3'"):
        presets.config("deepseek-v3")
    with pytest.raises(ValueError, match="Available presets: dbrx, deepseek_small"):
        presets.count_params("gpt4")


def test_unknown_override_key_is_named():
    with pytest.raises(ValueError, match="'num_layer'") as error:
        presets.load("mixtral_small", num_layer=2)
    assert "did you mean 'num_layers'" in str(error.value)
    with pytest.raises(ValueError, match="'capacity_factor'"):
        presets.load("mixtral_small", capacity_factor=2.0)


def test_bad_preprocessor_argument():
    with pytest.raises(ValueError, match="preprocessor"):
        presets.load("mixtral_small", preprocessor="byte")


@pytest.fixture(scope="module")
def saved_preset_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "preset"
    model = presets.load("mixtral_small", num_layers=1)
    model.save_to_preset(str(directory))
    return directory


def copy_without(source, destination, missing):
    shutil.copytree(source, destination)
    (destination / missing).unlink()
    return destination


@pytest.mark.parametrize("missing", ["config.json", "model.weights.h5"])
def test_directory_missing_files_names_them(
    saved_preset_dir, tmp_path, missing
):
    directory = copy_without(saved_preset_dir, tmp_path / "preset", missing)
    with pytest.raises(FileNotFoundError, match=re.escape(f"`{missing}`")):
        presets.load(directory)


def test_empty_and_nonexistent_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        presets.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a preset name"):
        presets.load(str(tmp_path / "no" / "such" / "dir"))


def test_hugging_face_directory_is_not_read_as_a_keras_preset(tmp_path):
    # A transformers `config.json` goes to checkpoint conversion (or is
    # refused where there is none), whose error names the model type.
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
        )
    )
    with pytest.raises(
        (NotImplementedError, ValueError), match="model_type='mixtral'"
    ):
        presets.load(tmp_path)


def test_directory_rejects_architecture_overrides(saved_preset_dir):
    with pytest.raises(ValueError, match="'num_layers'"):
        presets.load(saved_preset_dir, num_layers=2)


def test_directory_memory_guard(saved_preset_dir, monkeypatch):
    monkeypatch.setattr(
        memory, "available_memory", lambda: ("this machine", 1024)
    )
    with pytest.raises(presets.PresetTooLargeError, match="parameters"):
        presets.load(saved_preset_dir)


# Packaging.


@pytest.mark.slow
def test_wheel_ships_the_preset_files(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for entry in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / entry, source / entry)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for entry in ("keras_moe", "presets"):
        shutil.copytree(REPO_ROOT / entry, source / entry, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for name in presets.names():
        assert f"keras_moe/presets/data/{name}.json" in shipped


# The example.


@runs_on("torch")
def test_train_lm_example_runs_fast(tmp_path):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "train_lm.py"), "--fast",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert f"Backend: {keras.backend.backend()}" in output
    assert "Python standard library source" in output
    for label in (
        "Validation loss before training",
        "Validation loss after training",
    ):
        match = re.search(rf"{label}: (\d+\.\d+)", output)
        assert match, f"{label!r} not printed:\n{output[-3000:]}"
        assert math.isfinite(float(match.group(1)))
    assert "Sample from generate()" in output
    assert (tmp_path / "mixtral_small.keras").is_file()
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents*"))


@runs_on("tensorflow")
def test_train_lm_example_reads_given_text_files(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "train_lm.py"), "--fast",
         "--preset", "switch_decoder_small", "--text-files", str(text_file),
         "--output-dir", str(tmp_path / "out"), "--sample-length", "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 file(s) given" in result.stdout
    assert (tmp_path / "out" / "switch_decoder_small.keras").is_file()
