"""The weights of a `MoEBackbone`, from its config alone.

`backbone_weights(config)` is the one description of which weights a
backbone holds, with their variable paths and shapes: the parameter counter
(`keras_moe.presets.count_params`) sums it, checkpoint conversion
(`keras_moe.convert`) maps each entry to a checkpoint tensor, and the tests
check it against built models. Its example prints the listing of a small
config; the helpers below it read as the list of what each option adds
(q/k/v biases, q/k norm, MLA's low-rank projections, dense or MoE
feed-forward, router noise and balancing bias, expert biases, shared
experts and their gate), then any multi-token prediction modules (their
norms, `eh_proj` and decoder block, numbered after the main model's). There
are no other weights: RoPE has none, and there is no extra head.
"""

import math
from typing import NamedTuple

from keras_moe.models.backbone_config import config_moe_layer_flags

# What a weight belongs to; `EXPERTS` weights stack the routed experts on
# their first axis, so a token uses `top_k / num_experts` of them.
EMBEDDING = "embedding"
ATTENTION = "attention"
NORM = "norm"
FEEDFORWARD = "feedforward"
ROUTER = "router"
EXPERTS = "experts"
SHARED_EXPERTS = "shared_experts"
HEAD = "head"
# A multi-token prediction module's own weights (its norms and `eh_proj`).
MULTI_TOKEN_PREDICTION = "multi_token_prediction"


class BackboneWeight(NamedTuple):
    """One weight of a `MoEBackbone`, described from the config.

    Attributes:
        path: str, the variable path (`model.weights[i].path`), e.g.
            `"decoder_block_1/moe/experts/gate_kernel"`.
        shape: tuple of ints.
        part: what it belongs to: `"embedding"`, `"attention"`, `"norm"`,
            `"feedforward"` (a dense layer), `"router"`, `"experts"` (the
            routed experts, stacked on axis 0), `"shared_experts"`,
            `"head"` or `"multi_token_prediction"` (a multi-token prediction
            module's norms and `eh_proj`; its decoder block's weights have
            the parts above).
        kind: `"table"` (an embedding table), `"kernel"`, `"bias"` (also
            the per-head attention sink logits), `"scale"` (a norm scale)
            or `"state"` (a non-trainable buffer).
        layer: int, the decoder block index, or None outside the blocks.
        input_axes: for kernels, how many leading axes (after the expert
            axis) are inputs: 1, or 2 for attention output kernels
            `[heads, width, d]`; 0 for other kinds.
    """

    path: str
    shape: tuple
    part: str
    kind: str
    layer: object = None
    input_axes: int = 0

    @property
    def key(self):
        """The path inside its decoder block (the path itself outside)."""
        if self.layer is None:
            return self.path
        return self.path.split("/", 1)[1]

    @property
    def size(self):
        """The number of values."""
        return math.prod(self.shape)

    @property
    def routed(self):
        """Whether the weight stacks the routed experts on axis 0."""
        return self.part == EXPERTS


