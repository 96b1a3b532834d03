"""Which transformers tensor holds each `MoEBackbone` weight, and how.

A `WeightMapping` ties one Keras variable to its tensor(s) in a
transformers checkpoint and knows the layout change between them:
- `"copy"`: same shape (embeddings, norm scales, DeepSeek-V3's
  `e_score_correction_bias`);
- `"vector"`: a flat vector reshaped to the variable (q/k/v biases
  `[H * h]` -> `[H, h]`);
- `"linear"`: a `torch.nn.Linear` weight `[out, in]` stored in Keras as a
  kernel `[*in_dims, *out_dims]` (transposed, then split into heads);
- `"experts"`: one `[out, in]` weight per expert, stacked in Keras as
  `[E, in, out]`.
"""

from typing import NamedTuple

import numpy as np

from keras_moe.convert.checkpoint import ConversionError

_EXPERT_NAMES = {
    # gate, up, down projections of one expert.
    "mixtral": ("w1", "w3", "w2"),
    "default": ("gate_proj", "up_proj", "down_proj"),
}


class WeightMapping(NamedTuple):
    """One Keras variable and the checkpoint tensor(s) it comes from.

    Attributes:
        variable: the `keras.Variable`.
        names: tuple of checkpoint tensor names: one, or one per expert.
        kind: `"copy"`, `"vector"`, `"linear"` or `"experts"`.
        input_rank: for `"linear"`, how many leading kernel axes are the
            input (1, or 2 for output projections `[H, h, d]`).
    """

    variable: object
    names: tuple
    kind: str
    input_rank: int = 1

    def checkpoint_shape(self):
        """The shape each checkpoint tensor must have."""
        shape = tuple(self.variable.shape)
        if self.kind == "copy":
            return shape
        if self.kind == "vector":
            return (int(np.prod(shape)),)
        if self.kind == "linear":
            inputs = int(np.prod(shape[: self.input_rank]))
            outputs = int(np.prod(shape[self.input_rank :]))
            return (outputs, inputs)
        return (shape[2], shape[1])  # "experts": one [out, in] per expert

    def to_keras(self, tensor):
        """A checkpoint tensor in the variable's layout (one expert's slice
        for `"experts"`)."""
        shape = tuple(self.variable.shape)
        if self.kind == "copy":
            return tensor
        if self.kind == "vector":
            return tensor.reshape(shape)
        if self.kind == "linear":
            return tensor.T.reshape(shape)
        return tensor.T

    def to_checkpoint(self, value):
        """The variable's value (or one expert's slice) in checkpoint layout."""
        if self.kind == "copy":
            return value
        if self.kind == "vector":
            return value.reshape(-1)
        if self.kind == "linear":
            inputs = int(np.prod(value.shape[: self.input_rank]))
            return value.reshape(inputs, -1).T
        return value.T


def _linear(variable, name, input_rank=1):
    return WeightMapping(variable, (name,), "linear", input_rank)


def _copy(variable, name):
    return WeightMapping(variable, (name,), "copy")


def _vector(variable, name):
    return WeightMapping(variable, (name,), "vector")


def _attention_mappings(attention, prefix):
    p = f"{prefix}.self_attn"
    if type(attention).__name__ == "MultiHeadLatentAttention":
        mappings = []
        if attention.q_lora_rank is None:
            mappings.append(_linear(attention.q_proj.kernel, f"{p}.q_proj.weight"))
        else:
            mappings += [
                _linear(attention.q_a_proj.kernel, f"{p}.q_a_proj.weight"),
                _copy(attention.q_a_norm.scale, f"{p}.q_a_layernorm.weight"),
                _linear(attention.q_b_proj.kernel, f"{p}.q_b_proj.weight"),
            ]
        mappings += [
            _linear(
                attention.kv_a_proj_with_mqa.kernel,
                f"{p}.kv_a_proj_with_mqa.weight",
            ),
            _copy(attention.kv_a_norm.scale, f"{p}.kv_a_layernorm.weight"),
            _linear(attention.kv_b_proj.kernel, f"{p}.kv_b_proj.weight"),
            _linear(attention.o_proj.kernel, f"{p}.o_proj.weight", input_rank=2),
        ]
        return mappings
    mappings = [
        _linear(attention.query_dense.kernel, f"{p}.q_proj.weight"),
        _linear(attention.key_dense.kernel, f"{p}.k_proj.weight"),
        _linear(attention.value_dense.kernel, f"{p}.v_proj.weight"),
        _linear(attention.output_dense.kernel, f"{p}.o_proj.weight", input_rank=2),
    ]
    if attention.use_bias:
        mappings += [
            _vector(attention.query_dense.bias, f"{p}.q_proj.bias"),
            _vector(attention.key_dense.bias, f"{p}.k_proj.bias"),
            _vector(attention.value_dense.bias, f"{p}.v_proj.bias"),
        ]
    if attention.use_qk_norm:
        mappings += [
            _copy(attention.query_norm.scale, f"{p}.q_norm.weight"),
            _copy(attention.key_norm.scale, f"{p}.k_norm.weight"),
        ]
    return mappings


