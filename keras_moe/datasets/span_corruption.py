"""T5's span-corruption objective, as NumPy arrays for a `Seq2SeqLM`.

Span corruption (Raffel et al., 2020, section 3.1.4; the objective Switch
Transformer pre-trains with) hides about `noise_density` of the tokens of a
sequence in spans of mean length `mean_noise_span_length`. The encoder reads
the sequence with each hidden span replaced by one sentinel token; the
decoder writes each sentinel followed by the span it hid. Interleaving the
two gives the original sequence back, which is what makes the targets
learnable.
"""

import numpy as np

from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int


def _random_segmentation(num_items, num_segments, rng):
    """Split `num_items` into `num_segments` positive lengths, at random."""
    # Choose `num_segments - 1` distinct cut points among the
    # `num_items - 1` gaps between items.
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length, noise_density=0.15, mean_noise_span_length=3.0, seed=None
):
    """Which tokens of a sequence span corruption hides, as T5 chooses them.

    `round(length * noise_density)` tokens (at least 1, at most
    `length - 1`) are hidden, in `round(num_noise / mean_noise_span_length)`
    spans (at least 1); the lengths of the hidden spans and of the kept runs
    between them are random, and the sequence starts with a kept run.

    Args:
        length: int >= 2, the number of tokens.
        noise_density: float in (0, 1), the fraction of tokens hidden.
        mean_noise_span_length: float >= 1, the mean length of a span.
        seed: int, a `numpy.random.Generator`, or None.

    Returns:
        A bool array of shape `[length]`, True where a token is hidden.

    Example:

    >>> mask = random_spans_noise_mask(20, noise_density=0.25, seed=0)
    >>> int(mask.sum()), bool(mask[0])
    (5, False)
    """
    length = check_int("length", length, min_value=2)
    noise_density = check_float("noise_density", noise_density, positive=True)
    if noise_density >= 1:
        raise ValueError(
            f"`noise_density` must be in (0, 1). Received: noise_density={noise_density}"
        )
    mean_noise_span_length = check_float(
        "mean_noise_span_length", mean_noise_span_length, positive=True
    )
    if mean_noise_span_length < 1:
        raise ValueError(
            "`mean_noise_span_length` must be >= 1 (a span holds at least "
            f"one token). Received: mean_noise_span_length={mean_noise_span_length}"
        )
    rng = np.random.default_rng(seed)
    num_noise = int(min(max(round(length * noise_density), 1), length - 1))
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_kept = length - num_noise
    # A kept run before every span, so never more spans than kept tokens.
    num_spans = min(num_spans, num_noise, num_kept)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(num_kept, num_spans, rng)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for kept, noise in zip(kept_lengths, noise_lengths):
        position += kept
        mask[position : position + noise] = True
        position += noise
    return mask


def corrupt_spans(token_ids, noise_mask, sentinel_ids):
    """Encoder inputs and decoder targets of one sequence and its noise mask.

    Args:
        token_ids: 1-D int array, the sequence.
        noise_mask: 1-D bool array of the same length (see
            `random_spans_noise_mask`).
        sentinel_ids: a sequence of ints, the sentinel of the first, second,
            ... hidden span (T5: `<extra_id_0>`, `<extra_id_1>`, ...). One
            more than the number of spans is used: the targets end with the
            next sentinel, as T5's do.

    Returns:
        `(inputs, targets)`, two 1-D int arrays.

    Example:

    >>> import numpy as np
    >>> tokens = np.array([10, 11, 12, 13, 14, 15])
    >>> mask = np.array([False, True, True, False, False, True])
    >>> inputs, targets = corrupt_spans(tokens, mask, [100, 101, 102])
    >>> inputs.tolist(), targets.tolist()
    ([10, 100, 13, 14, 101], [100, 11, 12, 101, 15, 102])
    """
    token_ids = np.asarray(token_ids)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    if token_ids.ndim != 1 or noise_mask.shape != token_ids.shape:
        raise ValueError(
            "`token_ids` and `noise_mask` must be 1-D arrays of the same "
            f"length. Received: token_ids.shape={token_ids.shape}, "
            f"noise_mask.shape={noise_mask.shape}"
        )
    span_starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    num_spans = int(span_starts.sum())
    if len(sentinel_ids) < num_spans + 1:
        raise ValueError(
            f"`sentinel_ids` needs {num_spans + 1} ids for {num_spans} hidden "
            f"spans (one per span and one to end the targets). "
            f"Received: {len(sentinel_ids)} sentinel ids"
        )
    sentinels = np.asarray(sentinel_ids[: num_spans + 1], dtype=token_ids.dtype)
    span_index = np.cumsum(span_starts) - 1
    inputs, targets = [], []
    for token, noise, start, span in zip(token_ids, noise_mask, span_starts, span_index):
        if start:
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        (targets if noise else inputs).append(token)
    # The targets end on the next sentinel ("... <Y> last <Z>" in the T5
    # paper's example), which tells the decoder the last span is complete.
    targets.append(sentinels[num_spans])
    return np.asarray(inputs, token_ids.dtype), np.asarray(targets, token_ids.dtype)


