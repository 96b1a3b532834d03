"""Hugging Face checkpoints: conversion matches transformers, export round-trips.

Each family gets a tiny random checkpoint written by `transformers` (CPU
torch, whatever the Keras backend), with weights large enough that routing
is decisive, and a batch with padding. TensorFlow runs every family; JAX and
PyTorch run Mixtral (the conversion code is backend-independent NumPy).
"""

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.numpy")

from keras_moe import convert  # noqa: E402
from keras_moe import presets  # noqa: E402
from keras_moe.convert import ConversionError  # noqa: E402
from testing.hf_checkpoints import TOLERANCE  # noqa: E402
from testing.hf_checkpoints import VOCABULARY_SIZE  # noqa: E402
from testing.hf_checkpoints import assert_same_tensors  # noqa: E402
from testing.hf_checkpoints import copy_checkpoint  # noqa: E402
from testing.hf_checkpoints import keras_logits  # noqa: E402
from testing.hf_checkpoints import max_difference  # noqa: E402
from testing.hf_checkpoints import padded_batch  # noqa: E402
from testing.hf_checkpoints import randomize_weights  # noqa: E402
from testing.hf_checkpoints import rewrite_tensors  # noqa: E402
from testing.hf_checkpoints import transformers_logits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
FAMILIES = (
    ALL_FAMILIES if keras.backend.backend() == "tensorflow" else ("mixtral",)
)
COMMON = dict(
    vocab_size=VOCABULARY_SIZE,
    hidden_size=16,
    num_attention_heads=4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=6,
    intermediate_size=32,
    moe_intermediate_size=8,
    first_k_dense_replace=1,
    num_hidden_layers=3,
)


def yarn(factor, original, mscale, mscale_all_dim):
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }


CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON,
        intermediate_size=24,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=10000.0,
    ),
    # A dense layer from `mlp_only_layers`, a gated shared expert, q/k/v bias,
    # top-k weights not renormalised.
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        num_hidden_layers=3,
        num_key_value_heads=2,
        intermediate_size=32,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    # Per-head q/k norm, head_dim != hidden_size // heads, every 2nd layer
    # MoE (`decoder_sparse_step`), renormalised top-k.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        norm_topk_prob=True,
    ),
    # MLA without a query LoRA, YaRN RoPE (with cos/sin scaled: mscale !=
    # mscale_all_dim), greedy softmax routing times a scaling factor, two
    # shared experts.
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **COMMON,
        **MLA,
        max_position_embeddings=256,
        rope_parameters=yarn(factor=8.0, original=32, mscale=1.0, mscale_all_dim=0.8),
        q_lora_rank=None,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        routed_scaling_factor=2.0,
        topk_method="greedy",
    ),
    # MLA with a query LoRA and interleaved YaRN RoPE (as released), sigmoid
    # group-limited routing over scores + e_score_correction_bias,
    # renormalised and scaled.
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **COMMON,
        **MLA,
        max_position_embeddings=256,
        rope_parameters=yarn(factor=4.0, original=64, mscale=1.0, mscale_all_dim=1.0),
        q_lora_rank=12,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`{family: (directory, reference logits)}`, made once per module."""
    token_ids, padding_mask = padded_batch()
    made = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
        model.eval()
        randomize_weights(model)
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        made[family] = (directory, transformers_logits(model, token_ids, padding_mask))
    return made


# --- Loading: same logits as transformers --------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
    directory, expected = checkpoints[family]
    token_ids, padding_mask = padded_batch()
    model = presets.load(directory, preprocessor=None)
    logits = keras_logits(model, token_ids, padding_mask)
    assert np.abs(expected).max() > 1.0  # Not a vanishing signal.
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_converted_configs_follow_each_family(checkpoints):
    directory, _ = checkpoints["mixtral"]
    backbone = presets.load(directory, preprocessor=None).backbone
    options = backbone.moe_options
    assert options["capacity_factor"] is None  # Dropless, as transformers.
    assert options["normalize_top_k"] is True
    if "qwen2_moe" in checkpoints:
        backbone = presets.load(checkpoints["qwen2_moe"][0], preprocessor=None).backbone
        kinds = [type(b.feedforward).__name__ for b in backbone.transformer_layers]
        assert kinds == ["SharedExpertMoE", "FeedForward", "SharedExpertMoE"]
        assert backbone.attention_bias and backbone.shared_expert_gate
    if "deepseek_v3" in checkpoints:
        backbone = presets.load(checkpoints["deepseek_v3"][0], preprocessor=None).backbone
        router = backbone.transformer_layers[1].feedforward.router
        assert router.score_function == "sigmoid"
        assert (router.expert_groups, router.top_groups) == (4, 2)
        assert router.routed_scaling_factor == 2.5
        # e_score_correction_bias became the router's balancing bias.
        assert not router.expert_bias.trainable
        assert np.abs(keras.ops.convert_to_numpy(router.expert_bias)).max() > 0


def test_sharded_checkpoint(checkpoints, tmp_path):
    directory, expected = checkpoints["mixtral"]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    token_ids, padding_mask = padded_batch()
    logits = keras_logits(presets.load(sharded, preprocessor=None), token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_stacked_expert_layout_of_transformers_5_loads(checkpoints, tmp_path):
    # transformers >= 5 holds experts stacked (`mlp.experts.gate_up_proj
    # [E, 2m, d]`, `down_proj [E, d, m]`); a state dict saved as it is has
    # that layout, which is read one expert at a time.
    from safetensors.torch import save_file

    directory, expected = checkpoints["mixtral"]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    stacked = copy_checkpoint(directory, tmp_path / "stacked")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, stacked / "model.safetensors", {"format": "pt"})
    token_ids, padding_mask = padded_batch()
    logits = keras_logits(presets.load(stacked, preprocessor=None), token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_hub_handle_downloads_then_loads_the_same_way(checkpoints, monkeypatch):
    import huggingface_hub

    directory, expected = checkpoints["mixtral"]
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    token_ids, padding_mask = padded_batch()
    model = presets.load("hf://example-org/tiny-mixtral@main", preprocessor=None)
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE
    assert {call[:2] for call in calls} == {("example-org/tiny-mixtral", "main")}
    patterns = calls[-1][2]
    assert "*.safetensors" in patterns and not any(".bin" in p for p in patterns)


def test_keras_hub_mixtral_gives_the_same_logits(checkpoints):
    import keras_hub

    directory, expected = checkpoints["mixtral"]
    token_ids, padding_mask = padded_batch()
    reference = keras_hub.models.MixtralBackbone.from_preset(str(directory))
    hidden = reference.predict_on_batch(
        {"token_ids": token_ids, "padding_mask": padding_mask}
    )
    hub_logits = keras.ops.convert_to_numpy(
        reference.token_embedding(hidden, reverse=True)
    )
    ours = keras_logits(presets.load(directory, preprocessor=None), token_ids, padding_mask)
    assert max_difference(hub_logits, expected, padding_mask) < TOLERANCE
    assert max_difference(ours, hub_logits, padding_mask) < TOLERANCE


# --- Export: transformers loads it back to the same logits ----------------


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(checkpoints, family, tmp_path):
    directory, expected = checkpoints[family]
    model = presets.load(directory, preprocessor=None)
    convert.to_transformers(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert_same_tensors(
        reloaded, transformers.AutoModelForCausalLM.from_pretrained(directory)
    )
    token_ids, padding_mask = padded_batch()
    logits = transformers_logits(reloaded.eval(), token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_sharded_export_loads_in_both_directions(checkpoints, tmp_path):
    directory, expected = checkpoints["mixtral"]
    model = presets.load(directory, preprocessor=None)
    convert.to_transformers(model, tmp_path / "out", max_shard_size=16_000)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    token_ids, padding_mask = padded_batch()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits = transformers_logits(reloaded.eval(), token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE
    again = keras_logits(presets.load(tmp_path / "out", preprocessor=None), token_ids, padding_mask)
    assert max_difference(again, expected, padding_mask) < TOLERANCE


# The mixtral_small preset, shrunk to the test checkpoints' shapes.
SHRUNK = dict(
    num_layers=1,
    hidden_dim=16,
    num_query_heads=4,
    num_experts=4,
    moe_intermediate_dim=24,
)


def test_preset_model_exports_as_mixtral(tmp_path):
    model = presets.load("mixtral_small", preprocessor=None, **SHRUNK)
    convert.to_transformers(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    token_ids, padding_mask = padded_batch()
    expected = keras_logits(model, token_ids, padding_mask)
    logits = transformers_logits(reloaded, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    model = presets.load(
        "mixtral_small", preprocessor=None, ffn_gated=False, **SHRUNK
    )
    with pytest.raises(ConversionError, match="ffn_gated"):
        convert.to_transformers(model, tmp_path)
    with pytest.raises(ConversionError, match="attention"):
        convert.to_transformers(
            presets.load("mixtral_small", preprocessor=None, **SHRUNK),
            tmp_path,
            model_type="deepseek_v3",
        )


# --- Errors name the tensor or field --------------------------------------


def test_missing_tensor_is_named(checkpoints, tmp_path):
    directory = copy_checkpoint(checkpoints["mixtral"][0], tmp_path / "c")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    rewrite_tensors(directory, lambda tensors: tensors.pop(name))
    with pytest.raises(ConversionError, match=f"missing 1 tensor.*`{name}`"):
        presets.load(directory, preprocessor=None)


def test_wrong_shape_is_named(checkpoints, tmp_path):
    directory = copy_checkpoint(checkpoints["mixtral"][0], tmp_path / "c")
    name = "model.layers.0.self_attn.k_proj.weight"

    def truncate(tensors):
        tensors[name] = tensors[name][:4]

    rewrite_tensors(directory, truncate)
    with pytest.raises(ConversionError) as error:
        presets.load(directory, preprocessor=None)
    message = str(error.value)
    assert f"`{name}` has shape [4, 16] but the config needs [8, 16]" in message
    assert "decoder_block_0/attention/key/kernel" in message


def write_config(directory, config):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_unsupported_model_type_is_named(tmp_path):
    write_config(tmp_path, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ConversionError, match="`model_type`='llama'.*mixtral"):
        presets.load(tmp_path)


# --- The family registry: adding a family is adding one class ------------


def test_a_family_registered_from_outside_loads_and_exports(
    checkpoints, tmp_path, monkeypatch
):
    from keras_moe.convert import registry
    from keras_moe.convert.families.mixtral import Mixtral

    class RenamedMixtral(Mixtral):
        model_type = "renamed_mixtral"
        architecture = "RenamedMixtralForCausalLM"

        def describes(self, backbone, moe):
            return False  # Mixtral keeps the models it describes.

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.register(RenamedMixtral())
    directory, expected = checkpoints["mixtral"]
    renamed = copy_checkpoint(directory, tmp_path / "renamed")
    config = json.loads((renamed / "config.json").read_text())
    write_config(renamed, {**config, "model_type": "renamed_mixtral"})

    model = presets.load(renamed, preprocessor=None)
    token_ids, padding_mask = padded_batch()
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE
    convert.to_transformers(model, tmp_path / "out", model_type="renamed_mixtral")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == "renamed_mixtral"
    assert exported["architectures"] == ["RenamedMixtralForCausalLM"]
    # Without a model_type, export still picks the family that describes it.
    assert convert.transformers_config(model.backbone)["model_type"] == "mixtral"


def test_a_model_no_family_describes_is_named(checkpoints, monkeypatch):
    from keras_moe.convert import registry

    model = presets.load(checkpoints["mixtral"][0], preprocessor=None)
    monkeypatch.setattr(registry, "_FAMILIES", {})
    with pytest.raises(ConversionError, match="No supported model type describes"):
        convert.to_transformers(model, "unused")


def test_exactly_one_family_describes_each_familys_backbone():
    # One tiny config of each family, read by the family into a backbone
    # (no weights): export without a model_type must pick that family, and
    # no other family may describe it (the registry's order never decides).
    from test_gpt_oss import CONFIG as GPT_OSS
    from test_llama4 import SETTINGS as LLAMA4_TEXT
    from test_zoo_families import CONFIGS as ZOO

    from keras_moe.convert import registry
    from keras_moe.convert.family import moe_settings
    from keras_moe.models import MoEBackbone

    configs = {family: factory() for family, factory in CONFIGS.items()}
    configs.update({family: factory() for family, (factory, _) in ZOO.items()})
    configs["gpt_oss"] = transformers.GptOssConfig(**GPT_OSS)
    configs["llama4_text"] = transformers.Llama4TextConfig(**LLAMA4_TEXT)
    assert len(configs) == 10
    for model_type, config in configs.items():
        family = registry.lookup(model_type)
        backbone = MoEBackbone(**family.backbone_config(config.to_dict()))
        moe = moe_settings(backbone)
        describing = [
            other
            for other in registry.model_types()
            if registry.lookup(other).describes(backbone, moe)
        ]
        assert describing == [model_type]
        assert convert.infer_model_type(backbone) == model_type


@pytest.mark.parametrize(
    "field, value",
    [
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("quantization_config", {"quant_method": "fp8"}),
        ("hidden_act", "gelu_pytorch_tanh"),
        ("vocab_size", None),
    ],
)
def test_unsupported_or_missing_fields_are_named(checkpoints, tmp_path, field, value):
    directory = copy_checkpoint(checkpoints["mixtral"][0], tmp_path / "c")
    config = json.loads((directory / "config.json").read_text())
    config[field] = value
    write_config(directory, config)
    with pytest.raises(ConversionError, match=f"`{field}`"):
        presets.load(directory, preprocessor=None)


def test_unknown_deepseek_v2_topk_method_is_refused(tmp_path):
    # `group_limited_greedy` loads (tests/test_group_limited_routing.py);
    # V3's `noaux_tc` is not a deepseek_v2 method.
    config = CONFIGS["deepseek_v2"]().to_dict()
    config.update(model_type="deepseek_v2", topk_method="noaux_tc")
    with pytest.raises(ConversionError, match="`topk_method`='noaux_tc'"):
        convert.backbone_config_from_transformers(config)


def test_pickled_checkpoints_are_refused_and_never_unpickled(
    checkpoints, tmp_path, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    config = json.loads((checkpoints["mixtral"][0] / "config.json").read_text())
    directory = write_config(tmp_path / "pickled", config)
    (directory / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConversionError, match="pytorch_model.bin.*safetensors"):
        presets.load(directory, preprocessor=None)


def test_overrides_that_change_the_architecture_are_refused(checkpoints):
    with pytest.raises(ValueError, match="'num_layers'"):
        presets.load(checkpoints["mixtral"][0], num_layers=1)


def test_moe_options_override_keeps_the_weights(checkpoints):
    directory, expected = checkpoints["mixtral"]
    model = presets.load(
        directory, preprocessor=None, moe_options={"aux_loss_weight": 0.0}
    )
    assert model.backbone.moe_options["aux_loss_weight"] == 0.0
    assert model.backbone.moe_options["capacity_factor"] is None
    token_ids, padding_mask = padded_batch()
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


# --- Tokenizer ---------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. the dog sleeps."


def add_tokenizer(directory):
    """A tiny byte-level BPE tokenizer, as transformers checkpoints ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCABULARY_SIZE, special_tokens=["<s>", "</s>"]
    )
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
            }
        )
    )
    return tokenizer


