"""Router statistics: what each MoE layer measures about its own routing.

Every MoE layer computes, in its `call` and from the routing it already did
(no second pass), a few numbers per step that show whether its router is
healthy: how evenly the routed choices spread over the experts, how many
were dropped by capacity, the balance losses, the router's entropy. They
are summed into a small accumulator that lives beside the layer's weights
(see `keras_moe.metrics.RouterStatsMetric`), so that `model.fit` logs the
compact set and callbacks read the rest.

The functions here are written once against a small array namespace
(`keras_moe.backend.array_math()`: `keras.ops`, or native PyTorch calls on
PyTorch, where they run eagerly on every step) and reuse the loss formulas
of `keras_moe.ops.router_losses`.

Per routed layer (`SparseMoE`, `SharedExpertMoE`, `HierarchicalMoE`):

| name | meaning |
|---|---|
| `aux_loss` | Switch load-balancing loss `E * sum_i f_i * P_i`, unweighted |
| `z_loss` | ST-MoE router z-loss `mean(logsumexp(logits) ** 2)` |
| `maxvio` | `(max_i f_i - mean f) / mean f` (Wang et al. 2024) |
| `load_cv` | coefficient of variation of `f`: `std(f) / mean(f)` |
| `router_entropy` | mean over tokens of `entropy(probs) / log E`, in [0, 1] |
| `dropped_fraction` | dropped choices / routed choices (expert choice: real tokens no expert took / real tokens) |
| `expert_load` | `f_i`, fraction of routed choices per expert (padding excluded) |
| `expert_importance` | `P_i`, mean router probability per expert over real tokens |

Per `SoftMoE` layer, which drops nothing and has no load to balance:
`dispatch_entropy` (per slot, entropy of its weights over the real tokens of
a sequence / log of their number), `combine_entropy` (per token, entropy of
its weights over slots / log of the number of slots), `dispatch_max_weight`,
`combine_max_weight` (the mean largest weight), and `expert_share` (per
expert, the mean share of a token's combine weight that goes to its slots).

Read as they stand, not accumulated: `expert_bias` (the balancing bias,
where `bias_update_rate > 0`) and SoftMoE's learned `scale`.

Steps are recorded in training calls only (`training=True`, as in
`model.fit`); `keras_moe.callbacks.router_stats` measures inference. Every
value is the mean over the steps recorded since the last reset of the
per-step value (MaxVio is a per-batch quantity, as in the paper). Keras
resets at the start of each epoch.

How the numbers flow: layer `call` -> the functions here -> accumulator
(non-trainable state) -> `keras_moe.metrics.RouterStatsMetric`
(`layer.router_stats`, in `model.metrics`) -> the fit
logs (`moe_aux_loss`, `moe_maxvio`, `moe_dropped_fraction`: progress bar,
`History`, every callback) and `keras_moe.callbacks.collect_router_stats`
(every statistic of every layer) -> `keras_moe.callbacks.RouterStats`
(TensorBoard).
"""

import math

from keras import ops

from keras_moe import backend
from keras_moe.backend.keras_math import KerasMath
from keras_moe.ops.router_losses import _flat_tokens
from keras_moe.ops.router_losses import _routed_load
from keras_moe.ops.router_losses import _switch_loss
from keras_moe.ops.router_losses import _token_mean
from keras_moe.ops.router_losses import _token_weights
from keras_moe.ops.router_losses import _z_loss

ROUTED = "routed"
SOFT = "soft"

ROUTED_SCALARS = (
    "aux_loss",
    "z_loss",
    "maxvio",
    "load_cv",
    "router_entropy",
    "dropped_fraction",
)
ROUTED_VECTORS = ("expert_load", "expert_importance")
SOFT_SCALARS = (
    "dispatch_entropy",
    "combine_entropy",
    "dispatch_max_weight",
    "combine_max_weight",
)
SOFT_VECTORS = ("expert_share",)

# The compact set that `model.fit` logs: the mean over the model's routed
# MoE layers of these per-layer statistics.
COMPACT_STATS = {
    "moe_aux_loss": "aux_loss",
    "moe_maxvio": "maxvio",
    "moe_dropped_fraction": "dropped_fraction",
}

# `p * log(p)` is taken as 0 where a probability underflows to 0.
_TINY = 1e-30


def _p_log_p(m, probs):
    """`p * log(p)`, elementwise; an entropy is minus its sum."""
    return probs * m.log(m.at_least(probs, _TINY))


def _max_violation(m, load, total, positive_total):
    """MaxVio of `load [E]` summing to `total`: `(E max - total) / total`.

    `positive_total` is `total` kept away from 0 (an all-zero load gives 0).
    """
    return (load.shape[-1] * m.max(load) - total) / positive_total


