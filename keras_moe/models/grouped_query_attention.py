import math

import keras
from keras import ops
from keras_hub.layers import RotaryEmbedding

from keras_moe.models.attention_masks import attention_mask
from keras_moe.models.attention_masks import masked_softmax
from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int


@keras.saving.register_keras_serializable(package="keras_moe")
class GroupedQueryAttention(keras.layers.Layer):
    """Causal grouped-query self-attention with rotary position embeddings.

    The attention of Llama, Mixtral, Qwen and OLMoE: `num_query_heads` query
    heads share `num_key_value_heads` key/value heads (query head `i` reads
    key/value head `i // (num_query_heads // num_key_value_heads)`, as
    `repeat_kv` does in Hugging Face transformers). Queries and keys are
    rotated with RoPE in the rotate-half convention (the first half of each
    head pairs with the second half), the convention of keras-hub's Llama and
    Mixtral and of Hugging Face transformers, so converted weights give the
    same outputs. Scores are scaled by `1 / sqrt(head_dim)` and the softmax
    runs in float32.

    Weights (`d` = hidden size, `H` query heads, `K` key/value heads,
    `h` = `head_dim`):
    - `query/kernel [d, H, h]`, `key/kernel [d, K, h]`, `value/kernel [d, K, h]`
    - `attention_output/kernel [H, h, d]` (never a bias)
    - with `use_bias`: `query/bias [H, h]`, `key/bias [K, h]`, `value/bias [K, h]`
    - with `use_qk_norm`: `query_norm/scale [h]`, `key_norm/scale [h]`, an
      RMS normalization of each query and key head before RoPE (Qwen3).

    For generation the layer keeps a key/value cache in the keras-hub layout
    `[batch, 2, max_length, K, h]` (keys after RoPE, then values).

    Args:
        num_query_heads: int, the number of query heads `H`.
        num_key_value_heads: int dividing `num_query_heads`, or `None` for
            `num_query_heads` (multi-head attention).
        head_dim: int, the width of each head, or `None` for
            `hidden_dim // num_query_heads`. Must be even (RoPE).
        rope_max_wavelength: float, the RoPE base. Defaults to 10000.
        use_bias: bool, biases on the query, key and value projections.
        use_qk_norm: bool, RMS-normalize queries and keys per head.
        layer_norm_epsilon: float, the epsilon of the q/k normalization.
        dropout: float in `[0, 1)`, dropout on the attention probabilities.
        kernel_initializer: initializer of the projection kernels.
        bias_initializer: initializer of the projection biases.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        hidden_states: `[batch, length, d]`.
        padding_mask: optional `[batch, length]`, truthy for real tokens;
            padding keys get no attention. Not used with a `cache`, whose
            keys are masked by position only (prompts are right-padded).
        cache: optional `[batch, 2, max_length, K, h]` key/value cache.
        cache_update_index: int or scalar int tensor, the position of the
            first token of `hidden_states` in the cache. With a `cache` and no
            index, the cache is read and left as it is.
        training: bool, turns on dropout.

    Returns:
        `[batch, length, d]`, and the updated cache when a `cache` is given.

    Example:

    >>> import numpy as np
    >>> attention = GroupedQueryAttention(num_query_heads=4, num_key_value_heads=2)
    >>> x = np.random.normal(size=(2, 6, 16)).astype("float32")
    >>> tuple(attention(x).shape)
    (2, 6, 16)
    >>> sorted(tuple(w.shape) for w in attention.weights)
    [(4, 4, 16), (16, 2, 4), (16, 2, 4), (16, 4, 4)]
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads=None,
        head_dim=None,
        rope_max_wavelength=10000.0,
        use_bias=False,
        use_qk_norm=False,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_query_heads = check_int(
            "num_query_heads", num_query_heads, min_value=1
        )
        if num_key_value_heads is not None:
            num_key_value_heads = check_int(
                "num_key_value_heads", num_key_value_heads, min_value=1
            )
            if self.num_query_heads % num_key_value_heads:
                raise ValueError(
                    "`num_key_value_heads` must divide `num_query_heads` "
                    f"({self.num_query_heads}). "
                    f"Received: num_key_value_heads={num_key_value_heads}"
                )
        self.num_key_value_heads = num_key_value_heads
        if head_dim is not None:
            head_dim = check_int("head_dim", head_dim, min_value=2)
            if head_dim % 2:
                raise ValueError(
                    "`head_dim` must be even (RoPE rotates pairs of "
                    f"features). Received: head_dim={head_dim}"
                )
        self.head_dim = head_dim
        self.rope_max_wavelength = check_float(
            "rope_max_wavelength", rope_max_wavelength, positive=True
        )
        self.use_bias = check_bool("use_bias", use_bias)
        self.use_qk_norm = check_bool("use_qk_norm", use_qk_norm)
        self.layer_norm_epsilon = check_float(
            "layer_norm_epsilon", layer_norm_epsilon, positive=True
        )
        self.dropout = check_float("dropout", dropout)
        if self.dropout >= 1:
            raise ValueError(
                f"`dropout` must be in [0, 1). Received: dropout={dropout}"
            )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    @property
    def _num_kv_heads(self):
        if self.num_key_value_heads is None:
            return self.num_query_heads
        return self.num_key_value_heads

    def _dense(self, equation, output_shape, bias_axes, name):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "`GroupedQueryAttention` expects inputs [batch, length, "
                f"hidden_dim] with a known hidden_dim. Received: {input_shape}"
            )
        self.hidden_dim = int(input_shape[-1])
        if self.head_dim is None:
            if self.hidden_dim % self.num_query_heads:
                raise ValueError(
                    f"The hidden size ({self.hidden_dim}) must be divisible "
                    f"by `num_query_heads` ({self.num_query_heads}) when "
                    "`head_dim` is None."
                )
            if (self.hidden_dim // self.num_query_heads) % 2:
                raise ValueError(
                    "The head width hidden_dim // num_query_heads = "
                    f"{self.hidden_dim // self.num_query_heads} must be even "
                    "(RoPE rotates pairs of features); set `head_dim`."
                )
        self._head_dim = self.head_dim or self.hidden_dim // self.num_query_heads
        num_heads, num_kv_heads = self.num_query_heads, self._num_kv_heads
        qkv_bias = "nh" if self.use_bias else None
        self.query_dense = self._dense(
            "bsd,dnh->bsnh", (None, num_heads, self._head_dim), qkv_bias, "query"
        )
        self.key_dense = self._dense(
            "bsd,dnh->bsnh", (None, num_kv_heads, self._head_dim), qkv_bias, "key"
        )
        self.value_dense = self._dense(
            "bsd,dnh->bsnh",
            (None, num_kv_heads, self._head_dim),
            qkv_bias,
            "value",
        )
        self.output_dense = self._dense(
            "bsnh,nhd->bsd", (None, self.hidden_dim), None, "attention_output"
        )
        for layer in (self.query_dense, self.key_dense, self.value_dense):
            layer.build(input_shape)
        self.output_dense.build((None, None, num_heads, self._head_dim))
        if self.use_qk_norm:
            self.query_norm = RMSNormalization(
                self.layer_norm_epsilon, dtype=self.dtype_policy, name="query_norm"
            )
            self.key_norm = RMSNormalization(
                self.layer_norm_epsilon, dtype=self.dtype_policy, name="key_norm"
            )
            self.query_norm.build((None, None, num_heads, self._head_dim))
            self.key_norm.build((None, None, num_kv_heads, self._head_dim))
        self.rotary_embedding = RotaryEmbedding(
            max_wavelength=self.rope_max_wavelength,
            dtype=self.dtype_policy,
            name="rotary_embedding",
        )
        self.dropout_layer = None
        if self.dropout > 0:
            self.dropout_layer = keras.layers.Dropout(
                self.dropout, dtype=self.dtype_policy, name="attention_dropout"
            )

    def cache_shape(self, max_length):
        """The shape of this layer's cache for one sequence, without batch."""
        return (2, max_length, self._num_kv_heads, self._head_dim)

    def _keys_and_values(self, hidden_states, start_index):
        key = self.key_dense(hidden_states)
        if self.use_qk_norm:
            key = self.key_norm(key)
        key = self.rotary_embedding(key, start_index=start_index)
        return key, self.value_dense(hidden_states)

    def call(
        self,
        hidden_states,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        if cache is None and cache_update_index is not None:
            raise ValueError(
                "`cache_update_index` is only meaningful with a `cache`. "
                f"Received: cache_update_index={cache_update_index}"
            )
        start_index = 0 if cache_update_index is None else cache_update_index
        query = self.query_dense(hidden_states)
        if self.use_qk_norm:
            query = self.query_norm(query)
        query = self.rotary_embedding(query, start_index=start_index)

        if cache is None:
            key, value = self._keys_and_values(hidden_states, start_index)
        else:
            key, value = cache[:, 0, ...], cache[:, 1, ...]
            if cache_update_index is not None:
                key_update, value_update = self._keys_and_values(
                    hidden_states, start_index
                )
                start = [0, cache_update_index, 0, 0]
                key = ops.slice_update(key, start, key_update)
                value = ops.slice_update(value, start, value_update)
                cache = ops.stack((key, value), axis=1)
            # Cached keys are masked by position only.
            padding_mask = None

        # Group the query heads by the key/value head they read, instead of
        # repeating keys and values: [b, q, K, H // K, h].
        groups = self.num_query_heads // self._num_kv_heads
        query_shape = ops.shape(query)
        query = ops.reshape(
            query,
            (-1, query_shape[1], self._num_kv_heads, groups, self._head_dim),
        )
        scores = ops.einsum("bqkgh,bskh->bkgqs", query, key)
        scores = ops.cast(scores, "float32") * (1.0 / math.sqrt(self._head_dim))
        mask = attention_mask(
            ops.shape(query)[1], ops.shape(key)[1], start_index, padding_mask
        )
        probs = ops.cast(masked_softmax(scores, mask), self.compute_dtype)
        if self.dropout_layer is not None:
            probs = self.dropout_layer(probs, training=training)
        outputs = ops.einsum("bkgqs,bskh->bqkgh", probs, value)
        outputs = ops.reshape(
            outputs,
            (-1, query_shape[1], self.num_query_heads, self._head_dim),
        )
        outputs = self.output_dense(outputs)
        if cache is not None:
            return outputs, cache
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "rope_max_wavelength": self.rope_max_wavelength,
                "use_bias": self.use_bias,
                "use_qk_norm": self.use_qk_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config
