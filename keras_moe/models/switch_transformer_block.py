"""One encoder or decoder block of Switch Transformer (T5 v1.0 layout)."""

import keras
from keras import ops

from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.models.attention_masks import attention_mask
from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.models.t5_relative_attention import T5RelativeAttention
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_rate


def is_sparse_layer(layer_index, sparse_step):
    """Whether block `layer_index` of a stack has a Switch (MoE) layer.

    Hugging Face's `SwitchTransformersStack` rule: with `sparse_step == 1`
    every block is sparse, otherwise the blocks with
    `layer_index % sparse_step == 1`; `sparse_step == 0` means none.

    Args:
        layer_index: int, the block's index in its stack.
        sparse_step: int >= 0.

    Returns:
        bool.

    Example:

    >>> [is_sparse_layer(i, 2) for i in range(4)]
    [False, True, False, True]
    """
    if sparse_step <= 0:
        return False
    return sparse_step == 1 or layer_index % sparse_step == 1


@keras.saving.register_keras_serializable(package="keras_moe")
class SwitchTransformerBlock(keras.layers.Layer):
    """A T5 v1.0 / Switch Transformer block: pre-norm, residual sub-layers.

    An encoder block is self-attention then feed-forward; a decoder block
    (`is_decoder=True`) adds cross-attention over the encoder outputs
    between them. Each sub-layer is `x + dropout(sublayer(norm(x)))` with a
    T5 layer norm (`RMSNormalization`: no bias, no centring). The
    feed-forward layer is a dense ReLU block (`FeedForward`, not gated
    unless `gated`) or,
    with `num_experts`, a Switch layer: a `SparseMoE` with top-1 routing
    whose output is the chosen expert's, multiplied by its router
    probability; tokens over an expert's capacity are dropped (the
    residual carries them).

    Args:
        num_heads: int, attention heads.
        key_value_dim: int, the width of each head.
        intermediate_dim: int, the dense feed-forward width.
        is_decoder: bool, causal self-attention and cross-attention.
        num_experts: int, or None for a dense feed-forward layer.
        expert_intermediate_dim: int, each expert's width (defaults to
            `intermediate_dim`).
        activation: the feed-forward activation. Defaults to `"relu"`.
        gated: bool, GLU feed-forward blocks and experts (T5 v1.1's
            gated GELU, as Switch-XXL uses) instead of plain ones.
        dropout: float in `[0, 1)`, on the residual branches, the
            attention probabilities and the dense feed-forward block's
            hidden activation.
        expert_dropout: float in `[0, 1)`, on each expert's hidden
            activation (the Switch paper's "expert dropout"). Defaults to
            `dropout`, as in T5 and Hugging Face's `SwitchTransformers`.
        layer_norm_epsilon: float, the layer norms' epsilon.
        capacity_factor: float or None, the Switch layer's training
            capacity factor.
        eval_capacity_factor: float or None, its capacity factor outside
            training.
        router_jitter: float in `[0, 1)`, multiplicative noise on the
            router's inputs in training.
        aux_loss_weight: float, weight of the load-balancing loss.
        z_loss_weight: float, weight of the router z-loss.
        expert_kernel: see `SparseMoE`.
        kernel_initializer: initializer of the attention and dense kernels.
        router_initializer: initializer of the router kernel.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        hidden_states: `[batch, length, d]`.
        padding_mask: optional `[batch, length]`, truthy for real tokens.
        position_bias: float `[1, H, q, k]`, the stack's relative bias.
        encoder_outputs: `[batch, encoder_length, d]` (decoder only).
        encoder_padding_mask: optional `[batch, encoder_length]`.
        self_attention_cache: optional `[batch, 2, max_length, H, h]`.
        self_attention_cache_update_index: int or scalar int tensor.
        cross_attention_cache: optional `[batch, 2, encoder_length, H, h]`.
        cross_attention_cache_update_index: int or None.
        training: bool.

    Returns:
        `[batch, length, d]`; with caches, `(outputs, self_attention_cache,
        cross_attention_cache)`.

    Example:

    >>> import numpy as np
    >>> block = SwitchTransformerBlock(
    ...     num_heads=2, key_value_dim=4, intermediate_dim=16, num_experts=4)
    >>> x = np.random.normal(size=(2, 5, 8)).astype("float32")
    >>> tuple(block(x).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        num_heads,
        key_value_dim,
        intermediate_dim,
        is_decoder=False,
        num_experts=None,
        expert_intermediate_dim=None,
        activation="relu",
        gated=False,
        dropout=0.0,
        expert_dropout=None,
        layer_norm_epsilon=1e-6,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        router_jitter=0.01,
        aux_loss_weight=0.01,
        z_loss_weight=0.001,
        expert_kernel="auto",
        kernel_initializer="glorot_uniform",
        router_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_int("num_heads", num_heads, min_value=1)
        self.key_value_dim = check_int("key_value_dim", key_value_dim, min_value=1)
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, min_value=1
        )
        self.is_decoder = check_bool("is_decoder", is_decoder)
        if num_experts is not None:
            num_experts = check_int("num_experts", num_experts, min_value=1)
        self.num_experts = num_experts
        self.expert_intermediate_dim = check_int(
            "expert_intermediate_dim",
            expert_intermediate_dim or intermediate_dim,
            min_value=1,
        )
        self.activation = activation
        self.gated = check_bool("gated", gated)
        self.dropout = check_rate("dropout", dropout)
        self.expert_dropout = check_rate(
            "expert_dropout", self.dropout if expert_dropout is None else expert_dropout
        )
        self.layer_norm_epsilon = check_float(
            "layer_norm_epsilon", layer_norm_epsilon, positive=True
        )
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router_jitter = router_jitter
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.expert_kernel = expert_kernel
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.router_initializer = keras.initializers.get(router_initializer)

        def norm(name):
            return RMSNormalization(
                epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        def attention(name, cross):
            return T5RelativeAttention(
                num_heads=self.num_heads,
                key_value_dim=self.key_value_dim,
                cross_attention=cross,
                dropout=self.dropout,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        self.self_attention_norm = norm("self_attention_norm")
        self.self_attention = attention("self_attention", cross=False)
        if self.is_decoder:
            self.cross_attention_norm = norm("cross_attention_norm")
            self.cross_attention = attention("cross_attention", cross=True)
        self.feedforward_norm = norm("feedforward_norm")
        if self.num_experts is None:
            self.feedforward = FeedForward(
                intermediate_dim=self.intermediate_dim,
                activation=activation,
                gated=self.gated,
                use_bias=False,
                kernel_initializer=self.kernel_initializer,
                dropout=self.dropout,
                dtype=self.dtype_policy,
                name="feedforward",
            )
        else:
            self.feedforward = SparseMoE(
                num_experts=self.num_experts,
                intermediate_dim=self.expert_intermediate_dim,
                top_k=1,
                # Switch multiplies the expert output by the router
                # probability itself, not by a renormalised 1.
                normalize_top_k=False,
                jitter=router_jitter,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                activation=activation,
                gated=self.gated,
                aux_loss_weight=aux_loss_weight,
                z_loss_weight=z_loss_weight,
                causal=self.is_decoder,
                use_bias=False,
                kernel_initializer=self.kernel_initializer,
                router_initializer=self.router_initializer,
                expert_kernel=expert_kernel,
                expert_dropout=self.expert_dropout,
                dtype=self.dtype_policy,
                name="feedforward",
            )
        self.residual_dropout = keras.layers.Dropout(self.dropout)

    @property
    def is_sparse(self):
        return self.num_experts is not None

    def build(self, input_shape):
        self.self_attention_norm.build(input_shape)
        self.self_attention.build(input_shape)
        if self.is_decoder:
            self.cross_attention_norm.build(input_shape)
            self.cross_attention.build(input_shape)
        self.feedforward_norm.build(input_shape)
        self.feedforward.build(input_shape)

    def call(
        self,
        hidden_states,
        padding_mask=None,
        position_bias=None,
        encoder_outputs=None,
        encoder_padding_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        cross_attention_cache_update_index=None,
        training=None,
    ):
        length = ops.shape(hidden_states)[1]
        if self.is_decoder:
            if self_attention_cache is not None:
                # Keys are the whole cache; the query sits at the update index.
                start = self_attention_cache_update_index
                self_mask = attention_mask(
                    length,
                    ops.shape(self_attention_cache)[2],
                    start_index=0 if start is None else start,
                )
            else:
                self_mask = attention_mask(length, length, padding_mask=padding_mask)
        elif padding_mask is not None:
            self_mask = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)
        else:
            self_mask = None

        residual = hidden_states
        attended = self.self_attention(
            self.self_attention_norm(hidden_states),
            position_bias=position_bias,
            attention_mask=self_mask,
            cache=self_attention_cache,
            cache_update_index=self_attention_cache_update_index,
            training=training,
        )
        if self_attention_cache is not None:
            attended, self_attention_cache = attended
        hidden_states = residual + self.residual_dropout(attended, training=training)

        if self.is_decoder:
            cross_mask = None
            if encoder_padding_mask is not None:
                cross_mask = ops.expand_dims(
                    ops.cast(encoder_padding_mask, "bool"), 1
                )
            attended = self.cross_attention(
                self.cross_attention_norm(hidden_states),
                key_value_states=encoder_outputs,
                attention_mask=cross_mask,
                cache=cross_attention_cache,
                cache_update_index=cross_attention_cache_update_index,
                training=training,
            )
            if cross_attention_cache is not None:
                attended, cross_attention_cache = attended
            hidden_states = hidden_states + self.residual_dropout(
                attended, training=training
            )

        normed = self.feedforward_norm(hidden_states)
        if self.is_sparse:
            mask = None
            if padding_mask is not None:
                mask = ops.cast(padding_mask, "bool")
            transformed = self.feedforward(normed, mask=mask, training=training)
        else:
            transformed = self.feedforward(normed, training=training)
        hidden_states = hidden_states + self.residual_dropout(
            transformed, training=training
        )
        if self_attention_cache is not None or cross_attention_cache is not None:
            return hidden_states, self_attention_cache, cross_attention_cache
        return hidden_states

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_value_dim": self.key_value_dim,
                "intermediate_dim": self.intermediate_dim,
                "is_decoder": self.is_decoder,
                "num_experts": self.num_experts,
                "expert_intermediate_dim": self.expert_intermediate_dim,
                "activation": self.activation,
                "gated": self.gated,
                "dropout": self.dropout,
                "expert_dropout": self.expert_dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "router_jitter": self.router_jitter,
                "aux_loss_weight": self.aux_loss_weight,
                "z_loss_weight": self.z_loss_weight,
                "expert_kernel": self.expert_kernel,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "router_initializer": keras.initializers.serialize(
                    self.router_initializer
                ),
            }
        )
        return config