def test_tokenizer_matches_transformers_and_generates(checkpoints, tmp_path):
    directory = copy_checkpoint(checkpoints["mixtral"][0], tmp_path / "c")
    add_tokenizer(directory)
    model = presets.load(directory)
    tokenizer = model.preprocessor.tokenizer
    assert isinstance(tokenizer, convert.HuggingFaceTokenizer)
    assert tokenizer.vocabulary_size() <= VOCABULARY_SIZE
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    text = "the lazy fox sleeps"
    expected = reference(text, add_special_tokens=False)["input_ids"]
    assert [int(i) for i in tokenizer(text)] == expected
    assert tokenizer.start_token_id == reference.bos_token_id
    assert tokenizer.end_token_id == reference.eos_token_id
    x, _, _ = model.preprocessor([text], sequence_length=12)
    ids = keras.ops.convert_to_numpy(x["token_ids"])[0].tolist()
    assert ids[: len(expected) + 2] == (
        [reference.bos_token_id] + expected + [reference.eos_token_id]
    )
    model.compile(sampler="greedy")
    assert isinstance(model.generate("the dog", max_length=10), str)

    # The tokenizer is saved with the model and comes back with it.
    saved = tmp_path / "saved"
    model.save_to_preset(saved)
    restored = presets.load(saved)
    assert [int(i) for i in restored.preprocessor.tokenizer(text)] == expected

    # And it is exported beside the weights.
    convert.to_transformers(model, tmp_path / "exported")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert exported(text, add_special_tokens=False)["input_ids"] == expected
    # With its special token ids in config.json (Mixtral's config class
    # would otherwise say bos 1, eos 2: other tokens of this vocabulary).
    exported_config = transformers.AutoConfig.from_pretrained(tmp_path / "exported")
    assert (exported_config.bos_token_id, exported_config.eos_token_id) == (
        reference.bos_token_id, reference.eos_token_id
    )
    assert exported_config.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_runs_inside_tf_data(checkpoints, tmp_path):
    import tensorflow as tf

    directory = copy_checkpoint(checkpoints["mixtral"][0], tmp_path / "c")
    add_tokenizer(directory)
    preprocessor = presets.load(directory).preprocessor
    dataset = tf.data.Dataset.from_tensor_slices([TEXT, "the dog"]).batch(2)
    x, y, sample_weight = next(iter(dataset.map(
        lambda text: preprocessor(text, sequence_length=8)
    )))
    direct, _, _ = preprocessor([TEXT, "the dog"], sequence_length=8)
    np.testing.assert_array_equal(
        np.asarray(x["token_ids"]), keras.ops.convert_to_numpy(direct["token_ids"])
    )


