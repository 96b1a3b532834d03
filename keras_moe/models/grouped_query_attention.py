import math

import keras
from keras import ops
from keras_hub.layers import RotaryEmbedding

from keras_moe.models.attention_masks import attention_mask
from keras_moe.models.attention_masks import masked_softmax
from keras_moe.models.attention_masks import query_start_index
from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.models.rope_scaling import normalize_gqa_rope_scaling
from keras_moe.models.rope_scaling import rope_parameters
from keras_moe.models.yarn import apply_rotary
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_rate


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
    - `attention_output/kernel [H, h, d]`, and with `use_output_bias`
      `attention_output/bias [d]` (GPT-OSS)
    - with `use_bias`: `query/bias [H, h]`, `key/bias [K, h]`, `value/bias [K, h]`
    - with `use_qk_norm`: `query_norm/scale [h]`, `key_norm/scale [h]`, an
      RMS normalization of each query and key head before RoPE (Qwen3,
      GLM-4.5); with `qk_norm_per_head=False` one RMS normalization over
      the whole query and key projections instead, `query_norm/scale
      [H * h]` and `key_norm/scale [K * h]` (OLMoE).

    `clip_qkv` clamps the queries, keys and values to `[-clip_qkv,
    clip_qkv]` after the projections (and the q/k norm), before RoPE (DBRX,
    OLMoE). `partial_rotary_factor < 1` rotates only the first
    `int(h * partial_rotary_factor)` features of each head (rotate-half
    within them) and passes the rest through (GLM-4.5).

    `sliding_window=w` lets each query see only the `w` most recent
    positions, its own included (Mistral, Qwen, GPT-OSS's sliding layers),
    in the full forward pass and in cached decoding alike. `use_sinks`
    adds GPT-OSS's attention sinks, `sinks [H]`: one learned logit per
    query head in the softmax denominator, a key without value. A YaRN
    `rope_scaling` (GPT-OSS) replaces plain RoPE with YaRN's frequencies and
    cos/sin scale (see `keras_moe.models.yarn`); a llama3 `rope_scaling`
    (Llama 4 Scout) rescales the frequencies only (see
    `keras_moe.models.rope_scaling`).

    Llama 4 options: `attention_chunk_size=c` cuts positions into chunks of
    `c` tokens and lets each query see only its own chunk (transformers'
    `chunked_attention`). `use_rope=False` makes a NoPE layer, without
    position embedding. `use_qk_l2_norm` divides each query and key head by
    its root mean square, without a learned scale, after RoPE (transformers'
    `Llama4TextL2Norm`). With `temperature_floor_scale=f` the query at
    absolute position `p` is multiplied by `1 + temperature_scale *
    log(1 + floor((p + 1) / f))` (attention temperature tuning, Nakanishi
    2025), so long contexts keep sharp attention.

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
        qk_norm_per_head: bool, with `use_qk_norm`: normalize each head
            (True, the default) or the whole projection (False, OLMoE).
        clip_qkv: positive float or None, clamp q, k and v to
            `[-clip_qkv, clip_qkv]`. None (the default) clamps nothing.
        partial_rotary_factor: float in `(0, 1]`, the fraction of each
            head's features that RoPE rotates. Defaults to 1.
        sliding_window: int >= 1 or None, the number of most recent
            positions (the query's own included) each query sees. None (the
            default) sees the whole prefix.
        use_sinks: bool, a learned sink logit per query head (GPT-OSS).
        use_output_bias: bool, a bias on the output projection (GPT-OSS).
        rope_scaling: None (plain RoPE), a YaRN dict (`rope_type`
            `"yarn"`, `factor`, `original_max_position_embeddings`, ...) or
            a llama3 dict (`rope_type` `"llama3"`, `factor`,
            `low_freq_factor`, `high_freq_factor`,
            `original_max_position_embeddings`).
        attention_chunk_size: int >= 1 or None, the length of the chunks
            each query is confined to. None (the default): no chunks.
        use_rope: bool, rotate queries and keys with RoPE (the default);
            False makes a NoPE layer.
        use_qk_l2_norm: bool, RMS-normalize each query and key head without
            a weight, after RoPE (Llama 4).
        temperature_floor_scale: int >= 1 or None, turns on attention
            temperature tuning with this floor scale (Llama 4: 8192).
        temperature_scale: float >= 0, the strength of temperature tuning.
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
        qk_norm_per_head=True,
        clip_qkv=None,
        partial_rotary_factor=1.0,
        sliding_window=None,
        use_sinks=False,
        use_output_bias=False,
        rope_scaling=None,
        attention_chunk_size=None,
        use_rope=True,
        use_qk_l2_norm=False,
        temperature_floor_scale=None,
        temperature_scale=0.1,
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
        self.qk_norm_per_head = check_bool("qk_norm_per_head", qk_norm_per_head)
        self.clip_qkv = None
        if clip_qkv is not None:
            self.clip_qkv = check_float("clip_qkv", clip_qkv, positive=True)
        self.partial_rotary_factor = check_float(
            "partial_rotary_factor", partial_rotary_factor, positive=True
        )
        if self.partial_rotary_factor > 1:
            raise ValueError(
                "`partial_rotary_factor` must be in (0, 1]. "
                f"Received: partial_rotary_factor={partial_rotary_factor}"
            )
        self.sliding_window = None
        if sliding_window is not None:
            self.sliding_window = check_int(
                "sliding_window", sliding_window, min_value=1
            )
        self.use_sinks = check_bool("use_sinks", use_sinks)
        self.use_output_bias = check_bool("use_output_bias", use_output_bias)
        self.rope_scaling = normalize_gqa_rope_scaling(rope_scaling)
        self.attention_chunk_size = None
        if attention_chunk_size is not None:
            self.attention_chunk_size = check_int(
                "attention_chunk_size", attention_chunk_size, min_value=1
            )
        self.use_rope = check_bool("use_rope", use_rope)
        self.use_qk_l2_norm = check_bool("use_qk_l2_norm", use_qk_l2_norm)
        self.temperature_floor_scale = None
        if temperature_floor_scale is not None:
            self.temperature_floor_scale = check_int(
                "temperature_floor_scale", temperature_floor_scale, min_value=1
            )
        self.temperature_scale = check_float("temperature_scale", temperature_scale)
        self.layer_norm_epsilon = check_float(
            "layer_norm_epsilon", layer_norm_epsilon, positive=True
        )
        self.dropout = check_rate("dropout", dropout)
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
            "bsnh,nhd->bsd",
            (None, self.hidden_dim),
            "d" if self.use_output_bias else None,
            "attention_output",
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
            if self.qk_norm_per_head:
                self.query_norm.build((None, None, num_heads, self._head_dim))
                self.key_norm.build((None, None, num_kv_heads, self._head_dim))
            else:
                self.query_norm.build((None, None, num_heads * self._head_dim))
                self.key_norm.build((None, None, num_kv_heads * self._head_dim))
        self._rotary_dim = int(self._head_dim * self.partial_rotary_factor)
        if self._rotary_dim < 2 or self._rotary_dim % 2:
            raise ValueError(
                "`partial_rotary_factor` must leave an even number of rotated "
                f"features per head; int({self._head_dim} * "
                f"{self.partial_rotary_factor}) = {self._rotary_dim}. "
                f"Received: partial_rotary_factor={self.partial_rotary_factor}"
            )
        if self.use_sinks:
            self.sinks = self.add_weight(
                name="sinks",
                shape=(num_heads,),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
            )
        self._softmax_scale_factor = 1.0
        if self.rope_scaling is not None:
            (
                self._yarn_inverse_frequencies,
                self._yarn_attention_factor,
                self._softmax_scale_factor,
            ) = rope_parameters(
                self.rope_scaling, self._rotary_dim, self.rope_max_wavelength
            )
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

    def _normalized(self, heads, norm):
        """q/k norm of `[b, s, heads, h]`, per head or over all heads."""
        if self.qk_norm_per_head:
            return norm(heads)
        length, num_heads = ops.shape(heads)[1], heads.shape[2]
        flat = ops.reshape(heads, (-1, length, num_heads * self._head_dim))
        return ops.reshape(norm(flat), (-1, length, num_heads, self._head_dim))

    def _clipped(self, states):
        if self.clip_qkv is None:
            return states
        return ops.clip(states, -self.clip_qkv, self.clip_qkv)

    def _rope(self, heads, start_index):
        if self.rope_scaling is not None:
            return apply_rotary(
                heads,
                self._yarn_inverse_frequencies,
                self._yarn_attention_factor,
                start_index,
            )
        return self.rotary_embedding(heads, start_index=start_index)

    def _l2_normalized(self, heads):
        """Llama 4's weightless RMS norm of each head, in float32."""
        if not self.use_qk_l2_norm:
            return heads
        values = ops.cast(heads, "float32")
        values = values * ops.rsqrt(
            ops.mean(ops.square(values), axis=-1, keepdims=True)
            + self.layer_norm_epsilon
        )
        return ops.cast(values, heads.dtype)

    def _temperature_tuned(self, query, start_index):
        """Queries times `1 + scale * log1p(floor((p + 1) / floor_scale))`."""
        if self.temperature_floor_scale is None:
            return query
        positions = ops.arange(ops.shape(query)[1], dtype="float32") + ops.cast(
            start_index, "float32"
        )
        scales = (
            ops.log1p(ops.floor((positions + 1.0) / self.temperature_floor_scale))
            * self.temperature_scale
            + 1.0
        )
        return query * ops.cast(ops.reshape(scales, (1, -1, 1, 1)), query.dtype)

    def _rotated(self, heads, start_index):
        """RoPE on the first `_rotary_dim` features of each head."""
        if not self.use_rope:
            return heads
        if self._rotary_dim == self._head_dim:
            return self._rope(heads, start_index)
        rotated = self._rope(heads[..., : self._rotary_dim], start_index)
        return ops.concatenate([rotated, heads[..., self._rotary_dim :]], axis=-1)

    def _keys_and_values(self, hidden_states, start_index):
        key = self.key_dense(hidden_states)
        if self.use_qk_norm:
            key = self._normalized(key, self.key_norm)
        key = self._rotated(self._clipped(key), start_index)
        key = self._l2_normalized(key)
        return key, self._clipped(self.value_dense(hidden_states))

    def call(
        self,
        hidden_states,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        start_index = query_start_index(cache, cache_update_index)
        query = self.query_dense(hidden_states)
        if self.use_qk_norm:
            query = self._normalized(query, self.query_norm)
        query = self._rotated(self._clipped(query), start_index)
        query = self._l2_normalized(query)
        query = self._temperature_tuned(query, start_index)

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
        scores = ops.cast(scores, "float32") * (
            self._softmax_scale_factor / math.sqrt(self._head_dim)
        )
        mask = attention_mask(
            ops.shape(query)[1],
            ops.shape(key)[1],
            start_index,
            padding_mask,
            sliding_window=self.sliding_window,
            chunk_size=self.attention_chunk_size,
        )
        sinks = None
        if self.use_sinks:
            # [H] -> [1, K, H // K, 1, 1], the head axes of `scores`.
            sinks = ops.reshape(
                ops.cast(self.sinks, "float32"),
                (1, self._num_kv_heads, groups, 1, 1),
            )
        probs = ops.cast(masked_softmax(scores, mask, sinks), self.compute_dtype)
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
                "qk_norm_per_head": self.qk_norm_per_head,
                "clip_qkv": self.clip_qkv,
                "partial_rotary_factor": self.partial_rotary_factor,
                "sliding_window": self.sliding_window,
                "use_sinks": self.use_sinks,
                "use_output_bias": self.use_output_bias,
                "rope_scaling": (
                    None if self.rope_scaling is None else dict(self.rope_scaling)
                ),
                "attention_chunk_size": self.attention_chunk_size,
                "use_rope": self.use_rope,
                "use_qk_l2_norm": self.use_qk_l2_norm,
                "temperature_floor_scale": self.temperature_floor_scale,
                "temperature_scale": self.temperature_scale,
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
