"""T5 multi-head attention: unscaled scores plus a relative position bias."""

import keras
from keras import ops

from keras_moe.models.attention_masks import masked_softmax
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_rate


@keras.saving.register_keras_serializable(package="keras_moe")
class T5RelativeAttention(keras.layers.Layer):
    """Multi-head attention as T5 and Switch Transformer compute it.

    Scores are `q . k` with no `1 / sqrt(head_dim)` scaling (T5 folds it
    into the initialization), plus the position bias the stack shares
    (`T5RelativePositionBias`, self-attention only), then a float32 softmax
    over the keys the mask allows. No projection has a bias.

    Self-attention (`cross_attention=False`) attends over its own inputs;
    cross-attention attends over the encoder's outputs. For generation,
    self-attention keeps a key/value cache `[batch, 2, max_length, H, h]`
    written at `cache_update_index`; cross-attention's cache
    `[batch, 2, encoder_length, H, h]` is computed once from the encoder
    outputs (with `cache_update_index` set, e.g. 0) and read afterwards
    (with `cache_update_index=None`).

    Weights (`d` = hidden size, `H` heads, `h` = `key_value_dim`):
    `query/kernel`, `key/kernel`, `value/kernel` `[d, H, h]` and
    `output/kernel` `[H, h, d]`.

    Args:
        num_heads: int, attention heads `H`.
        key_value_dim: int, the width `h` of each head (T5's `d_kv`).
        cross_attention: bool, attend over `key_value_states`.
        dropout: float in `[0, 1)`, dropout on the attention probabilities.
        kernel_initializer: initializer of the projection kernels.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        hidden_states: `[batch, q, d]`, the queries' inputs.
        key_value_states: `[batch, k, d]`, the encoder outputs
            (cross-attention only).
        position_bias: optional float `[1 or batch, H, q, k]`.
        attention_mask: optional bool `[batch or 1, q, k]`, True where a
            query may attend to a key.
        cache: optional key/value cache (see above).
        cache_update_index: int or scalar int tensor, or None (read the
            cache as it is).
        training: bool, turns on dropout.

    Returns:
        `[batch, q, d]`, and the cache when a `cache` is given.

    Example:

    >>> import numpy as np
    >>> attention = T5RelativeAttention(num_heads=2, key_value_dim=4)
    >>> x = np.random.normal(size=(3, 5, 8)).astype("float32")
    >>> tuple(attention(x).shape)
    (3, 5, 8)
    >>> sorted(tuple(w.shape) for w in attention.weights)
    [(2, 4, 8), (8, 2, 4), (8, 2, 4), (8, 2, 4)]
    """

    def __init__(
        self,
        num_heads,
        key_value_dim,
        cross_attention=False,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_int("num_heads", num_heads, min_value=1)
        self.key_value_dim = check_int("key_value_dim", key_value_dim, min_value=1)
        self.cross_attention = check_bool("cross_attention", cross_attention)
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype="float32")

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                "The last dimension of the `T5RelativeAttention` input must be "
                f"known. Received: input_shape={tuple(input_shape)}"
            )
        hidden_dim = int(input_shape[-1])
        heads = (self.num_heads, self.key_value_dim)
        for name in ("query", "key", "value"):
            kernel = self.add_weight(
                name=f"{name}_kernel",
                shape=(hidden_dim,) + heads,
                initializer=self.kernel_initializer,
            )
            setattr(self, f"{name}_kernel", kernel)
        self.output_kernel = self.add_weight(
            name="output_kernel",
            shape=heads + (hidden_dim,),
            initializer=self.kernel_initializer,
        )

    def cache_shape(self, max_length):
        """The per-layer cache shape without the batch axis."""
        return (2, max_length, self.num_heads, self.key_value_dim)

    def _project(self, inputs, kernel):
        return ops.einsum("bld,dnh->blnh", inputs, kernel)

    def _keys_and_values(self, hidden_states, key_value_states, cache, index):
        if self.cross_attention:
            if cache is not None and index is None:
                return cache[:, 0], cache[:, 1], cache
            keys = self._project(key_value_states, self.key_kernel)
            values = self._project(key_value_states, self.value_kernel)
            if cache is not None:
                cache = ops.stack([keys, values], axis=1)
            return keys, values, cache
        if cache is not None and index is None:
            return cache[:, 0], cache[:, 1], cache
        keys = self._project(hidden_states, self.key_kernel)
        values = self._project(hidden_states, self.value_kernel)
        if cache is not None:
            start = [0, index, 0, 0]
            keys = ops.slice_update(cache[:, 0], start, ops.cast(keys, cache.dtype))
            values = ops.slice_update(
                cache[:, 1], start, ops.cast(values, cache.dtype)
            )
            cache = ops.stack([keys, values], axis=1)
        return keys, values, cache

    def call(
        self,
        hidden_states,
        key_value_states=None,
        position_bias=None,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        if self.cross_attention and key_value_states is None and cache is None:
            raise ValueError(
                "A cross-attention `T5RelativeAttention` needs "
                "`key_value_states` (the encoder outputs) or a filled `cache`. "
                "Received: key_value_states=None, cache=None"
            )
        queries = self._project(hidden_states, self.query_kernel)
        keys, values, cache = self._keys_and_values(
            hidden_states, key_value_states, cache, cache_update_index
        )
        # No 1/sqrt(head_dim): T5 scales its query initialization instead.
        scores = ops.cast(
            ops.einsum("bqnh,bknh->bnqk", queries, keys), "float32"
        )
        if position_bias is not None:
            scores = scores + ops.cast(position_bias, "float32")
        if attention_mask is None:
            probabilities = ops.softmax(scores, axis=-1)
        else:
            probabilities = masked_softmax(scores, attention_mask)
        probabilities = self.dropout_layer(probabilities, training=training)
        probabilities = ops.cast(probabilities, self.compute_dtype)
        outputs = ops.einsum("bnqk,bknh->bqnh", probabilities, values)
        outputs = ops.einsum("bqnh,nhd->bqd", outputs, self.output_kernel)
        if cache is not None:
            return outputs, cache
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_value_dim": self.key_value_dim,
                "cross_attention": self.cross_attention,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
