"""GPT-OSS: checkpoints (float and MXFP4) give transformers' logits.

A tiny random `GptOssForCausalLM` (CPU torch, eager attention) with a
sliding window shorter than the sequence, attention sinks, YaRN RoPE,
biases everywhere and clamped SwiGLU experts is saved, then loaded with
`keras_moe.convert`; its logits on a right-padded batch must match within
1e-4 on every backend. The MXFP4 checkpoint is made by quantizing the
experts here, and its reference is transformers with the experts that
transformers' own `convert_moe_packed_tensors` dequantizes.
"""

import json

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")

from keras_moe import convert  # noqa: E402
from keras_moe import presets  # noqa: E402
from keras_moe.convert import ConversionError  # noqa: E402
from keras_moe.convert.families.gpt_oss import FP4_VALUES  # noqa: E402
from keras_moe.convert.families.gpt_oss import GptOss  # noqa: E402
from keras_moe.convert.families.gpt_oss import dequantize_mxfp4  # noqa: E402
from keras_moe.models import MoEBackbone  # noqa: E402
from testing.hf_checkpoints import TOLERANCE  # noqa: E402
from testing.hf_checkpoints import VOCABULARY_SIZE  # noqa: E402
from testing.hf_checkpoints import assert_same_tensors  # noqa: E402
from testing.hf_checkpoints import greedy_continuation  # noqa: E402
from testing.hf_checkpoints import keras_logits  # noqa: E402
from testing.hf_checkpoints import max_difference  # noqa: E402
from testing.hf_checkpoints import padded_batch as short_padded_batch  # noqa: E402
from testing.hf_checkpoints import randomize_weights  # noqa: E402
from testing.hf_checkpoints import transformers_logits  # noqa: E402


def padded_batch():
    return short_padded_batch(short_length=4)


def randomize(model, seed=0):
    """Biases and sinks too; stacked experts are `[E, in, out]`."""
    randomize_weights(
        model, seed, bias_scale=0.3,
        fan_in_axis=lambda name, shape: -2 if "experts" in name else -1,
    )

WINDOW = 3
# MXFP4 packs blocks of 32 values along each kernel's input axis.
CONFIG = dict(
    vocab_size=VOCABULARY_SIZE,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=WINDOW,
    max_position_embeddings=64,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    },
    tie_word_embeddings=False,
)


