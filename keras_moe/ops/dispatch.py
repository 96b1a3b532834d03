"""Sort-based dispatch: move routed tokens into per-expert buffers and back.

The MoE layers share this one mechanism:

```
tokens [G, T, d] --dispatch(plan)--> buffers [G, E, C, d] --experts--> [G, E, C, d]
                 --combine(plan, weights)--> outputs [G, T, d]
```

`G` groups of `T` tokens are routed independently (a group is the unit that
stays local to one batch shard under expert parallelism). Every (token,
choice) pair gets a slot in its expert's buffer of capacity `C`, or is
dropped when the expert is full. Everything here is `keras.ops` with static
shapes (given static inputs), so it runs under XLA, `jax.jit` and PyTorch,
and its cost is a few sorts and gathers over `T * k` elements: it does not
grow with the number of experts the way a one-hot `[T, E, C]` dispatch
tensor or a loop over experts would.
"""

import fractions
import functools
from typing import NamedTuple

from keras import ops

from keras_moe.backend import data_dependent_shapes_allowed
from keras_moe.backend import stable_top_k


class DispatchPlan(NamedTuple):
    """Where every routed (token, choice) pair goes: routing where tokens choose.

    Integer and boolean tensors only: the plan carries no gradient. Choices
    are stored choice-major (`[G, k, T]`) because that is the order in which
    they win capacity: every first choice before any second choice.

    Attributes:
        slot_tokens: int32 `[G, E, C]`, the token (index within its group)
            held by each expert slot. Empty slots hold 0.
        slot_filled: bool `[G, E, C]`, whether a slot holds a token.
        choice_slots: int32 `[G, k, T]`, the flat slot `e * C + c` of each
            kept choice, 0 for dropped or padding choices.
        choice_kept: bool `[G, k, T]`, whether each choice got a slot.
        expert_counts: int32 `[G, E]`, choices routed to each expert before
            capacity is applied (padding excluded).
        expert_ids: int32 `[G, T, k]`, the experts the tokens chose, as
            given (padding included): what per-sequence balance losses
            count.
        tiles: `None` for per-expert buffers; for the grouped layout (see
            `keras_moe.ops.grouped_matmul`), the `TileLayout` of the rows,
            and the slots are rows: `slot_tokens` and `slot_filled` are
            `[G, M]` and `choice_slots` holds row indices.
    """

    slot_tokens: object
    slot_filled: object
    choice_slots: object
    choice_kept: object
    expert_counts: object
    expert_ids: object
    tiles: object = None

    @property
    def kept(self):
        """bool `[G, T, k]`: whether each (token, choice) got a slot."""
        return ops.transpose(self.choice_kept, (0, 2, 1))

    @property
    def num_kept(self):
        return ops.sum(ops.cast(self.choice_kept, "int32"))

    @property
    def num_routed(self):
        return ops.sum(self.expert_counts)


def expert_capacity(tokens_per_group, num_experts, top_k, capacity_factor):
    """Slots per expert: `C = ceil(capacity_factor * T * k / E)`, at most `T`.

    An expert can receive each token at most once, so `T` slots are always
    enough: `capacity_factor=None` returns that bound (a dispatch plan given
    `capacity=None` may size dropless buffers tighter). `T` may be a Python
    int, a symbolic dimension (JAX shape polymorphism, as in
    `model.export`; a `torch.compile` SymInt), computed in exact integer
    arithmetic so that every value of the dimension gets the capacity a
    Python int would, or a scalar tensor when the number of tokens is only
    known at run time (a TensorFlow graph with an unknown batch size).

    Args:
        tokens_per_group: int, symbolic dimension or scalar int tensor, `T`.
        num_experts: int, `E`.
        top_k: int, `k`.
        capacity_factor: float or `None` for dropless.

    Returns:
        The capacity, of the kind of `tokens_per_group`.

    Example:

    >>> expert_capacity(4096, num_experts=64, top_k=2, capacity_factor=1.25)
    160
    """
    if capacity_factor is None:
        return tokens_per_group
    if ops.is_tensor(tokens_per_group):
        ratio = capacity_factor * top_k / num_experts
        tokens = ops.cast(tokens_per_group, "float32")
        # The small tolerance keeps 1.1 * 10 / 11 from rounding up to 2.
        capacity = ops.cast(ops.ceil(tokens * ratio - 1e-6), "int32")
        return ops.maximum(1, ops.minimum(capacity, tokens_per_group))
    numerator, denominator = _capacity_ratio(capacity_factor, top_k, num_experts)
    if numerator >= denominator:
        # `ceil(T * ratio) >= T`: every token fits.
        capacity = tokens_per_group
    else:
        # `ceil(T * n / m)` with integers only, which symbolic dimensions
        # support (no floats, no `max`); it is within [1, T] for T >= 1.
        capacity = (tokens_per_group * numerator + denominator - 1) // denominator
    if isinstance(tokens_per_group, int):
        return max(1, capacity)
    return capacity


