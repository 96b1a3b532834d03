"""Causal and padding masks, and the masked float32 softmax, for attention.

Both attention layers of `keras_moe.models` score queries against keys the
same way: a query at absolute position `p` sees the keys at positions `<= p`
that are not padding. During cached decoding the queries start at
`cache_update_index` and the keys are the whole cache.
"""

from keras import ops

# A finite stand-in for minus infinity: a row with every key masked gets a
# uniform distribution instead of NaN (only padded queries can have such a
# row, and their outputs are never used).
_MASKED_SCORE = -1e9


def attention_mask(query_length, key_length, start_index=0, padding_mask=None):
    """The boolean mask of the keys each query may attend to.

    Args:
        query_length: int (or scalar int tensor), the number of queries.
        key_length: int (or scalar int tensor), the number of keys.
        start_index: int or scalar int tensor, the absolute position of the
            first query (the keys start at position 0).
        padding_mask: optional `[batch, key_length]`, truthy for real keys.

    Returns:
        A bool tensor `[batch or 1, query_length, key_length]`.
    """
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(
        start_index, "int32"
    )
    key_positions = ops.arange(key_length, dtype="int32")
    mask = ops.expand_dims(query_positions, 1) >= ops.expand_dims(
        key_positions, 0
    )
    mask = ops.expand_dims(mask, 0)
    if padding_mask is not None:
        padding_mask = ops.cast(padding_mask, "bool")
        mask = ops.logical_and(mask, ops.expand_dims(padding_mask, 1))
    return mask


def masked_softmax(scores, mask):
    """Softmax over the last axis in float32, masked keys get zero weight.

    Args:
        scores: `[batch, ..., queries, keys]` attention logits, float32.
        mask: bool `[batch or 1, queries, keys]`; broadcast over the axes
            between batch and queries.

    Returns:
        float32 probabilities of the shape of `scores`.
    """
    scores = ops.cast(scores, "float32")
    for _ in range(len(scores.shape) - 3):
        mask = ops.expand_dims(mask, 1)
    scores = ops.where(mask, scores, _MASKED_SCORE)
    return ops.softmax(scores, axis=-1)
