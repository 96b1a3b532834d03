"""MoE transformer models: shapes, masks, references, caching, training, saving."""

import inspect
import json
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import FeedForward
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SparseMoE
from keras_moe.models import GroupedQueryAttention
from keras_moe.models import MoEBackbone
from keras_moe.models import MoECausalLM
from keras_moe.models import MoECausalLMPreprocessor
from keras_moe.models import MoETokenizer
from keras_moe.models import MultiHeadLatentAttention
from keras_moe.models import is_moe_layer
from keras_moe.models.weight_structure import backbone_weights
from keras_moe.presets import count_params
from testing import reload_keras_file
from testing import run_backbone_test
from testing import tiny_backbone_config
from testing import to_numpy

VOCABULARY_SIZE = 32
DROPLESS = {"capacity_factor": None}
MLA = dict(
    attention_type="mla",
    num_key_value_heads=None,
    q_lora_rank=8,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=6,
)
ATTENTIONS = {"gqa": {}, "mla": MLA}


def tiny_config(**overrides):
    return tiny_backbone_config(**{"vocabulary_size": VOCABULARY_SIZE, **overrides})


def random_inputs(rng, batch=2, length=7, lengths=None):
    token_ids = rng.integers(0, VOCABULARY_SIZE, size=(batch, length)).astype("int32")
    padding_mask = np.ones((batch, length), "int32")
    if lengths is not None:
        for row, row_length in enumerate(lengths):
            padding_mask[row, row_length:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def randomize(layer, rng, scale=0.3):
    """Random weights (norm scales near 1); returns them by short name."""
    arrays = {}
    for variable in layer.weights:
        if variable.path.endswith("scale"):
            value = 1.0 + 0.2 * rng.normal(size=variable.shape)
        else:
            value = rng.normal(scale=scale, size=variable.shape)
        value = value.astype("float32")
        variable.assign(value)
        short_name = "/".join(variable.path.split("/")[-2:])
        arrays[short_name] = value.astype("float64")
    return arrays


# ---------------------------------------------------------------------------
# NumPy references, written from the papers / Hugging Face transformers.


def rms_norm(x, scale, epsilon=1e-6):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + epsilon) * scale