def max_violation(expert_load):
    """MaxVio (Wang et al. 2024): `(max_i load_i - mean load) / mean load`.

    0 for perfectly balanced experts, `E - 1` when one expert gets
    everything. An all-zero load (nothing routed) gives 0.

    Args:
        expert_load: float `[E]`, counts or fractions per expert.

    Returns:
        A float32 scalar.

    Example:

    >>> float(max_violation([10.0, 10.0, 10.0, 10.0]))
    0.0
    >>> float(max_violation([25.0, 5.0, 5.0, 5.0]))
    1.5
    """
    m = KerasMath
    load = m.f32(expert_load)
    total = m.sum(load)
    return _max_violation(m, load, total, m.at_least(total, _TINY))


def _router_statistics(m, router_probs, router_logits, expert_counts, token_mask):
    """The statistics every routed layer shares, and what the callers reuse:
    `(stats, routed, routed_at_least_1, real, num_real)` (see
    `router_losses._routed_load` and `router_losses._token_weights`)."""
    num_experts = router_probs.shape[-1]
    probs = _flat_tokens(m, router_probs, num_experts)
    logits = _flat_tokens(m, router_logits, num_experts)
    real, num_real = _token_weights(m, token_mask)
    load, counts, routed, routed_at_least_1 = _routed_load(m, expert_counts)
    importance = _token_mean(m, probs, real, num_real)
    entropy = -_token_mean(m, _p_log_p(m, probs), real, num_real, axis=None)
    if num_experts > 1:
        router_entropy = entropy / math.log(num_experts)
    else:
        router_entropy = entropy * 0.0
    stats = {
        "aux_loss": _switch_loss(m, load, importance),
        "z_loss": _z_loss(m, logits, real, num_real),
        "maxvio": _max_violation(m, counts, routed, routed_at_least_1),
        # The mean load is 1/E whenever anything was routed; with nothing
        # routed the load is all zeros and so is the CV.
        "load_cv": num_experts * m.std(load),
        "router_entropy": router_entropy,
        "expert_load": load,
        "expert_importance": importance,
    }
    return stats, routed, routed_at_least_1, real, num_real


def token_choice_stats(
    router_probs, router_logits, expert_counts, num_kept, token_mask=None
):
    """Router statistics of one token-choice routing step.

    Args:
        router_probs: float `[..., T, E]`, each token's distribution over
            experts (`RouterOutput.router_probs`).
        router_logits: float `[..., T, E]`.
        expert_counts: int `[..., E]`, choices routed to each expert before
            capacity, padding excluded (`DispatchPlan.expert_counts`).
        num_kept: int scalar, the choices that got a slot
            (`DispatchPlan.num_kept`).
        token_mask: optional bool `[..., T]`, False for padding.

    Returns:
        A dict of float32 tensors: the scalars of `ROUTED_SCALARS` and the
        `[E]` vectors of `ROUTED_VECTORS`. (The layers record them without
        gradients.)

    Example:

    Four tokens, top-1 over two experts; expert 0 has room for one token.

    >>> import numpy as np
    >>> probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    >>> stats = token_choice_stats(
    ...     probs, np.log(probs), expert_counts=[3, 1], num_kept=2)
    >>> [round(float(stats[name]), 3)
    ...  for name in ("maxvio", "dropped_fraction", "aux_loss")]
    [0.5, 0.5, 1.15]
    """
    m = backend.array_math()
    stats, routed, routed_at_least_1, _, _ = _router_statistics(
        m, router_probs, router_logits, expert_counts, token_mask
    )
    stats["dropped_fraction"] = (routed - m.f32(num_kept)) / routed_at_least_1
    return stats


