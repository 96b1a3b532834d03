"""Causal and padding masks, and the masked float32 softmax, for attention.

Both attention layers of `keras_moe.models` score queries against keys the
same way: a query at absolute position `p` sees the keys at positions `<= p`
that are not padding, and with a sliding window of `w` tokens only those at
positions `> p - w` (the window of Mistral, Qwen and GPT-OSS, as
transformers' `sliding_window_overlay` draws it), and with chunks of `c`
tokens only those of its own chunk, `k // c == p // c` (Llama 4's chunked
attention, transformers' `chunked_overlay`). During cached decoding the
queries start at `cache_update_index` and the keys are the whole cache.
"""

from keras import ops

# A finite stand-in for minus infinity: a row with every key masked gets a
# uniform distribution instead of NaN (only padded queries can have such a
# row, and their outputs are never used).
_MASKED_SCORE = -1e9


def attention_mask(
    query_length,
    key_length,
    start_index=0,
    padding_mask=None,
    sliding_window=None,
    chunk_size=None,
):
    """The boolean mask of the keys each query may attend to.

    Args:
        query_length: int (or scalar int tensor), the number of queries.
        key_length: int (or scalar int tensor), the number of keys.
        start_index: int or scalar int tensor, the absolute position of the
            first query (the keys start at position 0).
        padding_mask: optional `[batch, key_length]`, truthy for real keys.
        sliding_window: optional int, the number of most recent positions
            (the query's own included) a query may see.
        chunk_size: optional int, the length of the chunks positions are
            cut into (from position 0); a query sees only its own chunk.

    Returns:
        A bool tensor `[batch or 1, query_length, key_length]`.

    Example:

    >>> from keras import ops
    >>> mask = attention_mask(4, 4, sliding_window=2)
    >>> ops.convert_to_numpy(mask)[0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    >>> mask = attention_mask(4, 4, chunk_size=2)
    >>> ops.convert_to_numpy(mask)[0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(
        start_index, "int32"
    )
    key_positions = ops.arange(key_length, dtype="int32")
    distance = ops.expand_dims(query_positions, 1) - ops.expand_dims(
        key_positions, 0
    )
    mask = distance >= 0
    if sliding_window is not None:
        mask = ops.logical_and(mask, distance < sliding_window)
    if chunk_size is not None:
        same_chunk = ops.expand_dims(query_positions // chunk_size, 1) == (
            ops.expand_dims(key_positions // chunk_size, 0)
        )
        mask = ops.logical_and(mask, same_chunk)
    mask = ops.expand_dims(mask, 0)
    if padding_mask is not None:
        padding_mask = ops.cast(padding_mask, "bool")
        mask = ops.logical_and(mask, ops.expand_dims(padding_mask, 1))
    return mask


def query_start_index(cache, cache_update_index):
    """The position of the first query of a call with these cache arguments.

    Without a cache the queries start at 0; with one, at
    `cache_update_index` (0 when None: a call that reads the cache only).

    Args:
        cache: the attention cache, or None.
        cache_update_index: int, scalar int tensor or None.

    Returns:
        `cache_update_index`, or 0.

    Raises:
        ValueError: for a `cache_update_index` without a `cache`.

    Example:

    >>> query_start_index(None, None), query_start_index("cache", 5)
    (0, 5)
    """
    if cache is None and cache_update_index is not None:
        raise ValueError(
            "`cache_update_index` is only meaningful with a `cache`. "
            f"Received: cache_update_index={cache_update_index}"
        )
    return 0 if cache_update_index is None else cache_update_index


def masked_softmax(scores, mask, sinks=None):
    """Softmax over the last axis in float32, masked keys get zero weight.

    With `sinks` (GPT-OSS's attention sinks), each row's denominator also
    holds `exp(sink)`: a learned logit of a key that has no value, so the
    probabilities of a row sum to less than one.

    Args:
        scores: `[batch, ..., queries, keys]` attention logits, float32.
        mask: bool `[batch or 1, queries, keys]`; broadcast over the axes
            between batch and queries.
        sinks: optional logits broadcastable to `scores[..., :1]` (one per
            head: `[..., 1, 1]` after the head axes).

    Returns:
        float32 probabilities of the shape of `scores`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> scores = np.zeros((1, 1, 2), "float32")
    >>> mask = np.ones((1, 1, 2), bool)
    >>> probs = masked_softmax(scores, mask, sinks=np.zeros((1, 1, 1), "float32"))
    >>> [round(float(p), 4) for p in ops.convert_to_numpy(probs)[0, 0]]
    [0.3333, 0.3333]
    """
    scores = ops.cast(scores, "float32")
    for _ in range(len(scores.shape) - 3):
        mask = ops.expand_dims(mask, 1)
    scores = ops.where(mask, scores, _MASKED_SCORE)
    if sinks is None:
        return ops.softmax(scores, axis=-1)
    sinks = ops.broadcast_to(
        ops.cast(sinks, "float32"), ops.shape(scores)[:-1] + (1,)
    )
    probs = ops.softmax(ops.concatenate([scores, sinks], axis=-1), axis=-1)
    return probs[..., :-1]
