"""Auxiliary router losses, computed from routing the layer already did."""

from keras import ops


def _masked_mean(values, token_mask, axis=0):
    """Mean over tokens (`axis`) of `values`, counting only real tokens."""
    if token_mask is None:
        return ops.mean(values, axis=axis)
    while len(token_mask.shape) < len(values.shape):
        token_mask = ops.expand_dims(token_mask, -1)
    total = ops.sum(ops.where(token_mask, values, 0.0), axis=axis)
    count = ops.sum(ops.cast(token_mask, values.dtype), axis=axis)
    return total / ops.maximum(count, 1.0)


def expert_load(expert_counts):
    """Fraction of routed choices per expert, `f_i`; sums to 1 over experts.

    Args:
        expert_counts: int `[..., E]`, choices routed to each expert (before
            capacity, padding excluded), as in `DispatchPlan.expert_counts`.

    Returns:
        float32 `[E]`, summed over any leading (group) axes.
    """
    counts = ops.cast(expert_counts, "float32")
    counts = ops.reshape(counts, (-1, counts.shape[-1]))
    counts = ops.sum(counts, axis=0)
    return counts / ops.maximum(ops.sum(counts), 1.0)


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
    """
    num_experts = router_probs.shape[-1]
    probs = ops.reshape(ops.cast(router_probs, "float32"), (-1, num_experts))
    mask = None if token_mask is None else ops.reshape(token_mask, (-1,))
    importance = _masked_mean(probs, mask)
    return num_experts * ops.sum(expert_load(expert_counts) * importance)


def router_z_loss(router_logits, token_mask=None):
    """ST-MoE router z-loss `mean(logsumexp(logits) ** 2)` over real tokens.

    Args:
        router_logits: float `[..., T, E]`.
        token_mask: optional bool `[..., T]`, False for padding.

    Returns:
        A float32 scalar.
    """
    num_experts = router_logits.shape[-1]
    logits = ops.reshape(ops.cast(router_logits, "float32"), (-1, num_experts))
    log_z = ops.logsumexp(logits, axis=-1)
    mask = None if token_mask is None else ops.reshape(token_mask, (-1,))
    return _masked_mean(ops.square(log_z), mask)


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
    importance = _masked_mean(probs, token_mask, axis=1)  # [S, E]
    per_sequence = num_experts * ops.sum(load * importance, axis=-1)
    has_tokens = ops.cast(ops.sum(real, axis=-1) > 0, "float32")
    return ops.sum(per_sequence * has_tokens) / ops.maximum(
        ops.sum(has_tokens), 1.0
    )