@functools.lru_cache(maxsize=64)
def _capacity_ratio(capacity_factor, top_k, num_experts):
    """`capacity_factor * k / E` as an exact fraction `(n, m)`.

    The float factor is read as the nearest fraction of denominator at most
    10**6, so that 1.1 is 11/10 and `1.1 * 10 / 11` is exactly 1.
    """
    ratio = fractions.Fraction(capacity_factor).limit_denominator(10**6)
    ratio = ratio * top_k / num_experts
    return ratio.numerator, ratio.denominator


def dropless_capacity(expert_counts, tokens_per_group):
    """The capacity that drops nothing.

    Where shapes may depend on data (eager PyTorch and TensorFlow), that is
    the busiest expert's count, so buffers grow with the tokens actually
    routed. Compiled code needs a static bound: `T`, as an expert receives
    each token at most once.
    """
    if data_dependent_shapes_allowed():
        busiest = int(ops.convert_to_numpy(ops.max(expert_counts)))
        return max(busiest, 1)
    return tokens_per_group


def _has_several_groups(tensor):
    """Whether the leading (group) axis is statically known to exceed 1."""
    num_groups = tensor.shape[0]
    return isinstance(num_groups, int) and num_groups > 1


def _gather_rows(values, indices):
    """Per-group gather: `values [G, M, ...]`, `indices [G, K]` -> `[G, K, ...]`.

    One group (the single-device case): one flat `take` on axis 0 (a plain
    row gather on every backend, whose gradient is a scatter-add) instead of
    `take_along_axis`, whose broadcasting implementations cost more. Several
    groups: `take_along_axis`, a gather batched over the group axis, so that
    groups sharded across devices (expert parallelism) stay where they are;
    the flat gather would need every group on every device.
    """
    if _has_several_groups(indices):
        indices = ops.reshape(
            indices, tuple(indices.shape) + (1,) * (len(values.shape) - 2)
        )
        return ops.take_along_axis(values, indices, axis=1)
    rows_per_group = ops.shape(values)[1]
    num_groups = ops.shape(indices)[0]
    flat_values = ops.reshape(values, (-1,) + tuple(values.shape[2:]))
    offsets = ops.expand_dims(ops.arange(num_groups, dtype="int32"), 1)
    return ops.take(flat_values, indices + offsets * rows_per_group, axis=0)


def _segment_sum_per_group(data, segment_ids, num_segments):
    """`segment_sum` within each group: `[G, N, ...]`, ids `[G, N]` -> `[G, S, ...]`.

    One group: a flat `segment_sum` with per-group offsets. Several groups:
    mapped over the group axis, so that sharded groups need no communication.
    """
    num_groups = ops.shape(segment_ids)[0]
    if _has_several_groups(segment_ids):
        return ops.vectorized_map(
            lambda group: ops.segment_sum(
                group[0], group[1], num_segments=num_segments
            ),
            (data, segment_ids),
        )
    offsets = ops.reshape(
        ops.arange(num_groups, dtype="int32") * num_segments,
        (-1,) + (1,) * (len(segment_ids.shape) - 1),
    )
    sums = ops.segment_sum(
        ops.reshape(data, (-1,) + tuple(data.shape[2:])),
        ops.reshape(segment_ids + offsets, (-1,)),
        num_segments=num_groups * num_segments,
    )
    return ops.reshape(sums, (num_groups, num_segments) + tuple(data.shape[2:]))


