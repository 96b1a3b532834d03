"""Auxiliary router losses, computed from routing the layer already did.

The router statistics (`keras_moe.ops.router_stats`) report the same
quantities (expert load, importance, the Switch loss, the z-loss) and reuse
the functions here rather than restate them. Those private building blocks
take the array namespace as their first argument, `m`: `keras.ops` for the
losses (`KerasMath`), and for the statistics whatever
`keras_moe.backend.array_math()` gives (native PyTorch calls on eager
PyTorch, where they run without gradients on every step).
"""

from keras import ops

from keras_moe.backend.keras_math import KerasMath


def _token_weights(m, token_mask):
    """`(real, num_real)` of an optional bool `token_mask [..., T]`.

    `real` is float32 `[tokens, 1]`, 1 for a real token and 0 for padding;
    `num_real` the number of real tokens, at least 1. `(None, None)` when
    every token is real.
    """
    if token_mask is None:
        return None, None
    real = m.reshape(m.f32(token_mask), (-1, 1))
    return real, m.at_least(m.sum(real), 1.0)


def _token_mean(m, values, real, num_real, axis=0):
    """Mean over the real tokens of `values [tokens, n]`.

    With `axis=0`, per column (`[n]`); with `axis=None`, the mean over
    tokens of each token's row sum (a scalar: for `n = 1`, the plain mean).
    Padding rows are weighted by 0 (a multiply costs a third of a `where`
    on eager PyTorch), so they must hold finite values: the layers zero
    padding tokens before routing them, and the losses below zero any
    padding they are given (`_zero_padding`).
    """
    if real is None:
        if axis is None and values.shape[-1] != 1:
            return m.mean(values) * values.shape[-1]
        return m.mean(values, axis=axis)
    return m.sum(values * real, axis=axis) / num_real


def _zero_padding(values, token_mask):
    """`values [..., T, n]` with 0 in the rows of padding tokens.

    Called directly, the losses may be given padding that holds anything
    (even NaN); zeroed, it counts for nothing, in value and in gradient.
    """
    if token_mask is None:
        return values
    return ops.where(ops.expand_dims(token_mask, -1), values, 0.0)


def _flat_tokens(m, tensor, num_experts):
    """float32 `[..., T, E]` as `[tokens, E]`."""
    return m.reshape(m.f32(tensor), (-1, num_experts))


def _routed_load(m, expert_counts):
    """`(load, counts, routed, routed_at_least_1)`, summed over groups.

    `counts [E]` holds the routed choices per expert and `load [E]` their
    fractions; `routed` is the number of routed choices (a float32 scalar),
    and `routed_at_least_1` the divisor that keeps an empty batch at 0.
    """
    counts = m.f32(expert_counts)
    if len(counts.shape) > 1:
        counts = m.sum(m.reshape(counts, (-1, counts.shape[-1])), axis=0)
    routed = m.sum(counts)
    routed_at_least_1 = m.at_least(routed, 1.0)
    return counts / routed_at_least_1, counts, routed, routed_at_least_1


def _switch_loss(m, load, importance):
    """`E * sum_i f_i * P_i` of `load` and `importance`, both `[E]`."""
    return load.shape[-1] * m.sum(load * importance)


def _z_loss(m, logits, real, num_real):
    """`mean(logsumexp(logits) ** 2)` over the real tokens of `[tokens, E]`."""
    log_z = m.logsumexp(logits, axis=-1, keepdims=True)
    return _token_mean(m, log_z * log_z, real, num_real, axis=None)


def expert_load(expert_counts):
    """Fraction of routed choices per expert, `f_i`; sums to 1 over experts.

    Args:
        expert_counts: int `[..., E]`, choices routed to each expert (before
            capacity, padding excluded), as in `DispatchPlan.expert_counts`.

    Returns:
        float32 `[E]`, summed over any leading (group) axes.

    Example:

    >>> import numpy as np
    >>> np.asarray(expert_load([[3, 1], [2, 2]])).tolist()
    [0.625, 0.375]
    """
    return _routed_load(KerasMath, expert_counts)[0]


