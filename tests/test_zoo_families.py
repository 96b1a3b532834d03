"""OLMoE, GLM-4.5 and DBRX checkpoints: loading, export and generation.

One harness for the three families: a tiny random checkpoint is made with
transformers for each, with settings under which each family's mechanisms
change the outputs (q/k/v clipping that is reached, partial RoPE, q/k
norm, group-limited sigmoid routing, ...; `test_mechanisms_change_the_outputs`
checks that they do). keras-moe must give transformers' logits on a padded
batch, export back to the same tensors bit for bit, and generate with its
KV cache what full forward passes give.
"""

import json
import re
import warnings

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import COMMON  # noqa: E402
from testing.hf_checkpoints import TOLERANCE  # noqa: E402
from testing.hf_checkpoints import VOCABULARY_SIZE  # noqa: E402
from testing.hf_checkpoints import assert_same_tensors  # noqa: E402
from testing.hf_checkpoints import copy_checkpoint  # noqa: E402
from testing.hf_checkpoints import greedy_continuation  # noqa: E402
from testing.hf_checkpoints import keras_logits  # noqa: E402
from testing.hf_checkpoints import max_difference  # noqa: E402
from testing.hf_checkpoints import padded_batch  # noqa: E402
from testing.hf_checkpoints import randomize_weights  # noqa: E402
from testing.hf_checkpoints import rewrite_tensors  # noqa: E402
from testing.hf_checkpoints import transformers_logits  # noqa: E402

from testing import reload_keras_file  # noqa: E402

from keras_moe import convert  # noqa: E402
from keras_moe import presets  # noqa: E402
from keras_moe.convert import ConversionError  # noqa: E402
from keras_moe.models import MoEBackbone  # noqa: E402

# Each family's tiny config, and the changes that switch off one of its
# mechanisms (each must change transformers' logits, or the test of that
# mechanism would prove nothing).
CONFIGS = {
    # Projection-wide q/k norm, clipping that is reached, 4 KV heads of 2.
    "olmoe": (
        lambda **changes: transformers.OlmoeConfig(
            **{
                **COMMON,
                "num_hidden_layers": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 8,
                "num_experts": 8,
                "num_experts_per_tok": 3,
                "clip_qkv": 0.8,
                **changes,
            }
        ),
        {"clip_qkv": {"clip_qkv": None}},
    ),
    # Partial RoPE, per-head q/k norm, q/k/v biases, a dense first layer,
    # sigmoid routing limited to 1 of 2 groups, scaled, a shared expert.
    "glm4_moe": (
        lambda **changes: transformers.Glm4MoeConfig(
            **{
                **COMMON,
                "num_hidden_layers": 3,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "intermediate_size": 32,
                "moe_intermediate_size": 8,
                "n_routed_experts": 8,
                "n_shared_experts": 1,
                "num_experts_per_tok": 2,
                "n_group": 2,
                "topk_group": 1,
                "routed_scaling_factor": 2.5,
                "first_k_dense_replace": 1,
                "attention_bias": True,
                "use_qk_norm": True,
                "partial_rotary_factor": 0.5,
                "rope_theta": 10000.0,
                **changes,
            }
        ),
        {
            "partial_rotary_factor": {"partial_rotary_factor": 1.0},
            "group-limited routing": {"topk_group": 2},
        },
    ),
    # Fused Wqkv clipped where it is reached, LayerNorm, 8 experts top-3
    # with their weights divided by their 1-norm, 2 KV heads of 4.
    "dbrx": (
        lambda **changes: transformers.DbrxConfig(
            d_model=16,
            n_heads=4,
            n_layers=2,
            vocab_size=VOCABULARY_SIZE,
            max_seq_len=64,
            tie_word_embeddings=False,
            attn_config={
                "kv_n_heads": 2,
                "clip_qkv": changes.get("clip_qkv", 0.8),
                "rope_theta": 10000.0,
            },
            ffn_config={
                "ffn_hidden_size": 8,
                "moe_num_experts": 8,
                "moe_top_k": 3,
                "moe_normalize_expert_weights": changes.get("p_norm", 1.0),
            },
        ),
        # (transformers 5.25's DBRX fails without a clip_qkv: a huge one.)
        {"clip_qkv": {"clip_qkv": 1e6}, "weight normalisation": {"p_norm": None}},
    ),
}
FAMILIES = tuple(CONFIGS)