def grouped_rows_bound(num_choices, num_experts, tile_size):
    """Tiles and rows the grouped layout needs for `num_choices` kept choices.

    Each expert's rows are padded to whole tiles, so the tiles in use are at
    most `ceil(num_choices / tile_size) + E - 1`, and never more than
    `num_choices` (a tile holds at least one row).

    Args:
        num_choices: int, the most choices that can be kept.
        num_experts: int, `E`.
        tile_size: int, rows per tile.

    Returns:
        `(max_tiles, max_rows)`, ints.

    Example:

    >>> grouped_rows_bound(8192, num_experts=8, tile_size=256)
    (39, 9984)
    """
    max_tiles = min(-(-num_choices // tile_size) + num_experts - 1, num_choices)
    max_tiles = max(max_tiles, 1)
    return max_tiles, max_tiles * tile_size


def compute_dispatch_plan(
    expert_ids, num_experts, capacity, token_mask=None, tile_size=None
):
    """Assign every (token, choice) to a slot of its expert, or drop it.

    Capacity goes to first choices before second choices (GShard/Switch
    priority), and in token order within a choice rank. Padding tokens (where
    `token_mask` is False) are routed nowhere and take no capacity.

    Method: a stable sort of the choices by (expert, rank, token) lays each
    expert's choices out contiguously in priority order; a choice's position
    inside its expert is its sorted index minus the start of its expert, and
    the first `C` positions of each expert are its slots.

    Args:
        expert_ids: int tensor `[G, T, k]`, the experts chosen per token.
        num_experts: int, `E`.
        capacity: int or scalar int tensor, slots per expert `C`, or `None`
            for dropless routing (see `dropless_capacity`).
        token_mask: optional bool tensor `[G, T]`, False for padding.
        tile_size: optional int: lay the kept choices out in the grouped
            layout of `keras_moe.ops.grouped_matmul` with tiles of this many
            rows, instead of per-expert buffers (`T` and `k` must be static).

    Returns:
        A `DispatchPlan`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> ids = np.array([[[0], [0], [1]]])  # 1 group, 3 tokens, top-1
    >>> plan = compute_dispatch_plan(ids, num_experts=2, capacity=1)
    >>> ops.convert_to_numpy(plan.kept)[0, :, 0].tolist()  # expert 0 is full
    [True, False, True]
    """
    expert_ids = ops.cast(expert_ids, "int32")
    chosen_ids = expert_ids
    num_groups, num_tokens, top_k = (
        ops.shape(expert_ids)[0],
        ops.shape(expert_ids)[1],
        ops.shape(expert_ids)[2],
    )
    if token_mask is not None:
        # Padding goes to a virtual expert `E` that sorts last and owns no slot.
        expert_ids = ops.where(
            ops.expand_dims(token_mask, -1), expert_ids, num_experts
        )
    num_choices = top_k * num_tokens
    # Choice-major: flat index j = rank * T + token.
    choice_experts = ops.reshape(
        ops.transpose(expert_ids, (0, 2, 1)), (num_groups, num_choices)
    )

    if isinstance(num_choices, int) and (num_experts + 1) * num_choices >= 2**31:
        raise ValueError(
            "Too many routed choices in one group for int32 sort keys: "
            f"tokens_per_group * top_k = {num_choices} with num_experts="
            f"{num_experts} needs (num_experts + 1) * tokens * top_k < 2**31. "
            "Route the tokens in more, smaller groups."
        )
    # Unique keys make the order independent of whether the backend's
    # argsort is stable (TensorFlow's is not guaranteed to be).
    sort_keys = choice_experts * num_choices + ops.arange(
        num_choices, dtype="int32"
    )
    sorted_choices = ops.argsort(sort_keys, axis=-1)  # sorted pos -> choice
    sorted_positions = ops.argsort(sorted_choices, axis=-1)  # choice -> pos

    # Choices per expert (plus the padding expert), then where each starts.
    # Counted in int32, exact for any group the guard above admits (float32
    # sums stop counting exactly at 2**24).
    counts = _segment_sum_per_group(
        ops.ones((num_groups, num_choices), "int32"),
        choice_experts,
        num_segments=num_experts + 1,
    )
    starts = ops.cumsum(counts, axis=-1) - counts
    expert_counts = counts[:, :num_experts]
    position_in_expert = sorted_positions - _gather_rows(starts, choice_experts)
    if tile_size is not None:
        return _grouped_plan(
            expert_ids=chosen_ids,
            expert_counts=expert_counts,
            starts=starts,
            choice_experts=choice_experts,
            position_in_expert=position_in_expert,
            sorted_choices=sorted_choices,
            capacity=capacity,
            tile_size=tile_size,
        )
    if capacity is None:
        capacity = dropless_capacity(expert_counts, num_tokens)

    choice_kept = ops.logical_and(
        position_in_expert < capacity, choice_experts < num_experts
    )
    choice_slots = ops.where(
        choice_kept, choice_experts * capacity + position_in_expert, 0
    )

    slot_index = ops.arange(capacity, dtype="int32")
    slot_filled = slot_index[None, None, :] < ops.minimum(
        expert_counts, capacity
    )[:, :, None]
    slot_sorted_position = ops.where(
        slot_filled,
        ops.expand_dims(starts[:, :num_experts], -1) + slot_index,
        0,
    )
    slot_choices = _gather_rows(
        sorted_choices, ops.reshape(slot_sorted_position, (num_groups, -1))
    )
    slot_tokens = ops.where(
        slot_filled,
        ops.reshape(slot_choices % num_tokens, ops.shape(slot_filled)),
        0,
    )
    return DispatchPlan(
        slot_tokens=slot_tokens,
        slot_filled=slot_filled,
        choice_slots=ops.reshape(
            choice_slots, (num_groups, top_k, num_tokens)
        ),
        choice_kept=ops.reshape(choice_kept, (num_groups, top_k, num_tokens)),
        expert_counts=expert_counts,
        expert_ids=chosen_ids,
    )


def _grouped_plan(
    expert_ids,
    expert_counts,
    starts,
    choice_experts,
    position_in_expert,
    sorted_choices,
    capacity,
    tile_size,
):
    """The `DispatchPlan` of `compute_dispatch_plan(..., tile_size=...)`.

    The kept choices of each expert take consecutive rows, from the first
    row of the expert's first tile; each expert's rows are padded to whole
    tiles, and the tiles follow each other in expert order.
    """
    from keras_moe.ops.grouped_matmul import TileLayout

    num_groups, num_tokens, top_k = expert_ids.shape
    num_experts = expert_counts.shape[-1]
    num_choices = num_tokens * top_k
    kept_counts = expert_counts
    max_kept = num_choices
    if capacity is not None:
        kept_counts = ops.minimum(expert_counts, capacity)
        if isinstance(capacity, int):
            max_kept = min(num_choices, num_experts * capacity)
    max_tiles, max_rows = grouped_rows_bound(max_kept, num_experts, tile_size)

    expert_tiles = (kept_counts + tile_size - 1) // tile_size  # [G, E]
    tile_ends = ops.cumsum(expert_tiles, axis=-1)
    row_starts = (tile_ends - expert_tiles) * tile_size
    # A choice is kept when its expert has room; padding goes to expert E,
    # which has no rows.
    valid = choice_experts < num_experts
    expert_of_choice = ops.minimum(choice_experts, num_experts - 1)
    choice_kept = ops.logical_and(
        valid, position_in_expert < _gather_rows(kept_counts, expert_of_choice)
    )
    choice_rows = ops.where(
        choice_kept,
        _gather_rows(row_starts, expert_of_choice) + position_in_expert,
        0,
    )

    # Tile i belongs to the expert whose tiles end first after i: the count
    # of experts whose tiles end at or before i.
    tile_index = ops.arange(max_tiles, dtype="int32")
    tile_experts = ops.sum(
        ops.cast(tile_ends[:, None, :] <= tile_index[None, :, None], "int32"),
        axis=-1,
    )
    tile_experts = ops.minimum(tile_experts, num_experts - 1)
    row_index = ops.arange(max_rows, dtype="int32")
    row_experts = ops.repeat(tile_experts, tile_size, axis=-1)  # [G, M]
    position = row_index[None, :] - _gather_rows(row_starts, row_experts)
    row_filled = position < _gather_rows(kept_counts, row_experts)
    row_sorted_position = ops.where(
        row_filled, _gather_rows(starts, row_experts) + position, 0
    )
    row_tokens = ops.where(
        row_filled,
        _gather_rows(sorted_choices, row_sorted_position) % num_tokens,
        0,
    )
    layout = TileLayout(
        tile_size=tile_size,
        tile_experts=tile_experts,
        num_tiles=tile_ends[:, -1],
        group_sizes=expert_tiles * tile_size,
    )
    return DispatchPlan(
        slot_tokens=row_tokens,
        slot_filled=row_filled,
        choice_slots=ops.reshape(choice_rows, (num_groups, top_k, num_tokens)),
        choice_kept=ops.reshape(choice_kept, (num_groups, top_k, num_tokens)),
        expert_counts=expert_counts,
        expert_ids=expert_ids,
        tiles=layout,
    )


def dispatch(tokens, plan):
    """Gather tokens into expert buffers.

    Args:
        tokens: `[G, T, d]`.
        plan: the `DispatchPlan` or `ExpertChoicePlan` of these tokens.

    Returns:
        Buffers `[G, E, C, d]`; empty slots are zero.
    """
    num_groups = ops.shape(tokens)[0]
    buffer_shape = tuple(ops.shape(plan.slot_tokens)) + (tokens.shape[-1],)
    gathered = _gather_rows(
        tokens, ops.reshape(plan.slot_tokens, (num_groups, -1))
    )
    # Zeroing empty slots keeps whatever sits in token 0 (padding may hold
    # anything) out of the expert outputs.
    gathered = ops.where(
        ops.reshape(plan.slot_filled, (num_groups, -1, 1)),
        gathered,
        ops.zeros((), gathered.dtype),
    )
    return ops.reshape(gathered, buffer_shape)


def combine(expert_outputs, plan, expert_weights):
    """Gather expert outputs back to their tokens and mix them.

    `output[t] = sum_k weight[t, k] * expert_output[slot(t, k)]` over the kept
    choices; dropped choices add nothing (the residual carries the token).

    Args:
        expert_outputs: `[G, E, C, d]`.
        plan: the `DispatchPlan` the buffers were made with.
        expert_weights: `[G, T, k]`, the router's combine weights.

    Returns:
        `[G, T, d]`, in the dtype of `expert_outputs`.
    """
    num_groups = ops.shape(expert_outputs)[0]
    hidden_dim = expert_outputs.shape[-1]
    choice_shape = ops.shape(plan.choice_slots)
    flat_outputs = ops.reshape(expert_outputs, (num_groups, -1, hidden_dim))
    picked = _gather_rows(
        flat_outputs, ops.reshape(plan.choice_slots, (num_groups, -1))
    )
    picked = ops.reshape(picked, tuple(choice_shape) + (hidden_dim,))
    weights = ops.transpose(expert_weights, (0, 2, 1))
    weights = ops.where(plan.choice_kept, weights, ops.zeros((), weights.dtype))
    weights = ops.expand_dims(ops.cast(weights, expert_outputs.dtype), -1)
    # An unrolled sum over the (few) choices: XLA on CPU turns
    # `sum(picked * weights, axis=1)` into a reduction over a non-minor axis
    # that is ~50x slower than these k fused multiply-adds.
    outputs = picked[:, 0] * weights[:, 0]
    for rank in range(1, picked.shape[1]):
        outputs = outputs + picked[:, rank] * weights[:, rank]
    return outputs


class ExpertChoicePlan(NamedTuple):
    """Which tokens every expert took: routing where experts choose.

    Tokens make no choices here, so there is nothing per (token, choice):
    only the slots, which `dispatch` fills like a `DispatchPlan`'s.

    Attributes:
        slot_tokens: int32 `[G, E, C]`, the token (index within its group)
            each expert slot took, best first.
        slot_filled: bool `[G, E, C]`, whether a slot holds a real token
            (False where an expert ran out of real tokens to take).
        expert_counts: int32 `[G, E]`, the filled slots of each expert.
        tiles: always `None`: experts fill exactly `C` slots each, so their
            buffers need no grouped layout.
    """

    slot_tokens: object
    slot_filled: object
    expert_counts: object
    tiles: object = None


def compute_expert_choice_plan(router_probs, capacity, token_mask=None):
    """Expert choice routing (Zhou et al. 2022): each expert takes its top tokens.

    Every expert fills its `C` slots with the `C` tokens that give it the
    highest router probability, so loads are perfectly balanced by
    construction; a token may be taken by several experts or by none. Padding
    tokens (where `token_mask` is False) are taken only when an expert has
    fewer than `C` real tokens to choose from, and then fill no slot.

    Args:
        router_probs: float `[G, T, E]`, each token's probability per expert.
        capacity: int, slots per expert `C` (at most `T`).
        token_mask: optional bool `[G, T]`, False for padding.

    Returns:
        `(plan, slot_weights)`: an `ExpertChoicePlan`, and float
        `[G, E, C]`, the router probability of each slot's token, its
        combine weight.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> probs = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]], "float32")
    >>> plan, weights = compute_expert_choice_plan(probs, capacity=2)
    >>> ops.convert_to_numpy(plan.slot_tokens)[0].tolist()
    [[0, 1], [2, 1]]
    """
    affinity = ops.transpose(router_probs, (0, 2, 1))  # [G, E, T]
    if token_mask is not None:
        # Probabilities are >= 0, so padding ranks below every real token.
        affinity = ops.where(
            ops.expand_dims(token_mask, 1),
            affinity,
            ops.full((), -1.0, affinity.dtype),
        )
    slot_weights, slot_tokens = stable_top_k(affinity, capacity)
    slot_filled = slot_weights >= 0
    slot_weights = ops.where(slot_filled, slot_weights, 0.0)
    plan = ExpertChoicePlan(
        slot_tokens=slot_tokens,
        slot_filled=slot_filled,
        expert_counts=ops.sum(ops.cast(slot_filled, "int32"), axis=-1),
    )
    return plan, slot_weights


def combine_slots(expert_outputs, plan, slot_weights, num_tokens):
    """Scatter-add weighted expert outputs back to the tokens in their slots.

    The combine for routings where experts choose tokens: a token receives
    `sum over the slots holding it of weight * expert_output`, and nothing
    when no expert took it.

    Args:
        expert_outputs: `[G, E, C, d]`.
        plan: the `ExpertChoicePlan` the buffers were made with.
        slot_weights: float `[G, E, C]`, the combine weight of each slot.
        num_tokens: int, `T`, tokens per group.

    Returns:
        `[G, T, d]`, in the dtype of `expert_outputs`.
    """
    num_groups = ops.shape(expert_outputs)[0]
    hidden_dim = expert_outputs.shape[-1]
    weights = ops.where(plan.slot_filled, slot_weights, 0.0)
    weighted = expert_outputs * ops.expand_dims(
        ops.cast(weights, expert_outputs.dtype), -1
    )
    return _segment_sum_per_group(
        ops.reshape(weighted, (num_groups, -1, hidden_dim)),
        ops.reshape(plan.slot_tokens, (num_groups, -1)),
        num_segments=num_tokens,
    )