def backbone_weights(config):
    """Every weight a `MoEBackbone` built from `config` holds, in order.

    Args:
        config: a dict with every `MoEBackbone` argument, checked (a
            backbone's `get_config()`, or
            `keras_moe.models.backbone_config.validated_config(...)`).

    Returns:
        A list of `BackboneWeight`: the embedding, then each block
        (attention norm, attention, feed-forward norm, feed-forward), the
        final norm, the output head, and each multi-token prediction module
        (`layer` numbered after the decoder blocks).

    Example:

    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=4, top_k=1, moe_intermediate_dim=6)
    >>> for weight in backbone_weights(backbone.get_config()):
    ...     print(weight.path, weight.shape)
    token_embedding/embeddings (32, 8)
    decoder_block_0/pre_attention_norm/scale (8,)
    decoder_block_0/attention/query/kernel (8, 2, 4)
    decoder_block_0/attention/key/kernel (8, 2, 4)
    decoder_block_0/attention/value/kernel (8, 2, 4)
    decoder_block_0/attention/attention_output/kernel (2, 4, 8)
    decoder_block_0/pre_feedforward_norm/scale (8,)
    decoder_block_0/moe/router/kernel (8, 4)
    decoder_block_0/moe/experts/gate_kernel (4, 8, 6)
    decoder_block_0/moe/experts/up_kernel (4, 8, 6)
    decoder_block_0/moe/experts/down_kernel (4, 6, 8)
    final_norm/scale (8,)
    token_embedding/reverse_embeddings (8, 32)
    >>> sum(weight.size for weight in backbone_weights(backbone.get_config())) == (
    ...     backbone.count_params())
    True
    """
    d = config["hidden_dim"]
    vocabulary_size = config["vocabulary_size"]
    weights = [
        BackboneWeight(
            "token_embedding/embeddings", (vocabulary_size, d), EMBEDDING, "table"
        )
    ]
    moe_flags = config_moe_layer_flags(config)
    for layer, is_moe in enumerate(moe_flags):
        block = _Block(layer)
        _decoder_block_weights(block, config, is_moe)
        weights += block.weights
    weights.append(BackboneWeight("final_norm/scale", (d,), NORM, "scale"))
    if not config["tie_word_embeddings"]:
        weights.append(
            BackboneWeight(
                "token_embedding/reverse_embeddings",
                (d, vocabulary_size),
                HEAD,
                "kernel",
                input_axes=1,
            )
        )
    # Multi-token prediction modules: numbered after the decoder blocks, as
    # DeepSeek-V3 checkpoints store them, with the last MoE layer's type.
    for k in range(config.get("num_mtp_layers", 0)):
        block = _Block(len(moe_flags) + k, prefix=f"mtp_block_{k}")
        block.add("enorm/scale", (d,), MULTI_TOKEN_PREDICTION, "scale")
        block.add("hnorm/scale", (d,), MULTI_TOKEN_PREDICTION, "scale")
        block.add("eh_proj/kernel", (2 * d, d), MULTI_TOKEN_PREDICTION, "kernel")
        _decoder_block_weights(block, config, any(moe_flags))
        block.add("head_norm/scale", (d,), MULTI_TOKEN_PREDICTION, "scale")
        weights += block.weights
    return weights


def _decoder_block_weights(block, config, is_moe):
    """Norms, attention and feed-forward of one decoder block."""
    d = config["hidden_dim"]
    block.add("pre_attention_norm/scale", (d,), NORM, "scale")
    if config["attention_type"] == "mla":
        _mla_weights(block, config)
    else:
        _gqa_weights(block, config)
    block.add("pre_feedforward_norm/scale", (d,), NORM, "scale")
    if is_moe:
        _moe_weights(block, config)
    else:
        _feedforward_weights(
            block, "feedforward", config["intermediate_dim"], config,
            FEEDFORWARD, use_bias=False,
        )


class _Block:
    """Collects the weights of decoder block `layer` (paths under `prefix`)."""

    def __init__(self, layer, prefix=None):
        self.layer = layer
        self.prefix = prefix or f"decoder_block_{layer}"
        self.weights = []

    def add(self, key, shape, part, kind, input_axes=None):
        if input_axes is None:
            input_axes = 1 if kind == "kernel" else 0
        self.weights.append(
            BackboneWeight(
                f"{self.prefix}/{key}",
                tuple(shape),
                part,
                kind,
                self.layer,
                input_axes,
            )
        )


