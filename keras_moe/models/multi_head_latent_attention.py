import math

import keras
import numpy as np
from keras import ops
from keras import quantizers
from keras_hub.layers import RotaryEmbedding

from keras_moe.models.attention_masks import attention_mask
from keras_moe.models.attention_masks import masked_softmax
from keras_moe.models.attention_masks import query_start_index
from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.models.yarn import apply_rotary
from keras_moe.models.yarn import normalize_rope_scaling
from keras_moe.models.yarn import yarn_parameters
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_rate


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiHeadLatentAttention(keras.layers.Layer):
    """Causal Multi-head Latent Attention (DeepSeek-V2 / DeepSeek-V3).

    Keys and values are read from a low-rank latent: each token is projected
    to a `kv_lora_rank` vector (RMS-normalized) plus one `qk_rope_head_dim`
    rotary key shared by every head. The latent is expanded per head into a
    `qk_nope_head_dim` key part and a `v_head_dim` value. Queries come from
    a plain projection, or, with `q_lora_rank`, from a low-rank projection
    with its own RMS normalization. Each head's key is
    `[k_nope_h, k_rope]` and its query `[q_nope_h, rope(q_pe_h)]`; scores are
    scaled by `1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)` and the softmax
    runs in float32. This is the math of Hugging Face transformers'
    `DeepseekV3Attention` (without YaRN rope scaling).

    RoPE: with `rope_interleave=True` (the default, DeepSeek's own code and
    transformers' `rope_interleave=True`), the rotary parts rotate adjacent
    pairs `(x[2i], x[2i+1])` by the angle `position * base^(-2i/r)`. The
    layer permutes them to `[x[0::2], x[1::2]]` and applies the rotate-half
    RoPE, exactly as transformers' `apply_rotary_pos_emb_interleave`; the
    permutation is the same for queries and keys, so scores are unchanged by
    it. With `rope_interleave=False` the rotary parts use rotate-half RoPE as
    they are. With a YaRN `rope_scaling` (the released DeepSeek-V2/V3
    checkpoints), the rotary frequencies and scales are YaRN's and the
    softmax scale is multiplied by `mscale(factor, mscale_all_dim) ** 2`, as
    in transformers (see `keras_moe.models.yarn`).

    Weights (`d` hidden size, `H` heads, `n` = `qk_nope_head_dim`,
    `r` = `qk_rope_head_dim`, `v` = `v_head_dim`), no biases:
    - with `q_lora_rank`: `q_a_proj/kernel [d, q_lora_rank]`,
      `q_a_norm/scale [q_lora_rank]`, `q_b_proj/kernel [q_lora_rank, H, n + r]`
    - without: `q_proj/kernel [d, H, n + r]`
    - `kv_a_proj_with_mqa/kernel [d, kv_lora_rank + r]`,
      `kv_a_norm/scale [kv_lora_rank]`,
      `kv_b_proj/kernel [kv_lora_rank, H, n + v]` (per head: key part, then
      value part, the layout of transformers' `kv_b_proj`)
    - `o_proj/kernel [H, v, d]`

    The generation cache holds what MLA was designed to cache: per token,
    the normalized latent and the rotated shared key,
    `[batch, max_length, kv_lora_rank + r]`. Cached calls fold `kv_b_proj`
    into the query and the output ("weight absorption") instead of expanding
    the cache into per-head keys and values; uncached calls expand. A
    quantized or LoRA-adapted `kv_b_proj` is folded in as the float map it
    applies, so cached and uncached calls agree in every mode.

    Args:
        num_heads: int, the number of attention heads `H`.
        kv_lora_rank: int, the width of the key/value latent.
        qk_nope_head_dim: int, the per-head key/query width without RoPE.
        qk_rope_head_dim: even int, the width of the rotary query/key part.
        v_head_dim: int, the per-head value width.
        q_lora_rank: int or `None` (a plain query projection).
        rope_max_wavelength: float, the RoPE base. Defaults to 10000.
        rope_interleave: bool, pairwise (DeepSeek) or rotate-half RoPE.
        rope_scaling: `None` (plain RoPE) or a YaRN dict (`rope_type`
            `"yarn"`, `factor`, `original_max_position_embeddings`, and
            optionally `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`,
            `attention_factor`, `truncate`), as in a transformers config.
        layer_norm_epsilon: float, the epsilon of the latent normalizations.
        dropout: float in `[0, 1)`, dropout on the attention probabilities.
        kernel_initializer: initializer of the projection kernels.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        hidden_states: `[batch, length, d]`.
        padding_mask: optional `[batch, length]`, truthy for real tokens;
            padding keys get no attention. Not used with a `cache`, whose
            keys are masked by position only (prompts are right-padded).
        cache: optional `[batch, max_length, kv_lora_rank + r]` latent cache.
        cache_update_index: int or scalar int tensor, the position of the
            first token of `hidden_states` in the cache. With a `cache` and no
            index, the cache is read and left as it is.
        training: bool, turns on dropout.

    Returns:
        `[batch, length, d]`, and the updated cache when a `cache` is given.

    Example:

    >>> import numpy as np
    >>> attention = MultiHeadLatentAttention(
    ...     num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
    ...     qk_rope_head_dim=2, v_head_dim=4, q_lora_rank=6)
    >>> x = np.random.normal(size=(2, 5, 16)).astype("float32")
    >>> tuple(attention(x).shape)
    (2, 5, 16)
    >>> attention.cache_shape(max_length=5)
    (5, 10)
    """

    def __init__(
        self,
        num_heads,
        kv_lora_rank,
        qk_nope_head_dim,
        qk_rope_head_dim,
        v_head_dim,
        q_lora_rank=None,
        rope_max_wavelength=10000.0,
        rope_interleave=True,
        rope_scaling=None,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_int("num_heads", num_heads, min_value=1)
        self.kv_lora_rank = check_int("kv_lora_rank", kv_lora_rank, min_value=1)
        self.qk_nope_head_dim = check_int(
            "qk_nope_head_dim", qk_nope_head_dim, min_value=1
        )
        self.qk_rope_head_dim = check_int(
            "qk_rope_head_dim", qk_rope_head_dim, min_value=2
        )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                "`qk_rope_head_dim` must be even (RoPE rotates pairs of "
                f"features). Received: qk_rope_head_dim={qk_rope_head_dim}"
            )
        self.v_head_dim = check_int("v_head_dim", v_head_dim, min_value=1)
        if q_lora_rank is not None:
            q_lora_rank = check_int("q_lora_rank", q_lora_rank, min_value=1)
        self.q_lora_rank = q_lora_rank
        self.rope_max_wavelength = check_float(
            "rope_max_wavelength", rope_max_wavelength, positive=True
        )
        self.rope_interleave = check_bool("rope_interleave", rope_interleave)
        self.rope_scaling = normalize_rope_scaling(rope_scaling)
        self._softmax_scale_factor = 1.0
        if self.rope_scaling is not None:
            (
                self._yarn_inverse_frequencies,
                self._yarn_attention_factor,
                self._softmax_scale_factor,
            ) = yarn_parameters(
                self.rope_scaling, self.qk_rope_head_dim, self.rope_max_wavelength
            )
        self.layer_norm_epsilon = check_float(
            "layer_norm_epsilon", layer_norm_epsilon, positive=True
        )
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        # Even features first, then odd: pairwise RoPE as rotate-half RoPE.
        rope_dim = self.qk_rope_head_dim
        self._deinterleave = np.concatenate(
            [np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)]
        ).astype("int32")

    def _dense(self, equation, output_shape, name):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype=self.dtype_policy,
            name=name,
        )

    def _norm(self, name):
        return RMSNormalization(
            self.layer_norm_epsilon, dtype=self.dtype_policy, name=name
        )

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "`MultiHeadLatentAttention` expects inputs [batch, length, "
                f"hidden_dim] with a known hidden_dim. Received: {input_shape}"
            )
        self.hidden_dim = int(input_shape[-1])
        heads = self.num_heads
        if self.q_lora_rank is None:
            self.q_proj = self._dense(
                "bsd,dnh->bsnh", (None, heads, self.qk_head_dim), "q_proj"
            )
            self.q_proj.build(input_shape)
        else:
            self.q_a_proj = self._dense(
                "bsd,dr->bsr", (None, self.q_lora_rank), "q_a_proj"
            )
            self.q_a_norm = self._norm("q_a_norm")
            self.q_b_proj = self._dense(
                "bsr,rnh->bsnh", (None, heads, self.qk_head_dim), "q_b_proj"
            )
            self.q_a_proj.build(input_shape)
            self.q_a_norm.build((None, None, self.q_lora_rank))
            self.q_b_proj.build((None, None, self.q_lora_rank))
        self.kv_a_proj_with_mqa = self._dense(
            "bsd,dr->bsr",
            (None, self.kv_lora_rank + self.qk_rope_head_dim),
            "kv_a_proj_with_mqa",
        )
        self.kv_a_norm = self._norm("kv_a_norm")
        self.kv_b_proj = self._dense(
            "bsr,rnh->bsnh",
            (None, heads, self.qk_nope_head_dim + self.v_head_dim),
            "kv_b_proj",
        )
        self.o_proj = self._dense(
            "bsnh,nhd->bsd", (None, self.hidden_dim), "o_proj"
        )
        self.kv_a_proj_with_mqa.build(input_shape)
        self.kv_a_norm.build((None, None, self.kv_lora_rank))
        self.kv_b_proj.build((None, None, self.kv_lora_rank))
        self.o_proj.build((None, None, heads, self.v_head_dim))
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
        return (max_length, self.kv_lora_rank + self.qk_rope_head_dim)

    def _rope(self, inputs, start_index):
        if self.rope_interleave:
            inputs = ops.take(inputs, self._deinterleave, axis=-1)
        if self.rope_scaling is not None:
            return apply_rotary(
                inputs,
                self._yarn_inverse_frequencies,
                self._yarn_attention_factor,
                start_index,
            )
        return self.rotary_embedding(inputs, start_index=start_index)

    def _queries(self, hidden_states, start_index):
        if self.q_lora_rank is None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_norm(self.q_a_proj(hidden_states)))
        query_nope = query[..., : self.qk_nope_head_dim]
        query_rope = self._rope(query[..., self.qk_nope_head_dim :], start_index)
        return query_nope, query_rope

    def _latents(self, hidden_states, start_index):
        """Normalized latents `[b, s, kv_lora]` and rotary keys `[b, s, r]`."""
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent = self.kv_a_norm(compressed[..., : self.kv_lora_rank])
        key_rope = self._rope(compressed[..., self.kv_lora_rank :], start_index)
        return latent, key_rope

    def _absorbed_projection(self, latent):
        """`kv_b_proj` as weight absorption needs it: `[(kernel, latent)]`.

        Absorption needs the kernel itself, `[kv_lora_rank, H, n + v]` in
        floats, which a quantized projection does not hold:
        `kv_b_proj.kernel` is the raw int8 (or packed 4-bit) tensor without
        its scales. Float kernels (with any LoRA adaptation) are read as
        they are, int8 kernels divided by their per-channel scales, float8
        kernels quantized as the float8 forward pass does; any other mode
        (4-bit, GPTQ, AWQ: weight-only) is measured by projecting the latent
        basis, the identity `[kv_lora_rank, kv_lora_rank]`, through the
        layer itself. The latents are quantized as the projection quantizes
        its inputs (int8 rows, float8), so the absorbed products equal the
        expanded ones of an uncached call. The projection is the sum of the
        returned terms: an int8 kernel with LoRA applies its adaptation to
        the unquantized latents, as Keras' int8 layers do.
        """
        projection = self.kv_b_proj
        mode = projection.quantization_mode
        compute_dtype = self.compute_dtype
        head_shape = (self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        scale = getattr(projection, "kernel_scale", None)
        float_latent = latent
        adaptation = None
        if mode is None:
            kernel = projection.kernel  # LoRA included
        elif mode == "float8":
            kernel = quantizers.quantize_and_dequantize(
                projection.kernel, scale, "float8_e4m3fn", compute_dtype
            )
            latent = quantizers.quantize_and_dequantize(
                latent, projection.inputs_scale, "float8_e4m3fn", compute_dtype
            )
        elif mode == "int8" and math.prod(scale.shape) == math.prod(head_shape):
            # One scale per output channel: Keras' default int8 quantizer
            # reduces over the latent axis.
            scale = ops.reshape(ops.cast(scale, "float32"), (1,) + head_shape)
            kernel = ops.cast(projection._kernel, "float32") / scale
            if projection.lora_enabled:
                adaptation = (
                    projection.lora_alpha / projection.lora_rank
                ) * ops.matmul(projection.lora_kernel_a, projection.lora_kernel_b)
        else:
            basis = ops.eye(self.kv_lora_rank, dtype=compute_dtype)
            kernel = projection(ops.expand_dims(basis, 0), training=False)[0]
        if mode == "int8" and projection.inputs_quantizer is not None:
            values, latent_scale = projection.inputs_quantizer(latent, axis=-1)
            latent = ops.divide(ops.cast(values, compute_dtype), latent_scale)
        elif adaptation is not None:
            kernel, adaptation = kernel + adaptation, None
        terms = [(kernel, latent)]
        if adaptation is not None:
            terms.append((adaptation, float_latent))
        return [
            (ops.cast(kernel, compute_dtype), ops.cast(latent, compute_dtype))
            for kernel, latent in terms
        ]

    def _attend(self, scores, start_index, padding_mask, training):
        scale = self._softmax_scale_factor / math.sqrt(self.qk_head_dim)
        scores = ops.cast(scores, "float32") * scale
        mask = attention_mask(
            ops.shape(scores)[2], ops.shape(scores)[3], start_index, padding_mask
        )
        probs = ops.cast(masked_softmax(scores, mask), self.compute_dtype)
        if self.dropout_layer is not None:
            probs = self.dropout_layer(probs, training=training)
        return probs

    def call(
        self,
        hidden_states,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        start_index = query_start_index(cache, cache_update_index)
        query_nope, query_rope = self._queries(hidden_states, start_index)

        if cache is None:
            latent, key_rope = self._latents(hidden_states, start_index)
            expanded = self.kv_b_proj(latent)
            key_nope = expanded[..., : self.qk_nope_head_dim]
            value = expanded[..., self.qk_nope_head_dim :]
            scores = ops.einsum("bqnh,bknh->bnqk", query_nope, key_nope)
            scores = scores + ops.einsum("bqnr,bkr->bnqk", query_rope, key_rope)
            probs = self._attend(scores, start_index, padding_mask, training)
            outputs = ops.einsum("bnqk,bknh->bqnh", probs, value)
            return self.o_proj(outputs)

        if cache_update_index is not None:
            latent, key_rope = self._latents(hidden_states, start_index)
            update = ops.concatenate([latent, key_rope], axis=-1)
            cache = ops.slice_update(
                cache, [0, cache_update_index, 0], ops.cast(update, cache.dtype)
            )
        latent = cache[..., : self.kv_lora_rank]
        key_rope = cache[..., self.kv_lora_rank :]
        # Weight absorption: q_nope . (W_k c) = (W_k^T q_nope) . c and
        # probs . (W_v c) = W_v (probs . c), so the cache stays compressed.
        terms = self._absorbed_projection(latent)
        scores = ops.einsum("bqnr,bkr->bnqk", query_rope, key_rope)
        for kernel, latent in terms:
            key_kernel = kernel[..., : self.qk_nope_head_dim]
            query_latent = ops.einsum("bqnh,rnh->bqnr", query_nope, key_kernel)
            scores = scores + ops.einsum("bqnr,bkr->bnqk", query_latent, latent)
        probs = self._attend(scores, start_index, None, training)
        outputs = 0
        for kernel, latent in terms:
            value_kernel = kernel[..., self.qk_nope_head_dim :]
            context = ops.einsum("bnqk,bkr->bqnr", probs, latent)
            outputs = outputs + ops.einsum("bqnr,rnh->bqnh", context, value_kernel)
        return self.o_proj(outputs), cache

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "kv_lora_rank": self.kv_lora_rank,
                "qk_nope_head_dim": self.qk_nope_head_dim,
                "qk_rope_head_dim": self.qk_rope_head_dim,
                "v_head_dim": self.v_head_dim,
                "q_lora_rank": self.q_lora_rank,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_interleave": self.rope_interleave,
                "rope_scaling": self.rope_scaling,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