def load_balancing_loss(router_probs, expert_counts, token_mask=None):
    """Switch Transformer load-balancing loss `E * sum_i f_i * P_i`.

    `f_i` is the fraction of routed choices that go to expert `i` (see
    `expert_load`) and `P_i` the mean router probability of expert `i` over
    real tokens. It is 1 for perfectly uniform routing, `E` at full collapse;
    only `P_i` carries a gradient. The caller multiplies by the loss weight α.

    Args:
        router_probs: float `[..., T, E]`.
        expert_counts: int `[..., E]`.
        token_mask: optional bool `[..., T]`, False for padding.

    Returns:
        A float32 scalar.

    Example:

    Every token sure of expert 0, and all of them routed there: full
    collapse, the loss is `E`.

    >>> import numpy as np
    >>> probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    >>> float(load_balancing_loss(probs, expert_counts=[2, 0]))
    2.0
    """
    m = KerasMath
    probs = _zero_padding(m.f32(router_probs), token_mask)
    probs = _flat_tokens(m, probs, router_probs.shape[-1])
    importance = _token_mean(m, probs, *_token_weights(m, token_mask))
    return _switch_loss(m, _routed_load(m, expert_counts)[0], importance)


def router_z_loss(router_logits, token_mask=None):
    """ST-MoE router z-loss `mean(logsumexp(logits) ** 2)` over real tokens.

    Args:
        router_logits: float `[..., T, E]`.
        token_mask: optional bool `[..., T]`, False for padding.

    Returns:
        A float32 scalar.

    Example:

    >>> import numpy as np
    >>> logits = np.log(np.array([[0.5, 0.5], [2.0, 2.0]]))
    >>> round(float(router_z_loss(logits)), 4)
    0.9609
    """
    m = KerasMath
    logits = _zero_padding(m.f32(router_logits), token_mask)
    logits = _flat_tokens(m, logits, router_logits.shape[-1])
    return _z_loss(m, logits, *_token_weights(m, token_mask))


def sequence_load_balancing_loss(router_probs, expert_ids, token_mask=None):
    """DeepSeek-V3's sequence-wise balance loss, `E * sum_i f_i * P_i` per sequence.

    The Switch loss computed inside each sequence and averaged over
    sequences: it keeps any single sequence from crowding onto a few experts,
    which the batch-wide loss allows. `f_i` is the fraction of the sequence's
    routed choices that go to expert `i`, `P_i` its mean probability over the
    sequence's real tokens. Sequences with no real token count for nothing.

    Args:
        router_probs: float `[S, T, E]`, per-token distributions (normalised
            scores for sigmoid routers).
        expert_ids: int `[S, T, k]`, the chosen experts.
        token_mask: optional bool `[S, T]`, False for padding.

    Returns:
        A float32 scalar.

    Example:

    Two sequences, each crowding onto its own expert: balanced over the
    batch, collapsed inside each sequence.

    >>> import numpy as np
    >>> probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    >>> float(sequence_load_balancing_loss(probs, np.array([[[0]], [[1]]])))
    2.0
    """
    num_experts = router_probs.shape[-1]
    probs = ops.cast(router_probs, "float32")
    if token_mask is None:
        token_mask = ops.ones(ops.shape(probs)[:2], "bool")
    real = ops.cast(token_mask, "float32")  # [S, T]
    # [S, T, k, E] one-hot summed over choices and tokens: the sequence's
    # routed choices per expert.
    choices = ops.sum(ops.one_hot(expert_ids, num_experts, dtype="float32"), axis=2)
    counts = ops.sum(choices * ops.expand_dims(real, -1), axis=1)  # [S, E]
    load = counts / ops.maximum(ops.sum(counts, axis=-1, keepdims=True), 1.0)
    real_tokens = ops.expand_dims(real, -1)  # [S, T, 1]
    num_real = ops.maximum(ops.sum(real, axis=1, keepdims=True), 1.0)  # [S, 1]
    probs = _zero_padding(probs, token_mask)
    importance = _token_mean(KerasMath, probs, real_tokens, num_real, axis=1)
    per_sequence = num_experts * ops.sum(load * importance, axis=-1)
    has_tokens = ops.cast(ops.sum(real, axis=-1) > 0, "float32")
    return ops.sum(per_sequence * has_tokens) / ops.maximum(
        ops.sum(has_tokens), 1.0
    )