def span_corruption_arrays(
    token_ids,
    sequence_length,
    sentinel_ids,
    num_sequences=None,
    noise_density=0.15,
    mean_noise_span_length=3.0,
    pad_id=0,
    seed=0,
):
    """Cut a token stream into span-corruption examples for a `Seq2SeqLM`.

    The stream is cut into consecutive windows of `sequence_length` tokens;
    each window is corrupted (`random_spans_noise_mask`, `corrupt_spans`)
    and its inputs and targets padded to fixed lengths with `pad_id`.

    Args:
        token_ids: 1-D int array, the token stream (for example the bytes of
            `keras_moe.datasets.offline_corpus()`).
        sequence_length: int >= 2, the tokens per window before corruption.
        sentinel_ids: a sequence of ints, the sentinels (at least one more
            than the spans a window can hold).
        num_sequences: int or None (every whole window), how many examples.
        noise_density: float, the fraction of tokens hidden.
        mean_noise_span_length: float, the mean length of a hidden span.
        pad_id: int, the padding token.
        seed: int, the random seed.

    Returns:
        A dict of int32 arrays, `encoder_token_ids`, `encoder_padding_mask`
        (bool), `decoder_token_ids` (the targets) and `decoder_padding_mask`
        (bool), each `[num_sequences, length]`; the encoder length is the
        longest corrupted input, the decoder length the longest target.

    Example:

    >>> import numpy as np
    >>> stream = np.arange(1, 101)
    >>> data = span_corruption_arrays(stream, 20, list(range(200, 220)))
    >>> data["encoder_token_ids"].shape[0], data["decoder_token_ids"].shape[0]
    (5, 5)
    """
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1:
        raise ValueError(
            "`token_ids` must be a 1-D token stream. "
            f"Received: token_ids.shape={token_ids.shape}"
        )
    sequence_length = check_int("sequence_length", sequence_length, min_value=2)
    available = len(token_ids) // sequence_length
    if num_sequences is None:
        num_sequences = available
    num_sequences = check_int("num_sequences", num_sequences, min_value=1)
    if num_sequences > available:
        raise ValueError(
            f"`num_sequences`={num_sequences} windows of {sequence_length} "
            f"tokens need {num_sequences * sequence_length} tokens; the "
            f"stream holds {len(token_ids)}. Received: num_sequences={num_sequences}"
        )
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(num_sequences):
        window = token_ids[index * sequence_length : (index + 1) * sequence_length]
        mask = random_spans_noise_mask(
            sequence_length, noise_density, mean_noise_span_length, seed=rng
        )
        pairs.append(corrupt_spans(window, mask, sentinel_ids))
    arrays = {}
    for side, column in (("encoder", 0), ("decoder", 1)):
        length = max(len(pair[column]) for pair in pairs)
        ids = np.full((num_sequences, length), pad_id, dtype="int32")
        mask = np.zeros((num_sequences, length), dtype=bool)
        for row, pair in enumerate(pairs):
            ids[row, : len(pair[column])] = pair[column]
            mask[row, : len(pair[column])] = True
        arrays[f"{side}_token_ids"] = ids
        arrays[f"{side}_padding_mask"] = mask
    return arrays