def _dense_mappings(feedforward, prefix):
    return [
        _linear(feedforward.gate_kernel, f"{prefix}.gate_proj.weight"),
        _linear(feedforward.up_kernel, f"{prefix}.up_proj.weight"),
        _linear(feedforward.down_kernel, f"{prefix}.down_proj.weight"),
    ]


def _moe_mappings(moe, prefix, model_type):
    mappings = [_linear(moe.router.kernel, f"{prefix}.gate.weight")]
    if model_type == "deepseek_v3":
        mappings.append(
            _copy(moe.router.expert_bias, f"{prefix}.gate.e_score_correction_bias")
        )
    gate, up, down = _EXPERT_NAMES.get(model_type, _EXPERT_NAMES["default"])
    experts = moe.experts
    for kernel, projection in (
        (experts.gate_kernel, gate),
        (experts.up_kernel, up),
        (experts.down_kernel, down),
    ):
        names = tuple(
            f"{prefix}.experts.{j}.{projection}.weight"
            for j in range(moe.num_experts)
        )
        mappings.append(WeightMapping(kernel, names, "experts"))
    if getattr(moe, "num_shared_experts", 0):
        shared = "shared_expert" if model_type == "qwen2_moe" else "shared_experts"
        mappings += _dense_mappings(moe.shared_experts, f"{prefix}.{shared}")
        if moe.shared_expert_gate:
            mappings.append(
                _linear(moe.shared_gate_kernel, f"{prefix}.shared_expert_gate.weight")
            )
    return mappings


def weight_mappings(backbone, model_type):
    """Every weight of `backbone` with its tensor in a `model_type` checkpoint.

    Args:
        backbone: a built `MoEBackbone`.
        model_type: one of `SUPPORTED_MODEL_TYPES`; it decides the tensor
            names (`block_sparse_moe.experts.{j}.w1` for Mixtral,
            `mlp.experts.{j}.gate_proj` for the others, `shared_expert`
            for Qwen2-MoE, `shared_experts` for DeepSeek).

    Returns:
        A list of `WeightMapping`, in checkpoint order.

    Raises:
        ConversionError: if the backbone has weights that the family's
            checkpoints have no tensor for (their paths are named).

    Example:

    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=2, top_k=1, moe_intermediate_dim=4)
    >>> mappings = weight_mappings(backbone, "mixtral")
    >>> [m.names[0] for m in mappings][:2]
    ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
    >>> mappings[-1].names[0], mappings[-1].checkpoint_shape()
    ('lm_head.weight', (32, 8))
    """
    mappings = [
        _copy(backbone.token_embedding.embeddings, "model.embed_tokens.weight")
    ]
    moe_block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}"
        mappings.append(
            _copy(block.pre_attention_norm.scale, f"{prefix}.input_layernorm.weight")
        )
        mappings += _attention_mappings(block.attention, prefix)
        mappings.append(
            _copy(
                block.pre_feedforward_norm.scale,
                f"{prefix}.post_attention_layernorm.weight",
            )
        )
        feedforward = block.feedforward
        if hasattr(feedforward, "router"):
            mappings += _moe_mappings(feedforward, f"{prefix}.{moe_block}", model_type)
        else:
            mappings += _dense_mappings(feedforward, f"{prefix}.mlp")
    mappings.append(_copy(backbone.layer_norm.scale, "model.norm.weight"))
    if not backbone.tie_word_embeddings:
        mappings.append(
            _linear(backbone.token_embedding.reverse_embeddings, "lm_head.weight")
        )
    _check_covered(backbone, mappings, model_type)
    return mappings


def _check_covered(backbone, mappings, model_type):
    mapped = {id(mapping.variable) for mapping in mappings}
    unmapped = [
        variable.path for variable in backbone.weights if id(variable) not in mapped
    ]
    if unmapped:
        raise ConversionError(
            f"{model_type} checkpoints have no tensor for these weights: "
            f"{', '.join(unmapped)}. The model uses options (expert biases, "
            "noisy gating, balancing biases, ...) that this family does not "
            "have."
        )