def expert_choice_stats(
    router_probs, router_logits, slot_tokens, slot_filled, token_mask=None
):
    """Router statistics of one expert-choice routing step.

    Each expert fills its slots with its favourite tokens, so the load is
    balanced by construction (MaxVio 0) unless padding leaves an expert
    short of real tokens. Nothing is dropped by capacity; instead
    `dropped_fraction` is the fraction of real tokens that no expert took,
    which get no expert output either.

    Args:
        router_probs: float `[G, T, E]`.
        router_logits: float `[G, T, E]`.
        slot_tokens: int `[G, E, C]`, the token in each slot.
        slot_filled: bool `[G, E, C]`, whether a slot holds a real token.
        token_mask: optional bool `[G, T]`, False for padding.

    Returns:
        A dict of float32 tensors, as `token_choice_stats`.

    Example:

    >>> import numpy as np
    >>> probs = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])
    >>> slot_tokens = np.array([[[0, 1], [2, 1]]])
    >>> stats = expert_choice_stats(
    ...     probs, np.log(probs), slot_tokens, np.ones((1, 2, 2), bool))
    >>> float(stats["maxvio"]), float(stats["dropped_fraction"])
    (0.0, 0.0)
    """
    m = backend.array_math()
    filled = ops.cast(slot_filled, "float32")
    stats, _, _, real, num_real = _router_statistics(
        m, router_probs, router_logits, m.sum(filled, axis=-1), token_mask
    )
    num_groups = ops.shape(slot_tokens)[0]
    num_tokens = ops.shape(router_probs)[1]
    offsets = ops.reshape(
        ops.arange(num_groups, dtype="int32") * num_tokens, (-1, 1, 1)
    )
    times_taken = ops.segment_sum(
        ops.reshape(filled, (-1,)),
        ops.reshape(ops.cast(slot_tokens, "int32") + offsets, (-1,)),
        num_segments=num_groups * num_tokens,
    )
    untaken = m.reshape(m.f32(times_taken == 0), (-1, 1))
    stats["dropped_fraction"] = _token_mean(m, untaken, real, num_real, axis=None)
    return stats


def soft_routing_stats(dispatch_weights, combine_weights, num_experts, token_mask=None):
    """Statistics of a `SoftMoE` layer's dispatch and combine weights.

    Args:
        dispatch_weights: float `[B, T, N]`, softmax over tokens per slot.
        combine_weights: float `[B, T, N]`, softmax over slots per token.
        num_experts: int, `E`; the `N` slots are `E` consecutive groups.
        token_mask: optional bool `[B, T]`, False for padding.

    Returns:
        A dict of float32 tensors: the scalars of `SOFT_SCALARS` and
        `expert_share` `[E]`.

    Example:

    Uniform weights: maximal entropy, every expert an equal share.

    >>> import numpy as np
    >>> dispatch = np.full((1, 4, 2), 0.25)
    >>> combine = np.full((1, 4, 2), 0.5)
    >>> stats = soft_routing_stats(dispatch, combine, num_experts=2)
    >>> [round(float(stats[name]), 3) for name in
    ...  ("dispatch_entropy", "combine_entropy", "dispatch_max_weight")]
    [1.0, 1.0, 0.25]
    >>> np.round(np.asarray(stats["expert_share"]), 3).tolist()
    [0.5, 0.5]
    """
    m = backend.array_math()
    dispatch = m.f32(dispatch_weights)
    combine = m.f32(combine_weights)
    num_slots = dispatch.shape[-1]
    if token_mask is None:
        token_mask = ops.ones(ops.shape(dispatch)[:2])
    token_mask = m.f32(token_mask)  # [B, T]
    real, num_real = _token_weights(m, token_mask)  # [B * T, 1]
    real_per_sequence = m.sum(token_mask, axis=1)  # [B]

    # Per slot: how spread its mix of tokens is. A sequence with fewer than
    # two real tokens has nothing to spread over and is left out.
    spread = m.expand_dims(m.f32(real_per_sequence >= 2), -1)  # [B, 1]
    dispatch_entropy = -m.sum(_p_log_p(m, dispatch), axis=1) / m.expand_dims(
        m.log(m.at_least(real_per_sequence, 2.0)), -1
    )  # [B, N]
    num_spread_slots = m.at_least(m.sum(spread) * num_slots, 1.0)
    has_tokens = m.expand_dims(m.f32(real_per_sequence >= 1), -1)  # [B, 1]
    num_slots_with_tokens = m.at_least(m.sum(has_tokens) * num_slots, 1.0)

    # Per token, over the real tokens.
    combine = m.reshape(combine, (-1, num_slots))  # [B * T, N]
    if num_slots > 1:
        combine_entropy = -_token_mean(
            m, _p_log_p(m, combine), real, num_real, axis=None
        ) / math.log(num_slots)
    else:
        combine_entropy = num_real * 0.0
    token_share = m.sum(
        m.reshape(combine, (-1, num_experts, num_slots // num_experts)), axis=-1
    )  # [B * T, E]
    return {
        "dispatch_entropy": _token_mean(
            m, dispatch_entropy, spread, num_spread_slots, axis=None
        ),
        "combine_entropy": combine_entropy,
        "dispatch_max_weight": _token_mean(
            m, m.max(dispatch, axis=1), has_tokens, num_slots_with_tokens, axis=None
        ),
        "combine_max_weight": _token_mean(
            m, m.max(combine, axis=-1, keepdims=True), real, num_real, axis=None
        ),
        "expert_share": _token_mean(m, token_share, real, num_real),
    }

