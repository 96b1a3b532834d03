"""The layers a checked `MoEBackbone` config builds for each decoder layer.

`MoEBackbone` stacks them; DeepSeek-V3's multi-token prediction modules
reuse the block of the main model's MoE layers. The config is the dict
`keras_moe.models.backbone_config.validated_config` returns.

Example:

>>> from keras_moe.models import MoEBackbone
>>> from keras_moe.models.backbone_config import validated_config
>>> backbone = MoEBackbone(
...     vocabulary_size=32, num_layers=2, hidden_dim=8, num_query_heads=2,
...     intermediate_dim=8, num_experts=2, top_k=1, moe_intermediate_dim=4,
...     first_k_dense=1, sliding_window=4)
>>> config = validated_config(**{key: backbone.get_config()[key]
...     for key in CONFIG_KEYS})
>>> make_attention(config, 0, None).sliding_window
4
>>> type(make_feedforward(config, 1, None)).__name__
'SparseMoE'
"""

from keras_moe.layers import FeedForward
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SparseMoE
from keras_moe.layers.clamped_swiglu import ClampedSwiGLU
from keras_moe.models.backbone_config import CONFIG_KEYS  # noqa: F401 (example)
from keras_moe.models.backbone_config import attention_layer_types
from keras_moe.models.backbone_config import config_moe_layer_flags
from keras_moe.models.grouped_query_attention import GroupedQueryAttention
from keras_moe.models.multi_head_latent_attention import (
    MultiHeadLatentAttention,
)
from keras_moe.models.multi_token_prediction import MultiTokenPrediction
from keras_moe.models.multi_token_prediction import MultiTokenPredictionBlock


def make_attention(c, layer_index, dtype):
    """The attention layer of decoder layer `layer_index`.

    Args:
        c: a checked backbone config (`validated_config`).
        layer_index: int, the 0-based decoder layer.
        dtype: the dtype policy.

    Returns:
        A `GroupedQueryAttention` (with the layer's window, chunk, RoPE and
        q/k norm settings) or a `MultiHeadLatentAttention`, named
        `"attention"`.
    """
    if c["attention_type"] == "gqa":
        layer_type = attention_layer_types(c)[layer_index]
        sliding = layer_type == "sliding_attention"
        chunked = layer_type == "chunked_attention"
        # Llama 4: q/k norm on the layers with RoPE, temperature on the rest.
        rope = layer_index not in (c["nope_layers"] or ())
        return GroupedQueryAttention(
            num_query_heads=c["num_query_heads"],
            num_key_value_heads=c["num_key_value_heads"],
            head_dim=c["head_dim"],
            rope_max_wavelength=c["rope_max_wavelength"],
            use_bias=c["attention_bias"],
            use_qk_norm=c["use_qk_norm"],
            qk_norm_per_head=c["qk_norm_per_head"],
            clip_qkv=c["clip_qkv"],
            partial_rotary_factor=c["partial_rotary_factor"],
            sliding_window=c["sliding_window"] if sliding else None,
            use_sinks=c["attention_sinks"],
            use_output_bias=c["attention_output_bias"],
            rope_scaling=c["rope_scaling"],
            attention_chunk_size=c["attention_chunk_size"] if chunked else None,
            use_rope=rope,
            use_qk_l2_norm=c["use_qk_l2_norm"] and rope,
            temperature_floor_scale=(
                None if rope else c["attention_temperature_floor_scale"]
            ),
            temperature_scale=c["attention_temperature_scale"],
            layer_norm_epsilon=c["layer_norm_epsilon"],
            dropout=c["dropout"],
            dtype=dtype,
            name="attention",
        )
    return MultiHeadLatentAttention(
        num_heads=c["num_query_heads"],
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        q_lora_rank=c["q_lora_rank"],
        rope_max_wavelength=c["rope_max_wavelength"],
        rope_interleave=c["rope_interleave"] is not False,
        rope_scaling=c["rope_scaling"],
        layer_norm_epsilon=c["layer_norm_epsilon"],
        dropout=c["dropout"],
        dtype=dtype,
        name="attention",
    )


def ffn_activation(c):
    """The feed-forward activation: a name, or GPT-OSS's clamped SwiGLU."""
    if c["swiglu_limit"] is not None:
        return ClampedSwiGLU(alpha=c["swiglu_alpha"], limit=c["swiglu_limit"])
    return c["ffn_activation"]


def make_feedforward(c, layer_index, dtype):
    """The feed-forward layer of decoder layer `layer_index`.

    Args:
        c: a checked backbone config (`validated_config`).
        layer_index: int, the 0-based decoder layer.
        dtype: the dtype policy.

    Returns:
        A dense `FeedForward`, or a causal `SparseMoE` / `SharedExpertMoE`
        with the config's `moe_options`, named `"feedforward"` / `"moe"`.
    """
    if not config_moe_layer_flags(c)[layer_index]:
        return FeedForward(
            c["intermediate_dim"],
            activation=ffn_activation(c),
            gated=c["ffn_gated"],
            dtype=dtype,
            name="feedforward",
        )
    options = dict(c["moe_options"] or {})
    options["causal"] = True
    common = dict(
        top_k=c["top_k"],
        activation=ffn_activation(c),
        gated=c["ffn_gated"],
        dtype=dtype,
        name="moe",
        **options,
    )
    if c["num_shared_experts"] == 0:
        return SparseMoE(c["num_experts"], c["moe_intermediate_dim"], **common)
    return SharedExpertMoE(
        c["num_experts"],
        c["moe_intermediate_dim"],
        num_shared_experts=c["num_shared_experts"],
        shared_intermediate_dim=c["shared_intermediate_dim"],
        shared_expert_gate=c["shared_expert_gate"],
        **common,
    )


def make_multi_token_prediction(c, token_embedding, dtype):
    """DeepSeek-V3's multi-token prediction modules, or None.

    Args:
        c: a checked backbone config (`validated_config`).
        token_embedding: the backbone's `ReversibleEmbedding` (shared).
        dtype: the dtype policy.

    Returns:
        A `MultiTokenPrediction` of `num_mtp_layers` blocks, or None.
    """
    if not c["num_mtp_layers"]:
        return None
    flags = config_moe_layer_flags(c)
    # The block type of the main model's (last) MoE layer.
    template = max(
        (i for i, is_moe in enumerate(flags) if is_moe), default=len(flags) - 1
    )
    blocks = []
    for k in range(c["num_mtp_layers"]):
        block = MultiTokenPredictionBlock(
            attention=make_attention(c, template, dtype),
            feedforward=make_feedforward(c, template, dtype),
            layer_norm_epsilon=c["layer_norm_epsilon"],
            dropout=c["dropout"],
            dtype=dtype,
            name=f"mtp_block_{k}",
        )
        # Built here, outside any other layer, so that its variable paths
        # start with its own name (as `backbone_weights` lists them).
        block.build((None, None, c["hidden_dim"]))
        blocks.append(block)
    return MultiTokenPrediction(
        blocks,
        token_embedding,
        loss_weight=c["mtp_loss_weight"],
        dtype=dtype,
        name="multi_token_prediction",
    )