# --- Memory: tensors streamed in their stored dtype -------------------------


def test_bfloat16_checkpoint_loads_bit_exact_in_bfloat16_and_float32(checkpoints, tmp_path):
    # A bfloat16 checkpoint (stacked experts of transformers >= 5 included)
    # is read in bfloat16 and reaches a bfloat16 model unchanged, and a
    # float32 model as the exact widening.
    directory, _ = checkpoints["mixtral"]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    bf16 = model.to(torch.bfloat16)
    saved = copy_checkpoint(directory, tmp_path / "bf16")
    state = {name: tensor.contiguous() for name, tensor in bf16.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, saved / "model.safetensors", {"format": "pt"})
    name = "model.layers.1.mlp.experts.gate_up_proj"
    if name not in state:  # transformers < 5: one tensor per expert.
        name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
        expected = state[name].float().numpy()
    else:
        rows = state[name].shape[1] // 2
        expected = state[name][2, :rows].float().numpy()
    for dtype in ("bfloat16", "float32"):
        loaded = presets.load(saved, preprocessor=None, dtype=dtype)
        kernel = loaded.backbone.transformer_layers[1].feedforward.experts.gate_kernel
        assert keras.backend.standardize_dtype(kernel.dtype) == dtype
        values = keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float32"))
        np.testing.assert_array_equal(values[2], expected.T)


def test_truncated_shard_is_named_before_building(checkpoints, tmp_path):
    directory = copy_checkpoint(checkpoints["mixtral"][0], tmp_path / "c")
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConversionError, match="model.safetensors.*is truncated: tensor `"):
        presets.load(directory, preprocessor=None)
