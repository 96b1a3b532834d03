import inspect

import keras

from keras_moe.models.layer_normalization import make_normalization
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_rate


def _accepts_mask(layer):
    return "mask" in inspect.signature(layer.call).parameters


@keras.saving.register_keras_serializable(package="keras_moe")
class MoEDecoderBlock(keras.layers.Layer):
    """A pre-norm transformer decoder block around any attention and FFN.

    `x = x + dropout(attention(norm(x)))`, then
    `x = x + dropout(feedforward(norm(x)))`: the block of Llama, Mixtral,
    Qwen-MoE and DeepSeek. The feed-forward part is a dense `FeedForward`, a
    `SparseMoE` or a `SharedExpertMoE`; MoE layers get the padding mask, so
    padding tokens are not routed.

    Weights: those of `attention` and `feedforward`, plus
    `pre_attention_norm/scale [d]` and `pre_feedforward_norm/scale [d]`.

    Args:
        attention: a `GroupedQueryAttention` or `MultiHeadLatentAttention`
            (any layer with their call signature and `cache_shape()`).
        feedforward: the feed-forward layer, `[..., d] -> [..., d]`.
        layer_norm_epsilon: float, the epsilon of the two normalizations.
        norm_type: `"rms"` (RMSNorm, the default) or `"layer"` (LayerNorm
            without bias, DBRX) for the two normalizations.
        dropout: float in `[0, 1)`, dropout on the attention and
            feed-forward outputs before each residual addition.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        hidden_states: `[batch, length, d]`.
        padding_mask: optional `[batch, length]`, truthy for real tokens.
        cache: optional attention cache (see the attention layer).
        cache_update_index: int or scalar int tensor, where `hidden_states`
            goes in the cache.
        training: bool.

    Returns:
        `[batch, length, d]`, and the updated cache when a `cache` is given.

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> from keras_moe.models import GroupedQueryAttention
    >>> block = MoEDecoderBlock(
    ...     attention=GroupedQueryAttention(num_query_heads=2),
    ...     feedforward=SparseMoE(num_experts=4, intermediate_dim=32),
    ... )
    >>> x = np.random.normal(size=(2, 6, 16)).astype("float32")
    >>> tuple(block(x, padding_mask=np.ones((2, 6), bool)).shape)
    (2, 6, 16)
    """

    def __init__(
        self,
        attention,
        feedforward,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        norm_type="rms",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(attention, keras.layers.Layer):
            raise ValueError(
                "`attention` must be a Keras layer. "
                f"Received: attention={attention!r}"
            )
        if not isinstance(feedforward, keras.layers.Layer):
            raise ValueError(
                "`feedforward` must be a Keras layer. "
                f"Received: feedforward={feedforward!r}"
            )
        self.attention = attention
        self.feedforward = feedforward
        self.layer_norm_epsilon = check_float(
            "layer_norm_epsilon", layer_norm_epsilon, positive=True
        )
        self.dropout = check_rate("dropout", dropout)
        self._feedforward_takes_mask = _accepts_mask(feedforward)
        self.norm_type = norm_type
        self.pre_attention_norm = make_normalization(
            norm_type,
            self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="pre_attention_norm",
        )
        self.pre_feedforward_norm = make_normalization(
            norm_type,
            self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="pre_feedforward_norm",
        )
        self.attention_dropout = None
        self.feedforward_dropout = None
        if self.dropout > 0:
            self.attention_dropout = keras.layers.Dropout(
                self.dropout, dtype=self.dtype_policy, name="attention_dropout"
            )
            self.feedforward_dropout = keras.layers.Dropout(
                self.dropout, dtype=self.dtype_policy, name="feedforward_dropout"
            )

    def build(self, input_shape):
        self.pre_attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.pre_feedforward_norm.build(input_shape)
        self.feedforward.build(input_shape)

    def call(
        self,
        hidden_states,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        residual = hidden_states
        x = self.pre_attention_norm(hidden_states)
        if cache is None:
            x = self.attention(
                x,
                padding_mask=padding_mask,
                cache_update_index=cache_update_index,
                training=training,
            )
        else:
            x, cache = self.attention(
                x,
                cache=cache,
                cache_update_index=cache_update_index,
                training=training,
            )
        if self.attention_dropout is not None:
            x = self.attention_dropout(x, training=training)
        x = x + residual

        residual = x
        x = self.pre_feedforward_norm(x)
        if self._feedforward_takes_mask and padding_mask is not None:
            x = self.feedforward(
                x, mask=keras.ops.cast(padding_mask, "bool"), training=training
            )
        else:
            x = self.feedforward(x, training=training)
        if self.feedforward_dropout is not None:
            x = self.feedforward_dropout(x, training=training)
        outputs = x + residual
        if cache is not None:
            return outputs, cache
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "attention": keras.saving.serialize_keras_object(self.attention),
                "feedforward": keras.saving.serialize_keras_object(
                    self.feedforward
                ),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "norm_type": self.norm_type,
                "dropout": self.dropout,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("attention", "feedforward"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