def _gqa_weights(block, c):
    d = c["hidden_dim"]
    heads = c["num_query_heads"]
    kv_heads = c["num_key_value_heads"] or heads
    width = c["head_dim"] or d // heads
    for name, count in (("query", heads), ("key", kv_heads), ("value", kv_heads)):
        block.add(f"attention/{name}/kernel", (d, count, width), ATTENTION, "kernel")
    block.add(
        "attention/attention_output/kernel", (heads, width, d), ATTENTION,
        "kernel", input_axes=2,
    )
    if c["attention_bias"]:
        for name, count in (("query", heads), ("key", kv_heads), ("value", kv_heads)):
            block.add(f"attention/{name}/bias", (count, width), ATTENTION, "bias")
    if c.get("attention_output_bias", False):
        block.add("attention/attention_output/bias", (d,), ATTENTION, "bias")
    if c.get("attention_sinks", False):
        block.add("attention/sinks", (heads,), ATTENTION, "bias")
    if c["use_qk_norm"]:
        # Per head, or over the whole projection (`qk_norm_per_head=False`).
        query_width, key_width = width, width
        if not c.get("qk_norm_per_head", True):
            query_width, key_width = heads * width, kv_heads * width
        block.add("attention/query_norm/scale", (query_width,), ATTENTION, "scale")
        block.add("attention/key_norm/scale", (key_width,), ATTENTION, "scale")


def _mla_weights(block, c):
    d = c["hidden_dim"]
    heads = c["num_query_heads"]
    nope, rope = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    value_width, kv_rank = c["v_head_dim"], c["kv_lora_rank"]
    q_rank = c["q_lora_rank"]
    if q_rank is None:
        block.add("attention/q_proj/kernel", (d, heads, nope + rope), ATTENTION, "kernel")
    else:
        block.add("attention/q_a_proj/kernel", (d, q_rank), ATTENTION, "kernel")
        block.add("attention/q_a_norm/scale", (q_rank,), ATTENTION, "scale")
        block.add(
            "attention/q_b_proj/kernel", (q_rank, heads, nope + rope), ATTENTION,
            "kernel",
        )
    block.add(
        "attention/kv_a_proj_with_mqa/kernel", (d, kv_rank + rope), ATTENTION,
        "kernel",
    )
    block.add("attention/kv_a_norm/scale", (kv_rank,), ATTENTION, "scale")
    block.add(
        "attention/kv_b_proj/kernel", (kv_rank, heads, nope + value_width),
        ATTENTION, "kernel",
    )
    block.add(
        "attention/o_proj/kernel", (heads, value_width, d), ATTENTION, "kernel",
        input_axes=2,
    )


def _feedforward_weights(block, prefix, width, c, part, use_bias, experts=()):
    """Gate (if gated), up and down projections; `experts` = `(E,)` stacks."""
    d = c["hidden_dim"]
    projections = [("gate", (d, width), width), ("up", (d, width), width)]
    if not c["ffn_gated"]:
        projections = projections[1:]
    projections.append(("down", (width, d), d))
    for name, shape, outputs in projections:
        block.add(f"{prefix}/{name}_kernel", experts + shape, part, "kernel")
        if use_bias:
            block.add(f"{prefix}/{name}_bias", experts + (outputs,), part, "bias")


def _moe_weights(block, c):
    d = c["hidden_dim"]
    num_experts = c["num_experts"]
    options = c["moe_options"] or {}
    use_bias = bool(options.get("use_bias", False))
    block.add("moe/router/kernel", (d, num_experts), ROUTER, "kernel")
    if options.get("router_bias", False):
        block.add("moe/router/bias", (num_experts,), ROUTER, "bias")
    if options.get("noisy_gating", False):
        block.add("moe/router/noise_kernel", (d, num_experts), ROUTER, "kernel")
    if (options.get("bias_update_rate") or 0) > 0:
        block.add("moe/router/expert_bias", (num_experts,), ROUTER, "state")
    _feedforward_weights(
        block, "moe/experts", c["moe_intermediate_dim"], c, EXPERTS, use_bias,
        experts=(num_experts,),
    )
    if c["num_shared_experts"]:
        width = c["shared_intermediate_dim"] or (
            c["num_shared_experts"] * c["moe_intermediate_dim"]
        )
        _feedforward_weights(
            block, "moe/shared_experts", width, c, SHARED_EXPERTS, use_bias
        )
        if c["shared_expert_gate"]:
            block.add("moe/shared_gate_kernel", (d, 1), SHARED_EXPERTS, "kernel")