def make_model(family, **changes):
    torch.manual_seed(0)
    config_factory, _ = CONFIGS[family]
    model = transformers.AutoModelForCausalLM.from_config(config_factory(**changes))
    model.eval()
    randomize_weights(model)
    # Norm scales near 1 whatever their name (DBRX: `norm_1`, `norm_f`).
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.ndim == 1:
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`{family: (directory, reference logits)}`, made once per module."""
    token_ids, padding_mask = padded_batch()
    made = {}
    for family in FAMILIES:
        model = make_model(family)
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        made[family] = (directory, transformers_logits(model, token_ids, padding_mask))
    return made


@pytest.mark.parametrize("family", FAMILIES)
def test_mechanisms_change_the_outputs(checkpoints, family):
    _, expected = checkpoints[family]
    token_ids, padding_mask = padded_batch()
    for mechanism, changes in CONFIGS[family][1].items():
        logits = transformers_logits(
            make_model(family, **changes), token_ids, padding_mask
        )
        assert max_difference(logits, expected, padding_mask) > 1e-2, mechanism


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
    directory, expected = checkpoints[family]
    token_ids, padding_mask = padded_batch()
    model = presets.load(directory, preprocessor=None)
    logits = keras_logits(model, token_ids, padding_mask)
    assert np.abs(expected).max() > 1.0  # Not a vanishing signal.
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_is_bit_identical(checkpoints, family, tmp_path):
    directory, expected = checkpoints[family]
    model = presets.load(directory, preprocessor=None)
    assert convert.infer_model_type(model.backbone) == family
    convert.to_transformers(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert_same_tensors(
        reloaded, transformers.AutoModelForCausalLM.from_pretrained(directory)
    )
    # The exported config.json describes the same computation.
    token_ids, padding_mask = padded_batch()
    logits = transformers_logits(reloaded.eval(), token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_keras_file_reloads_to_the_same_logits(checkpoints, tmp_path):
    # DBRX: LayerNorm blocks and clipped attention (one file, to stay fast).
    directory, expected = checkpoints["dbrx"]
    model = presets.load(directory, preprocessor=None)
    reloaded = reload_keras_file(model, tmp_path)
    token_ids, padding_mask = padded_batch()
    logits = keras_logits(reloaded, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_backbone_config_round_trips(checkpoints, family):
    directory, _ = checkpoints[family]
    config = json.loads((directory / "config.json").read_text())
    backbone_config = convert.backbone_config_from_transformers(config)
    backbone = MoEBackbone(**backbone_config)
    rebuilt = MoEBackbone.from_config(backbone.get_config())
    assert rebuilt.get_config() == backbone.get_config()
    for key, value in backbone_config.items():
        assert getattr(rebuilt, key) == value, key
    attention = rebuilt.transformer_layers[0].attention
    assert attention.get_config() == type(attention).from_config(
        attention.get_config()
    ).get_config()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_is_greedy_decoding_of_full_passes(checkpoints, family):
    directory, _ = checkpoints[family]
    causal_lm = presets.load(directory, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    token_ids = np.array([[3, 9, 4, 0, 0, 0, 0], [5, 1, 0, 0, 0, 0, 0]], "int32")
    padding_mask = token_ids > 0
    generated = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    generated = keras.ops.convert_to_numpy(generated["token_ids"])
    np.testing.assert_array_equal(
        generated, greedy_continuation(causal_lm, token_ids, padding_mask)
    )


def test_olmoe_refuses_an_output_projection_bias(checkpoints, tmp_path):
    directory, _ = checkpoints["olmoe"]
    config = json.loads((directory / "config.json").read_text())
    config["attention_bias"] = True
    with pytest.raises(ConversionError, match="attention_bias"):
        convert.backbone_config_from_transformers(config)


def test_glm_reads_the_top_level_rope_fields_of_released_configs(checkpoints):
    directory, _ = checkpoints["glm4_moe"]
    config = json.loads((directory / "config.json").read_text())
    rope_parameters = config.pop("rope_parameters")
    # zai-org/GLM-4.5's config.json spells them at the top level.
    released = {
        **config,
        "rope_theta": rope_parameters["rope_theta"],
        "partial_rotary_factor": rope_parameters["partial_rotary_factor"],
        "rope_scaling": None,
    }
    assert convert.backbone_config_from_transformers(
        released
    ) == convert.backbone_config_from_transformers(
        {**config, "rope_parameters": rope_parameters}
    )
    # transformers' default when neither form gives the factor.
    assert convert.backbone_config_from_transformers(config)[
        "partial_rotary_factor"
    ] == 0.5
    with pytest.raises(ConversionError, match="partial_rotary_factor"):
        convert.backbone_config_from_transformers(
            {**config, "partial_rotary_factor": 1.5}
        )


def test_glm_multi_token_prediction_layer_is_skipped(checkpoints, tmp_path):
    directory, expected = checkpoints["glm4_moe"]
    directory = copy_checkpoint(directory, tmp_path / "with_mtp")
    config = json.loads((directory / "config.json").read_text())
    mtp = f"model.layers.{config['num_hidden_layers']}"

    def add_mtp_layer(tensors):
        tensors[f"{mtp}.eh_proj.weight"] = np.ones((16, 32), "float32")
        tensors[f"{mtp}.enorm.weight"] = np.ones((16,), "float32")
        tensors[f"{mtp}.mlp.gate.weight"] = np.ones((8, 16), "float32")

    rewrite_tensors(directory, add_mtp_layer)
    token_ids, padding_mask = padded_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = presets.load(directory, preprocessor=None)
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_dbrx_reads_the_nested_config_of_the_released_checkpoint(checkpoints):
    directory, _ = checkpoints["dbrx"]
    config = json.loads((directory / "config.json").read_text())
    # databricks/dbrx-base's config.json: no rope_parameters, the RoPE base
    # in attn_config, moe_normalize_expert_weights left to its default (1).
    released = {
        key: value
        for key, value in config.items()
        if key not in ("rope_parameters", "num_key_value_heads")
    }
    released["ffn_config"] = {
        key: value
        for key, value in config["ffn_config"].items()
        if key != "moe_normalize_expert_weights"
    }
    assert convert.backbone_config_from_transformers(
        released
    ) == convert.backbone_config_from_transformers(config)
    backbone_config = convert.backbone_config_from_transformers(config)
    assert backbone_config["clip_qkv"] == 0.8
    assert backbone_config["norm_type"] == "layer"
    assert backbone_config["num_key_value_heads"] == 2


def test_dbrx_refuses_a_p_norm_other_than_one(checkpoints):
    directory, _ = checkpoints["dbrx"]
    config = json.loads((directory / "config.json").read_text())
    config["ffn_config"]["moe_normalize_expert_weights"] = 2.0
    with pytest.raises(ConversionError, match="moe_normalize_expert_weights"):
        convert.backbone_config_from_transformers(config)


@pytest.mark.parametrize(
    "family, other, setting",
    [
        ("olmoe", "qwen3_moe", "qk_norm_per_head=False"),
        ("glm4_moe", "qwen2_moe", "partial_rotary_factor=0.5"),
        ("dbrx", "mixtral", "clip_qkv=0.8"),
    ],
)
def test_other_families_refuse_what_they_cannot_hold(
    checkpoints, family, other, setting, tmp_path
):
    directory, _ = checkpoints[family]
    model = presets.load(directory, preprocessor=None)
    with pytest.raises(ConversionError, match=re.escape(setting)):
        convert.to_transformers(model, tmp_path / "exported", model_type=other)


def test_dbrx_bfloat16_fused_tensors_round_trip_bit_exact(tmp_path):
    # Row ranges of fused tensors are read by byte offset: check them in a
    # 2-byte dtype too.
    source = make_model("dbrx").to(torch.bfloat16)
    source.save_pretrained(tmp_path / "source")
    model = presets.load(tmp_path / "source", preprocessor=None, dtype="bfloat16")
    convert.to_transformers(model, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", dtype=torch.bfloat16
    )
    source_state = source.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, source_state[name]), name


TINY_GQA = dict(
    vocabulary_size=32, num_layers=1, hidden_dim=16, num_query_heads=4,
    num_experts=4, top_k=2, moe_intermediate_dim=8,
)
TINY_MLA = dict(
    TINY_GQA, attention_type="mla", kv_lora_rank=8, qk_nope_head_dim=4,
    qk_rope_head_dim=4, v_head_dim=4,
)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(TINY_GQA, partial_rotary_factor=1.5), "must be in (0, 1]"),
        (dict(TINY_GQA, partial_rotary_factor=0.0), "partial_rotary_factor"),
        # int(4 * 0.3) = 1 feature: RoPE rotates pairs.
        (dict(TINY_GQA, partial_rotary_factor=0.3), "even number of rotated"),
        (dict(TINY_GQA, clip_qkv=-1.0), "clip_qkv"),
        (dict(TINY_GQA, norm_type="batch"), "`norm_type` must be one of"),
        (dict(TINY_MLA, clip_qkv=8.0), "['clip_qkv'] only apply to"),
        (dict(TINY_MLA, qk_norm_per_head=False), "['qk_norm_per_head'] only"),
    ],
)
def test_bad_attention_and_norm_options_are_named(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MoEBackbone(**arguments)


@pytest.mark.parametrize(
    "family, change, message",
    [
        ("olmoe", {"head_dim": 8}, "only head_dim = hidden_size // num_attention_heads"),
        ("glm4_moe", {"n_shared_experts": 0}, "at least one shared expert"),
    ],
)
def test_configs_the_families_cannot_reproduce_are_named(
    checkpoints, family, change, message
):
    directory, _ = checkpoints[family]
    config = {**json.loads((directory / "config.json").read_text()), **change}
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert.backbone_config_from_transformers(config)
