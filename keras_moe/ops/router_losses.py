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