def rope_rotate_half(x, positions, base=10000.0):
    """Llama/Mixtral RoPE: feature i pairs with feature i + dim / 2."""
    dim = x.shape[-1]
    inverse_frequency = base ** (-np.arange(0, dim, 2) / dim)
    angles = positions[:, None] * inverse_frequency[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    while angles.ndim < x.ndim:
        angles = angles[:, None, :]
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    rotated = np.concatenate([-second, first], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def rope_adjacent_pairs(x, positions, base=10000.0):
    """DeepSeek RoPE: features (2i, 2i + 1) rotate as one complex number."""
    dim = x.shape[-1]
    inverse_frequency = base ** (-np.arange(0, dim, 2) / dim)
    angles = positions[:, None] * inverse_frequency[None, :]
    while angles.ndim < x.ndim:
        angles = angles[:, None, :]
    complex_x = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = complex_x * np.exp(1j * angles)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = rotated.real, rotated.imag
    return out


def attend(query, key, value, padding_mask, scale):
    """Per-head causal softmax attention, one sequence, token by token.

    query [s, H, h], key [s, H, h], value [s, H, v] -> [s, H, v].
    """
    length, num_heads = query.shape[:2]
    out = np.zeros((length, num_heads, value.shape[-1]))
    for head in range(num_heads):
        for t in range(length):
            visible = [j for j in range(t + 1) if padding_mask[j]]
            if not visible:
                continue
            scores = np.array([query[t, head] @ key[j, head] for j in visible]) * scale
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[t, head] = sum(w * value[j, head] for w, j in zip(weights, visible))
    return out


def gqa_reference(x, w, num_heads, num_kv_heads, padding_mask, bias, qk_norm):
    query = np.einsum("sd,dnh->snh", x, w["query/kernel"])
    key = np.einsum("sd,dnh->snh", x, w["key/kernel"])
    value = np.einsum("sd,dnh->snh", x, w["value/kernel"])
    if bias:
        query, key, value = (
            query + w["query/bias"],
            key + w["key/bias"],
            value + w["value/bias"],
        )
    if qk_norm:
        query = rms_norm(query, w["query_norm/scale"])
        key = rms_norm(key, w["key_norm/scale"])
    positions = np.arange(x.shape[0], dtype="float64")
    query = rope_rotate_half(query, positions)
    key = rope_rotate_half(key, positions)
    # Hugging Face `repeat_kv`: query head i reads key/value head i // groups.
    groups = num_heads // num_kv_heads
    key = np.repeat(key, groups, axis=1)
    value = np.repeat(value, groups, axis=1)
    head_dim = query.shape[-1]
    out = attend(query, key, value, padding_mask, 1 / np.sqrt(head_dim))
    return np.einsum("snh,nhd->sd", out, w["attention_output/kernel"])


def mla_reference(x, w, num_heads, dims, padding_mask, q_lora):
    nope, rope = dims["qk_nope_head_dim"], dims["qk_rope_head_dim"]
    kv_lora = dims["kv_lora_rank"]
    if q_lora:
        query = rms_norm(x @ w["q_a_proj/kernel"], w["q_a_norm/scale"])
        query = np.einsum("sr,rnh->snh", query, w["q_b_proj/kernel"])
    else:
        query = np.einsum("sd,dnh->snh", x, w["q_proj/kernel"])
    compressed = x @ w["kv_a_proj_with_mqa/kernel"]
    latent = rms_norm(compressed[:, :kv_lora], w["kv_a_norm/scale"])
    key_rope = compressed[:, kv_lora:]
    expanded = np.einsum("sr,rnh->snh", latent, w["kv_b_proj/kernel"])
    key_nope, value = expanded[..., :nope], expanded[..., nope:]
    positions = np.arange(x.shape[0], dtype="float64")
    query_rope = rope_adjacent_pairs(query[..., nope:], positions)
    key_rope = rope_adjacent_pairs(key_rope, positions)
    # The rotary key is shared by every head.
    key_rope = np.repeat(key_rope[:, None, :], num_heads, axis=1)
    query = np.concatenate([query[..., :nope], query_rope], axis=-1)
    key = np.concatenate([key_nope, key_rope], axis=-1)
    out = attend(query, key, value, padding_mask, 1 / np.sqrt(nope + rope))
    return np.einsum("snh,nhd->sd", out, w["o_proj/kernel"])


# ---------------------------------------------------------------------------
# Backbone structure.


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_backbone_output_shape(attention):
    backbone = MoEBackbone(**tiny_config(**ATTENTIONS[attention]))
    inputs = random_inputs(np.random.default_rng(0), lengths=[7, 4])
    outputs = backbone(inputs)
    assert tuple(outputs.shape) == (2, 7, 16)
    assert np.all(np.isfinite(to_numpy(outputs)))
    attention_class = {"gqa": GroupedQueryAttention, "mla": MultiHeadLatentAttention}
    for block in backbone.transformer_layers:
        assert isinstance(block.attention, attention_class[attention])


def test_layer_pattern_first_k_dense_then_every_second_layer():
    backbone = MoEBackbone(
        **tiny_config(num_layers=5, first_k_dense=1, moe_layer_frequency=2)
    )
    kinds = [type(block.feedforward) for block in backbone.transformer_layers]
    # Qwen's decoder_sparse_step convention: MoE iff (i + 1) % freq == 0.
    assert kinds == [FeedForward, SparseMoE, FeedForward, SparseMoE, FeedForward]
    assert [is_moe_layer(i, 1, 2) for i in range(5)] == [
        False, True, False, True, False
    ]
    for block in backbone.transformer_layers:
        if isinstance(block.feedforward, SparseMoE):
            assert block.feedforward.num_experts == 4
            assert block.feedforward.intermediate_dim == 8
            assert block.feedforward.top_k == 2
            if "causal" in inspect.signature(SparseMoE.__init__).parameters:
                assert block.feedforward.causal
        else:
            assert block.feedforward.intermediate_dim == 24
    outputs = backbone(random_inputs(np.random.default_rng(1)))
    assert tuple(outputs.shape) == (2, 7, 16)


def test_deepseek_style_first_layers_dense():
    backbone = MoEBackbone(**tiny_config(num_layers=3, first_k_dense=2, **MLA))
    kinds = [type(block.feedforward) for block in backbone.transformer_layers]
    assert kinds == [FeedForward, FeedForward, SparseMoE]


def test_moe_options_reach_the_moe_layers():
    backbone = MoEBackbone(
        **tiny_config(
            moe_options={"capacity_factor": 1.5, "aux_loss_weight": 0.02},
            ffn_activation="gelu",
            ffn_gated=False,
        )
    )
    moe = backbone.transformer_layers[0].feedforward
    assert moe.capacity_factor == 1.5
    assert moe.aux_loss_weight == 0.02
    assert moe.experts.activation == "gelu" and not moe.experts.gated


def test_shared_experts_build_shared_expert_moe_layers():
    backbone = MoEBackbone(
        **tiny_config(
            num_layers=2,
            first_k_dense=1,
            num_shared_experts=2,
            shared_expert_gate=True,
        )
    )
    dense, moe = (block.feedforward for block in backbone.transformer_layers)
    assert type(dense) is FeedForward
    assert isinstance(moe, SharedExpertMoE)
    assert moe.num_shared_experts == 2
    assert moe.shared_intermediate_dim == 2 * 8
    assert moe.shared_expert_gate
    outputs = backbone(random_inputs(np.random.default_rng(2), lengths=[7, 3]))
    assert tuple(outputs.shape) == (2, 7, 16)


# ---------------------------------------------------------------------------
# Masks.


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_later_tokens_do_not_change_earlier_outputs(attention):
    backbone = MoEBackbone(**tiny_config(**ATTENTIONS[attention]))
    inputs = random_inputs(np.random.default_rng(3))
    changed = {key: value.copy() for key, value in inputs.items()}
    changed["token_ids"][:, 4:] = (changed["token_ids"][:, 4:] + 7) % VOCABULARY_SIZE
    before, after = to_numpy(backbone(inputs)), to_numpy(backbone(changed))
    np.testing.assert_allclose(before[:, :4], after[:, :4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("moe_options", [DROPLESS, None], ids=["dropless", "capacity"])
def test_padding_does_not_change_real_tokens(attention, moe_options):
    backbone = MoEBackbone(
        **tiny_config(moe_options=moe_options, **ATTENTIONS[attention])
    )
    rng = np.random.default_rng(4)
    inputs = random_inputs(rng, batch=3, length=8)
    # Right padding, left padding, none.
    inputs["padding_mask"][0, 5:] = 0
    inputs["padding_mask"][1, :3] = 0
    changed = {key: value.copy() for key, value in inputs.items()}
    padding = changed["padding_mask"] == 0
    changed["token_ids"][padding] = rng.integers(0, VOCABULARY_SIZE, padding.sum())
    before, after = to_numpy(backbone(inputs)), to_numpy(backbone(changed))
    real = inputs["padding_mask"] == 1
    np.testing.assert_allclose(before[real], after[real], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Attention against NumPy references.


@pytest.mark.parametrize(
    "num_kv_heads, bias, qk_norm, head_dim",
    [(2, False, False, None), (1, True, True, 6), (4, True, False, None)],
)
def test_grouped_query_attention_matches_numpy(num_kv_heads, bias, qk_norm, head_dim):
    rng = np.random.default_rng(5)
    layer = GroupedQueryAttention(
        num_query_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        use_bias=bias,
        use_qk_norm=qk_norm,
    )
    layer.build((None, None, 16))
    weights = randomize(layer, rng)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    padding_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    outputs = to_numpy(layer(x, padding_mask=padding_mask))
    for row in range(2):
        expected = gqa_reference(
            x[row].astype("float64"), weights, 4, num_kv_heads,
            padding_mask[row], bias, qk_norm,
        )
        real = padding_mask[row] == 1
        np.testing.assert_allclose(
            outputs[row][real], expected[real], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("q_lora", [True, False])
def test_multi_head_latent_attention_matches_numpy(q_lora):
    rng = np.random.default_rng(6)
    dims = dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5)
    layer = MultiHeadLatentAttention(
        num_heads=3, q_lora_rank=6 if q_lora else None, **dims
    )
    layer.build((None, None, 16))
    weights = randomize(layer, rng)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    padding_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    outputs = to_numpy(layer(x, padding_mask=padding_mask))
    for row in range(2):
        expected = mla_reference(
            x[row].astype("float64"), weights, 3, dims, padding_mask[row], q_lora
        )
        real = padding_mask[row] == 1
        np.testing.assert_allclose(
            outputs[row][real], expected[real], rtol=1e-4, atol=1e-5
        )


def test_attention_weight_names_and_shapes():
    gqa = GroupedQueryAttention(4, 2, head_dim=6, use_bias=True, use_qk_norm=True)
    gqa.build((None, None, 16))
    shapes = {"/".join(w.path.split("/")[-2:]): tuple(w.shape) for w in gqa.weights}
    assert shapes == {
        "query/kernel": (16, 4, 6),
        "query/bias": (4, 6),
        "key/kernel": (16, 2, 6),
        "key/bias": (2, 6),
        "value/kernel": (16, 2, 6),
        "value/bias": (2, 6),
        "attention_output/kernel": (4, 6, 16),
        "query_norm/scale": (6,),
        "key_norm/scale": (6,),
    }
    mla = MultiHeadLatentAttention(3, 8, 4, 2, 5, q_lora_rank=6)
    mla.build((None, None, 16))
    shapes = {"/".join(w.path.split("/")[-2:]): tuple(w.shape) for w in mla.weights}
    assert shapes == {
        "q_a_proj/kernel": (16, 6),
        "q_a_norm/scale": (6,),
        "q_b_proj/kernel": (6, 3, 6),
        "kv_a_proj_with_mqa/kernel": (16, 10),
        "kv_a_norm/scale": (8,),
        "kv_b_proj/kernel": (8, 3, 9),
        "o_proj/kernel": (3, 5, 16),
    }


# ---------------------------------------------------------------------------
# Parameter count contract (the module docstring of moe_backbone).


PARAM_CONFIGS = {
    "mixtral_like": tiny_config(),
    "qwen_like": tiny_config(
        num_layers=3, moe_layer_frequency=2, attention_bias=True,
        tie_word_embeddings=True, head_dim=6,
    ),
    "qwen3_like": tiny_config(use_qk_norm=True, num_key_value_heads=1),
    "plain_ffn": tiny_config(ffn_gated=False, ffn_activation="relu", first_k_dense=1),
    "deepseek_like": tiny_config(num_layers=3, first_k_dense=1, **MLA),
    "deepseek_v2_lite_like": tiny_config(**{**MLA, "q_lora_rank": None}),
    "shared_experts": tiny_config(num_shared_experts=2, first_k_dense=1, **MLA),
    "shared_expert_gate": tiny_config(
        num_shared_experts=1, shared_intermediate_dim=12, shared_expert_gate=True
    ),
}


@pytest.mark.parametrize("name", sorted(PARAM_CONFIGS))
def test_weight_structure_lists_every_weight_of_the_built_backbone(name):
    # The one description of the weights, which `count_params` sums and the
    # checkpoint mapping follows, against what Keras builds.
    backbone = MoEBackbone(**PARAM_CONFIGS[name])
    described = backbone_weights(backbone.get_config())
    assert sorted((w.path, tuple(w.shape)) for w in described) == sorted(
        (w.path, tuple(w.shape)) for w in backbone.weights
    )
    assert count_params(backbone.get_config())["total"] == backbone.count_params()


# ---------------------------------------------------------------------------
# Causal LM: caching, generation, training, saving.


def make_causal_lm(attention="gqa", preprocessor=None, **overrides):
    backbone = MoEBackbone(**tiny_config(**{**ATTENTIONS[attention], **overrides}))
    causal_lm = MoECausalLM(backbone, preprocessor=preprocessor)
    causal_lm.compile(sampler="greedy")
    return causal_lm


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_cached_decoding_matches_full_forward_pass(attention):
    causal_lm = make_causal_lm(attention, tie_word_embeddings=attention == "mla")
    inputs = random_inputs(np.random.default_rng(7), length=8)
    expected = to_numpy(causal_lm(inputs))
    assert expected.shape == (2, 8, VOCABULARY_SIZE)

    token_ids = inputs["token_ids"]
    # Prefill the first 3 tokens into a length-8 cache, then one at a time.
    prompt = np.concatenate([token_ids[:, :3], np.zeros((2, 5), "int32")], axis=1)
    _, cache = causal_lm._build_cache(prompt)
    logits = []
    for index in range(3, 8):
        step_logits, _, cache = causal_lm.call_with_cache(
            token_ids[:, index : index + 1], cache, index
        )
        logits.append(to_numpy(step_logits)[:, 0])
    np.testing.assert_allclose(
        np.stack(logits, axis=1), expected[:, 3:], rtol=1e-4, atol=1e-4
    )
    prefill_logits, _, _ = causal_lm.call_with_cache(
        token_ids, ops.zeros_like(cache), 0
    )
    np.testing.assert_allclose(to_numpy(prefill_logits), expected, rtol=1e-4, atol=1e-4)


def test_mla_cache_holds_the_compressed_latent():
    causal_lm = make_causal_lm("mla")
    _, cache = causal_lm._build_cache(np.zeros((2, 5), "int32"))
    # [batch, layers, length, kv_lora_rank + qk_rope_head_dim]
    assert tuple(cache.shape) == (2, 2, 5, 8 + 4)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_generate_token_ids_is_greedy_decoding(attention):
    causal_lm = make_causal_lm(attention)
    token_ids = np.array([[3, 9, 4, 0, 0, 0, 0], [5, 1, 0, 0, 0, 0, 0]], "int32")
    padding_mask = token_ids > 0
    generated = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    generated = ops.convert_to_numpy(generated["token_ids"])

    # Greedy decoding with full forward passes.
    expected = token_ids.copy()
    for position in range(2, 7):
        logits = to_numpy(
            causal_lm({"token_ids": expected, "padding_mask": np.ones_like(expected)})
        )
        next_tokens = logits[:, position - 1].argmax(-1)
        fill = ~padding_mask[:, position]
        expected[fill, position] = next_tokens[fill]
    np.testing.assert_array_equal(generated, expected)


def byte_preprocessor(sequence_length=24):
    return MoECausalLMPreprocessor(MoETokenizer(), sequence_length=sequence_length)


def tiny_text_lm(attention="gqa", **overrides):
    tokenizer_size = MoETokenizer().vocabulary_size()
    config = tiny_config(
        vocabulary_size=tokenizer_size, hidden_dim=32, **ATTENTIONS[attention]
    )
    config.update(overrides)
    causal_lm = MoECausalLM(MoEBackbone(**config), preprocessor=byte_preprocessor())
    return causal_lm


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_generate_strings_with_the_preprocessor(attention):
    causal_lm = tiny_text_lm(attention)
    causal_lm.compile(sampler="greedy")
    output = causal_lm.generate("MoE", max_length=12)
    assert isinstance(output, str)
    assert output.startswith("MoE")
    outputs = causal_lm.generate(["a", "bc"], max_length=10)
    assert len(outputs) == 2 and all(isinstance(text, str) for text in outputs)


def test_fit_lowers_the_loss_on_a_tiny_byte_corpus():
    keras.utils.set_random_seed(0)
    causal_lm = tiny_text_lm(moe_options={"capacity_factor": 1.25})
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    corpus = ["the quick brown fox jumps."] * 16
    before = causal_lm.evaluate(corpus, batch_size=8, verbose=0, return_dict=True)
    causal_lm.fit(corpus, batch_size=8, epochs=8, verbose=0)
    after = causal_lm.evaluate(corpus, batch_size=8, verbose=0, return_dict=True)
    assert after["loss"] < 0.5 * before["loss"]


def test_router_losses_are_added_in_training():
    causal_lm = make_causal_lm(moe_options={"aux_loss_weight": 0.01})
    causal_lm(random_inputs(np.random.default_rng(8)), training=True)
    assert len(causal_lm.losses) == 2  # one load-balancing loss per MoE layer


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_keras_file_round_trip(tmp_path, attention):
    causal_lm = tiny_text_lm(attention, tie_word_embeddings=True)
    inputs = random_inputs(np.random.default_rng(9), length=6, lengths=[6, 4])
    expected = to_numpy(causal_lm(inputs))
    restored = reload_keras_file(causal_lm, tmp_path)
    assert isinstance(restored, MoECausalLM)
    assert isinstance(restored.preprocessor, MoECausalLMPreprocessor)
    np.testing.assert_array_equal(to_numpy(restored(inputs)), expected)


def test_preset_round_trip(tmp_path):
    causal_lm = tiny_text_lm("mla", num_layers=3, first_k_dense=1)
    inputs = random_inputs(np.random.default_rng(10), length=6)
    expected = to_numpy(causal_lm(inputs))
    preset = os.path.join(tmp_path, "preset")
    causal_lm.save_to_preset(preset)
    with open(os.path.join(preset, "config.json")) as f:
        assert json.load(f)["registered_name"] == "keras_moe>MoEBackbone"
    restored = MoECausalLM.from_preset(preset)
    assert isinstance(restored.backbone, MoEBackbone)
    assert isinstance(restored.preprocessor.tokenizer, MoETokenizer)
    assert restored.backbone.get_config() == causal_lm.backbone.get_config()
    np.testing.assert_array_equal(to_numpy(restored(inputs)), expected)
    backbone = MoEBackbone.from_preset(preset)
    assert backbone.count_params() == causal_lm.backbone.count_params()
    tokenizer = MoETokenizer.from_preset(preset)
    assert tokenizer.end_token_id == 257


def test_backbone_config_keras_file_and_mixed_precision(tmp_path):
    config = tiny_config(first_k_dense=1, use_qk_norm=True, rope_max_wavelength=1e6)
    inputs = random_inputs(np.random.default_rng(11), lengths=[7, 4])
    run_backbone_test(config, inputs, tmp_path=tmp_path)


def test_layer_configs_round_trip():
    from keras_moe.models import MoEDecoderBlock

    backbone = MoEBackbone(**tiny_config(first_k_dense=1))
    for block in backbone.transformer_layers:
        config = block.get_config()
        restored = MoEDecoderBlock.from_config(json.loads(json.dumps(config)))
        restored_config = restored.get_config()
        for key in ("attention", "feedforward"):
            # The built original also records its build shapes.
            assert restored_config.pop(key)["config"] == config.pop(key)["config"]
        assert restored_config == config
    for layer in (
        GroupedQueryAttention(4, 2, head_dim=6, use_bias=True, use_qk_norm=True),
        MultiHeadLatentAttention(3, 8, 4, 2, 5, q_lora_rank=6, rope_interleave=False),
    ):
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config


def test_causal_lm_refuses_a_backbone_smaller_than_the_tokenizer():
    with pytest.raises(ValueError, match="vocabulary_size"):
        MoECausalLM(MoEBackbone(**tiny_config()), preprocessor=byte_preprocessor())


# ---------------------------------------------------------------------------
# Tokenizer.


def test_byte_tokenizer_ids_and_round_trip():
    tokenizer = MoETokenizer()
    assert tokenizer.vocabulary_size() == 259
    special_ids = (
        tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id
    )
    assert special_ids == (256, 257, 258)
    text = "Mixture of Experts, ½ 専門家"
    ids = [int(i) for i in tokenizer(text)]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.detokenize([256] + ids + [257, 258]) == text
    assert tokenizer.detokenize([ids, [256, 104, 105]]) == [text, "hi"]
    assert tokenizer.id_to_token(257) == "<|end|>"
    assert tokenizer.token_to_id("<|pad|>") == 258


def test_preprocessor_packs_with_special_tokens():
    x, y, sample_weight = byte_preprocessor(sequence_length=6)(["hey", "toolong!"])
    np.testing.assert_array_equal(
        ops.convert_to_numpy(x["token_ids"]),
        [[256, 104, 101, 121, 257, 258], [256, 116, 111, 111, 108, 111]],
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(y),
        [[104, 101, 121, 257, 258, 258], [116, 111, 111, 108, 111, 257]],
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(sample_weight), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    )


# ---------------------------------------------------------------------------
# Configuration errors.


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(attention_type="mqa"), "attention_type"),
        (dict(attention_type="mla", num_key_value_heads=None), "kv_lora_rank"),
        (dict(hidden_dim=18), "hidden_dim"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_dim=12, num_key_value_heads=None), "head_dim"),
        (dict(intermediate_dim=None, first_k_dense=1), "intermediate_dim"),
        (dict(intermediate_dim=None, moe_layer_frequency=2), "intermediate_dim"),
        (dict(moe_intermediate_dim=None), "moe_intermediate_dim"),
        (dict(moe_layer_frequency=0), "moe_layer_frequency"),
        (dict(first_k_dense=3), "first_k_dense"),
        (dict(top_k=5), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(kv_lora_rank=8), "mla"),
        (dict(MLA, attention_bias=True), "attention_bias"),
        (dict(MLA, use_qk_norm=True), "use_qk_norm"),
        (dict(MLA, head_dim=8), "head_dim"),
        (dict(MLA, num_key_value_heads=2), "num_key_value_heads"),
        (dict(MLA, qk_rope_head_dim=3), "qk_rope_head_dim"),
        (dict(MLA, v_head_dim=None), "v_head_dim"),
        (dict(moe_options={"top_k": 1}), "moe_options"),
        (dict(moe_options="dropless"), "moe_options"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(dropout=1.0), "dropout"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
        (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    ],
)
def test_bad_configs_raise_value_errors_naming_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        MoEBackbone(**tiny_config(**overrides))



def test_tokenized_inputs_pass_through_an_attached_preprocessor():
    keras.utils.set_random_seed(0)
    causal_lm = tiny_text_lm(num_layers=1)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    corpus = ["the quick brown fox.", "jumps over"]
    # Reference: what the preprocessor makes of the text.
    x, y, sample_weight = causal_lm.preprocessor(corpus)
    x = {key: to_numpy(value) for key, value in x.items()}
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)

    # Refused up front, naming what to pass.
    with pytest.raises(ValueError, match=r"received `y=None`.*token_ids\[:, 1:\]"):
        causal_lm.fit(x, batch_size=2, verbose=0)
    with pytest.raises(ValueError, match=r"received `y=None`"):
        causal_lm.evaluate(x, batch_size=2, verbose=0)
    keys = r"keys \['token_ids', 'padding_mask'\]"
    with pytest.raises(ValueError, match=keys + r".*missing \['padding_mask'\]"):
        causal_lm.fit({"token_ids": x["token_ids"]}, y, verbose=0)
    with pytest.raises(ValueError, match=r"unexpected \['labels'\]"):
        causal_lm.predict({**x, "labels": y}, verbose=0)
    with pytest.raises(ValueError, match="padding_mask.*shape of `token_ids`"):
        causal_lm.preprocessor(
            {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"][:, :3]}
        )
    with pytest.raises(ValueError, match=r"takes prompts as strings.*preprocessor = None"):
        causal_lm.generate(x)

    # Accepted as they are: the same loss as the text they came from.
    from_text = causal_lm.evaluate(corpus, batch_size=2, verbose=0, return_dict=True)
    from_ids = causal_lm.evaluate(
        x, y, sample_weight=sample_weight, batch_size=2, verbose=0, return_dict=True
    )
    assert from_ids["loss"] == pytest.approx(from_text["loss"], rel=1e-5)
    history = causal_lm.fit(x, y, sample_weight=sample_weight, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    # A dataset cannot be checked up front: the missing labels are caught in
    # the step (after which a JAX model holds no weights until rebuilt).
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(x).batch(2)
    with pytest.raises(ValueError, match=r"received `y=None`"):
        causal_lm.evaluate(dataset, verbose=0)
