"""T5's bucketed relative position bias, added to the attention scores."""

import math

import keras
from keras import ops

from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int


def relative_position_bucket(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
):
    """The T5 bucket of each relative position `key - query`.

    Half of the buckets (per direction, when `bidirectional`) hold exact
    distances `0 ... max_exact - 1`; the other half cover distances up to
    `max_distance` in logarithmically growing bins, and every farther
    distance shares the last bucket. A causal (not bidirectional) bias
    gives every key after the query the bucket of distance 0. This is
    Mesh TensorFlow's `_relative_position_bucket`, as T5 and Switch
    Transformer use it.

    Args:
        relative_position: int tensor, key position minus query position.
        bidirectional: bool, separate buckets for keys after the query.
        num_buckets: int, the number of buckets.
        max_distance: int, the distance from which all share one bucket.

    Returns:
        An int32 tensor of the shape of `relative_position`, in
        `[0, num_buckets)`.

    Example:

    >>> import numpy as np
    >>> positions = np.array([-200, -20, -3, 0, 3, 20])
    >>> buckets = relative_position_bucket(positions, True, 32, 128)
    >>> np.asarray(buckets).tolist()
    [15, 10, 3, 0, 19, 26]
    >>> causal = relative_position_bucket(positions, False, 32, 128)
    >>> np.asarray(causal).tolist()
    [31, 17, 3, 0, 0, 0]
    """
    relative_position = ops.cast(relative_position, "int32")
    buckets = ops.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = ops.cast(relative_position > 0, "int32") * num_buckets
        distance = ops.abs(relative_position)
    else:
        distance = -ops.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # The log of distance 0 would be -inf: those distances are small anyway.
    scaled = ops.log(
        ops.cast(ops.maximum(distance, 1), "float32") / max_exact
    ) / math.log(max_distance / max_exact)
    large = max_exact + ops.cast(scaled * (num_buckets - max_exact), "int32")
    large = ops.minimum(large, num_buckets - 1)
    return buckets + ops.where(is_small, distance, large)


@keras.saving.register_keras_serializable(package="keras_moe")
class T5RelativePositionBias(keras.layers.Layer):
    """A learned scalar per attention head and relative position bucket.

    T5 and Switch Transformer add no position embedding to the tokens; the
    first layer of each stack computes this bias once, `[1, H, q, k]`, and
    every self-attention layer of the stack adds it to its scores. The
    encoder's bias is bidirectional, the decoder's causal (see
    `relative_position_bucket`).

    Weights: `embeddings [num_buckets, num_heads]`.

    Args:
        num_heads: int, attention heads `H`.
        num_buckets: int, the relative position buckets. Defaults to 32.
        max_distance: int, the distance from which all keys share a bucket.
            Defaults to 128.
        bidirectional: bool, True for an encoder, False for a decoder.
        embeddings_initializer: initializer of the `[num_buckets, H]` table.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[batch, length, d]`, the stack's hidden states: the bias is
            that of `length` queries against the same `length` keys.

    Returns:
        float `[1, num_heads, length, length]`.

    Example:

    >>> import numpy as np
    >>> bias = T5RelativePositionBias(num_heads=4, bidirectional=False)
    >>> tuple(bias(np.zeros((2, 5, 8), "float32")).shape)
    (1, 4, 5, 5)
    >>> tuple(bias.position_bias(1, 7, query_offset=3).shape)
    (1, 4, 1, 7)
    """

    def __init__(
        self,
        num_heads,
        num_buckets=32,
        max_distance=128,
        bidirectional=True,
        embeddings_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_int("num_heads", num_heads, min_value=1)
        self.num_buckets = check_int("num_buckets", num_buckets, min_value=2)
        self.max_distance = check_int("max_distance", max_distance, min_value=2)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer or keras.initializers.RandomNormal(stddev=0.05)
        )

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.num_buckets, self.num_heads),
            initializer=self.embeddings_initializer,
        )

    def position_bias(self, query_length, key_length, query_offset=0):
        """The bias of queries at `query_offset ...` against keys at `0 ...`.

        Args:
            query_length: int or scalar int tensor.
            key_length: int or scalar int tensor.
            query_offset: int or scalar int tensor, the position of the
                first query (the cache index in decoding).

        Returns:
            float `[1, num_heads, query_length, key_length]`.
        """
        query_positions = ops.arange(query_length, dtype="int32") + ops.cast(
            query_offset, "int32"
        )
        key_positions = ops.arange(key_length, dtype="int32")
        relative = ops.expand_dims(key_positions, 0) - ops.expand_dims(
            query_positions, 1
        )
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance
        )
        table = ops.cast(self.embeddings, self.compute_dtype)
        values = ops.take(table, buckets, axis=0)
        return ops.expand_dims(ops.transpose(values, (2, 0, 1)), 0)

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        return self.position_bias(length, length)

    def compute_output_shape(self, input_shape):
        return (1, self.num_heads, input_shape[1], input_shape[1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
                "bidirectional": self.bidirectional,
                "embeddings_initializer": keras.initializers.serialize(
                    self.embeddings_initializer
                ),
            }
        )
        return config
