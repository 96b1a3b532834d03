"""Next-byte prediction arrays from raw text."""

import numbers

import numpy as np

from keras_moe.utils.argument_validation import check_int


def byte_lm_arrays(
    text, sequence_length, *, validation_split=0.1, max_sequences=None
):
    """Cut text into (inputs, next-byte targets) arrays for language models.

    The text is encoded as UTF-8 and each byte becomes a token id in
    `[0, 256)`, so no tokenizer or vocabulary is needed. The last
    `validation_split` of the bytes is the validation part and everything
    before it the training part; each part is cut on its own, so no byte of
    one appears in the other. Within a part, sequence `i` holds bytes
    `[i * sequence_length, (i + 1) * sequence_length)` and its targets are the
    same bytes shifted by one: inputs never overlap, and a trailing remainder
    too short for a full sequence (plus its last target) is left out.

    Args:
        text: `str` (encoded as UTF-8) or `bytes`, the corpus.
        sequence_length: int >= 1, the number of tokens per sequence.
        validation_split: float in `[0, 1)`, the fraction of the bytes, taken
            from the end of `text`, that forms the validation part. With 0
            the validation arrays are empty. Defaults to 0.1.
        max_sequences: optional int >= 1. When set, each part keeps at most
            its first `max_sequences` sequences. Defaults to `None` (all).

    Returns:
        `((x_train, y_train), (x_val, y_val))`, int32 arrays of shape
        `(num_sequences, sequence_length)` with `y[:, t]` the byte that
        follows `x[:, t]` in the text.

    Raises:
        ValueError: if an argument is invalid, or `text` is too short for one
            training sequence (and one validation sequence when
            `validation_split > 0`).

    Example:

    >>> from keras_moe.datasets import byte_lm_arrays
    >>> (x, y), (x_val, y_val) = byte_lm_arrays(
    ...     "abcdefghijklmnopqrst", sequence_length=4, validation_split=0.25
    ... )
    >>> x.shape, x_val.shape, x.dtype
    ((3, 4), (1, 4), dtype('int32'))
    >>> bytes(x[0].tolist()), bytes(y[0].tolist())
    (b'abcd', b'bcde')
    >>> bytes(x_val[0].tolist()), bytes(y_val[0].tolist())
    (b'pqrs', b'qrst')
    """
    if isinstance(text, str):
        data = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        raise ValueError(
            "`text` must be a str or bytes. "
            f"Received: text of type {type(text).__name__}"
        )
    sequence_length = check_int("sequence_length", sequence_length, min_value=1)
    is_number = isinstance(validation_split, numbers.Real) and not isinstance(
        validation_split, bool
    )
    if not is_number or not 0 <= validation_split < 1:
        raise ValueError(
            "`validation_split` must be a number in [0, 1). "
            f"Received: validation_split={validation_split!r}"
        )
    if max_sequences is not None:
        max_sequences = check_int("max_sequences", max_sequences, min_value=1)

    token_ids = np.frombuffer(data, dtype=np.uint8).astype("int32")
    num_train_bytes = len(token_ids) - int(len(token_ids) * validation_split)
    train_ids = token_ids[:num_train_bytes]
    val_ids = token_ids[num_train_bytes:]

    # A sequence needs `sequence_length + 1` bytes: the inputs and, one byte
    # further, the last target.
    needed = sequence_length + 1
    too_short_for_validation = validation_split > 0 and len(val_ids) < needed
    if len(train_ids) < needed or too_short_for_validation:
        raise ValueError(
            f"`text` is too short: with sequence_length={sequence_length} and "
            f"validation_split={validation_split}, each part needs at least "
            f"{needed} bytes. Received: text of {len(token_ids)} bytes "
            f"({len(train_ids)} for training, {len(val_ids)} for validation)"
        )
    return (
        _next_byte_pairs(train_ids, sequence_length, max_sequences),
        _next_byte_pairs(val_ids, sequence_length, max_sequences),
    )


def _next_byte_pairs(token_ids, sequence_length, max_sequences):
    num_sequences = max(len(token_ids) - 1, 0) // sequence_length
    if max_sequences is not None:
        num_sequences = min(num_sequences, max_sequences)
    num_tokens = num_sequences * sequence_length
    x = token_ids[:num_tokens].reshape(num_sequences, sequence_length)
    y = token_ids[1 : num_tokens + 1].reshape(num_sequences, sequence_length)
    return x.copy(), y.copy()