def quantize_mxfp4(values):
    """Round `[..., n]` float values (n a multiple of 32) to MXFP4 blocks.

    Each block of 32 gets the power of two that brings its largest
    magnitude to at most 6 (FP4's largest), then each value the nearest FP4
    code (sign in the high bit of the nibble).
    """
    values = np.asarray(values, "float32")
    blocks = values.reshape(values.shape[:-1] + (values.shape[-1] // 32, 32))
    largest = np.abs(blocks).max(-1)
    exponents = np.ceil(np.log2(np.maximum(largest, 1e-30) / 6.0)).astype("int32")
    scaled = blocks / np.ldexp(1.0, exponents)[..., None]
    magnitudes = FP4_VALUES[:8]
    codes = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(-1)
    codes = (codes + 8 * (scaled < 0)).astype("uint8")
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponents + 127).astype("uint8")


def make_checkpoint(directory, quantized, **overrides):
    """Save a random GPT-OSS; return its reference logits on `padded_batch`."""
    config = transformers.GptOssConfig(**{**CONFIG, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    randomize(model)
    quantized_tensors = {}
    if quantized:
        for index, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                parameter = getattr(experts, name)
                # Stored [E, out, in]; the parameter is [E, in, out].
                blocks, scales = quantize_mxfp4(
                    parameter.detach().numpy().transpose(0, 2, 1)
                )
                dequantized = mxfp4.convert_moe_packed_tensors(
                    torch.from_numpy(blocks), torch.from_numpy(scales),
                    dtype=torch.float32,
                )
                with torch.no_grad():
                    parameter.copy_(dequantized)
                prefix = f"model.layers.{index}.mlp.experts.{name}"
                quantized_tensors[f"{prefix}_blocks"] = blocks
                quantized_tensors[f"{prefix}_scales"] = scales
    model.save_pretrained(directory)
    if quantized:
        path = directory / "model.safetensors"
        tensors = safetensors_numpy.load_file(path)
        for name in list(tensors):
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                del tensors[name]
        tensors.update(quantized_tensors)
        safetensors_numpy.save_file(tensors, path, {"format": "pt"})
        hf_config = json.loads((directory / "config.json").read_text())
        hf_config["quantization_config"] = {"quant_method": "mxfp4"}
        (directory / "config.json").write_text(json.dumps(hf_config))
    return transformers_logits(model, *padded_batch())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`{"float" | "mxfp4": (directory, reference logits)}`."""
    made = {}
    for kind in ("float", "mxfp4"):
        directory = tmp_path_factory.mktemp(f"gpt_oss_{kind}")
        made[kind] = (directory, make_checkpoint(directory, kind == "mxfp4"))
    return made


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """`{kind: MoECausalLM}`, each checkpoint loaded once."""
    return {
        kind: convert.from_transformers(directory, preprocessor=None)
        for kind, (directory, _) in checkpoints.items()
    }


@pytest.mark.parametrize("kind", ["float", "mxfp4"])
def test_logits_match_transformers(checkpoints, loaded, kind):
    _, expected = checkpoints[kind]
    model = loaded[kind]
    backbone = model.backbone
    assert backbone.attention_layer_types == ["sliding_attention", "full_attention"]
    assert backbone.sliding_window == WINDOW and backbone.attention_sinks
    token_ids, padding_mask = padded_batch()
    logits = keras_logits(model, token_ids, padding_mask)
    assert max_difference(logits, expected, padding_mask) < TOLERANCE


def test_mxfp4_dequantization_equals_transformers():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 5, 2, 16)).astype("uint8")
    scales = rng.integers(120, 134, size=(3, 5, 2)).astype("uint8")
    expected = mxfp4.convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    ).numpy()  # [E, in, out]
    np.testing.assert_array_equal(
        dequantize_mxfp4(blocks, scales), expected.transpose(0, 2, 1)
    )


def test_cached_generation_matches_full_forward_with_short_window(loaded):
    model = loaded["float"]
    model.compile(sampler="greedy")
    length = 2 * WINDOW + 2
    token_ids = np.zeros((2, length), "int32")
    token_ids[0, :3] = [3, 9, 4]
    token_ids[1, :2] = [5, 1]
    padding_mask = token_ids > 0
    generated = model.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    generated = keras.ops.convert_to_numpy(generated["token_ids"])
    np.testing.assert_array_equal(
        generated, greedy_continuation(model, token_ids, padding_mask)
    )


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="keras-hub's GPT-OSS runs op by op on JAX (about a minute); the "
    "same comparison runs on TensorFlow and PyTorch.",
)
def test_keras_hub_gpt_oss_agrees(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    # keras-hub's GPT-OSS differs from transformers' in three ways: it has
    # no YaRN (a linear `rope_scaling_factor`), slides on the odd layers
    # instead of the even ones, and its window holds one more position. So
    # the comparison uses plain RoPE and a window longer than the batch;
    # its converter reads the released MXFP4 layout only.
    directory = tmp_path
    expected = make_checkpoint(
        directory,
        quantized=True,
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    )
    reference = keras_hub.models.GptOssBackbone.from_preset(str(directory))
    token_ids, padding_mask = padded_batch()
    hidden = reference({"token_ids": token_ids, "padding_mask": padding_mask})
    hub_logits = keras.ops.convert_to_numpy(
        reference.token_embedding(hidden, reverse=True)
    )
    ours = convert.from_transformers(directory, preprocessor=None)
    logits = keras_logits(ours, token_ids, padding_mask)
    assert max_difference(logits, hub_logits, padding_mask) < TOLERANCE
    assert max_difference(hub_logits, expected, padding_mask) < TOLERANCE


def test_both_rope_config_forms_read_the_same():
    family = GptOss()
    transformers_5 = dict(CONFIG, model_type="gpt_oss")
    parameters = dict(CONFIG["rope_parameters"])
    theta = parameters.pop("rope_theta")
    transformers_4 = {
        key: value for key, value in transformers_5.items() if key != "rope_parameters"
    }
    transformers_4.update(rope_theta=theta, rope_scaling=parameters)
    assert family.backbone_config(transformers_4) == family.backbone_config(
        transformers_5
    )
    config = family.backbone_config(transformers_5)
    assert config["rope_max_wavelength"] == 150000.0
    assert config["rope_scaling"]["factor"] == 4.0
    assert config["rope_scaling"]["truncate"] is False
    # No RoPE fields at all: transformers' YaRN defaults.
    bare = {key: value for key, value in transformers_4.items() if "rope" not in key}
    assert family.backbone_config(bare)["rope_scaling"]["factor"] == 32.0


@pytest.mark.parametrize("kind", ["float", "mxfp4"])
def test_export_round_trip_is_bit_identical(checkpoints, loaded, kind, tmp_path):
    # MXFP4 checkpoints are written in float: their dequantized values,
    # which transformers' own dequantization must give too.
    directory, expected = checkpoints[kind]
    model = loaded[kind]
    assert convert.infer_model_type(model.backbone) == "gpt_oss"
    exported = tmp_path / "exported"
    convert.to_transformers(model, exported)
    stored = safetensors_numpy.load_file(exported / "model.safetensors")
    prefix = "model.layers.1.mlp.experts"
    assert stored[f"{prefix}.gate_up_proj"].shape == (4, 32, 64)
    assert stored[f"{prefix}.gate_up_proj_bias"].shape == (4, 64)
    assert not any(name.endswith(("_blocks", "_scales")) for name in stored)
    options = dict(attn_implementation="eager")
    if kind == "mxfp4":
        options["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    source = transformers.AutoModelForCausalLM.from_pretrained(directory, **options)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager"
    )
    assert_same_tensors(reloaded, source)
    # The exported config.json describes the same computation.
    for field in (
        "layer_types", "sliding_window", "rope_parameters", "swiglu_alpha",
        "swiglu_limit", "head_dim", "num_local_experts", "attention_bias",
        "max_position_embeddings", "rms_norm_eps",
    ):
        assert getattr(reloaded.config, field) == getattr(source.config, field), field
    token_ids, padding_mask = padded_batch()
    logits = transformers_logits(reloaded.eval(), token_ids, padding_mask)
    np.testing.assert_array_equal(logits, expected)


def test_plain_rope_full_attention_config_round_trips():
    family = GptOss()
    config = family.backbone_config(
        dict(
            CONFIG,
            model_type="gpt_oss",
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )
    assert config["rope_scaling"] is None and config["sliding_window"] is None
    exported = convert.transformers_config(MoEBackbone(**config))
    # Read back by transformers, whose GptOssConfig defaults to YaRN.
    hf_config = transformers.GptOssConfig(**exported)
    assert hf_config.rope_parameters["rope_type"] == "default"
    assert hf_config.layer_types == ["full_attention"] * 2
    assert family.backbone_config(hf_config.to_dict()) == config


def test_export_refuses_what_gpt_oss_cannot_hold(loaded, tmp_path):
    config = loaded["float"].backbone.get_config()
    moe_options = config["moe_options"]
    for change, message in (
        ({"swiglu_limit": None, "swiglu_alpha": None}, "clamped SwiGLU"),
        ({"attention_output_bias": False}, "all four attention projections"),
        ({"moe_options": {**moe_options, "router_bias": False}}, "router_bias"),
    ):
        backbone = MoEBackbone.from_config({**config, **change})
        with pytest.raises(ConversionError, match=message):
            convert.to_transformers(backbone, tmp_path / "out", model_type="gpt_oss")
    # A layer whose experts lack a part cannot be stacked.
    from keras_moe.convert.families.gpt_oss import stack_expert_tensors

    lone_kernel = [("model.layers.0.mlp.experts.0.gate_proj.weight", np.zeros((2, 3)))]
    with pytest.raises(ConversionError, match="model.layers.0.mlp.experts lacks"):
        list(stack_expert_tensors(lone_kernel, num_experts=1))


def test_full_size_presets_count_like_the_model_card():
    # OpenAI's model card: 20.91B / 3.61B and 116.83B / 5.13B, the active
    # count without the embedding table (with the output head).
    small = presets.count_params("gpt_oss_20b", active_embedding=False)
    large = presets.count_params("gpt_oss_120b", active_embedding=False)
    assert small == {"total": 20_914_757_184, "active": 3_608_307_264}
    assert large == {"total": 116_829_156_672, "active": 5_132_849_472}


def test_clamped_swiglu_is_transformers_gate():
    from keras_moe.layers import ClampedSwiGLU

    config = transformers.GptOssConfig(**CONFIG)
    experts = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(config)
    gate_up = 6.0 * np.random.default_rng(0).normal(size=(5, 16)).astype("float32")
    expected = experts._apply_gate(torch.from_numpy(gate_up)).numpy()
    swiglu = ClampedSwiGLU(alpha=config.swiglu_alpha, limit=config.swiglu_limit)
    hidden = swiglu.gated_product(gate_up[:, 0::2], gate_up[:, 1::2])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(hidden), expected, rtol=1e-6, atol=1e-6
    )


def test_hierarchical_moe_refuses_a_router_bias():
    # GPT-OSS's router bias is a flat-router option: a gating tree has none.
    from keras_moe.layers import HierarchicalMoE

    message = "`router_bias` configure a flat router.*router_bias=True"
    with pytest.raises(ValueError, match=message):
        HierarchicalMoE(2, 2, 4, router_bias=True)


def test_clamped_swiglu_needs_gated_blocks():
    from keras_moe.layers import Experts
    from keras_moe.layers.clamped_swiglu import ClampedSwiGLU

    with pytest.raises(ValueError, match="gated=True"):
        Experts(num_experts=2, intermediate_dim=4, activation=ClampedSwiGLU(), gated=False)


def test_mxfp4_experts_load_exactly_in_bfloat16(checkpoints, loaded):
    # FP4 values times powers of two have at most 2 significant bits: the
    # dequantized kernels are exact in bfloat16 as in float32.
    directory, _ = checkpoints["mxfp4"]
    model = convert.from_transformers(directory, preprocessor=None, dtype="bfloat16")
    for block, reference in zip(
        model.backbone.transformer_layers, loaded["mxfp4"].backbone.transformer_layers
    ):
        for name in ("gate_kernel", "up_kernel", "down_kernel"):
            ours = getattr(block.feedforward.experts, name)
            theirs = getattr(reference.feedforward.experts, name)
            assert keras.backend.standardize_dtype(ours.dtype) == "bfloat16"
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(keras.ops.cast(ours, "float32")),
                keras.ops.convert_to_numpy(theirs),
            )


def test_memory_guard_counts_dequantized_values(checkpoints):
    from keras_moe.convert.families.gpt_oss import GptOssCheckpoint

    directory, _ = checkpoints["mxfp4"]
    checkpoint = GptOssCheckpoint(directory)
    try:
        # Each layer: gate_up [4, 32, 64] and down [4, 32, 32] values.
        experts = 2 * (4 * 32 * 64 + 4 * 32 * 32)
        dense = GptOssCheckpoint(checkpoints["float"][0])
        assert checkpoint.num_elements() == dense.num_elements()
        assert checkpoint.largest_variable_size() == dense.largest_variable_size()
        assert checkpoint.num_elements() > experts
        dense.close()
    finally:
        checkpoint.close()


def test_checkpoint_serves_expert_tensors_with_their_shapes(checkpoints):
    from keras_moe.convert.families.gpt_oss import GptOssCheckpoint

    for kind in ("float", "mxfp4"):
        checkpoint = GptOssCheckpoint(checkpoints[kind][0])
        try:
            prefix = "model.layers.1.mlp.experts"
            for name, shape in (
                (f"{prefix}.3.gate_proj.weight", (32, 32)),
                (f"{prefix}.3.down_proj.weight", (32, 32)),
                (f"{prefix}.up_proj_bias", (4 * 32,)),
                (f"{prefix}.down_proj_bias", (4 * 32,)),
            ):
                assert name in checkpoint
                assert checkpoint.shape(name) == shape
                assert checkpoint.get(name).shape == shape
                assert checkpoint.dtype(name) == np.dtype("float32")
            assert "model.layers.2.mlp.experts.0.gate_proj.weight" not in checkpoint
        finally:
            checkpoint.close()
