"""Properties of token-choice dispatch, checked by hypothesis over shapes,
`top_k`, number of experts, capacity and masks.

- Every kept (token, choice) is processed by exactly its expert, exactly
  once; every dropped one by none; padding by none.
- Capacity goes first to first choices, then to second ones, in token
  order (GShard/Switch priority); `capacity_factor=None` drops nothing.
- The combine weight of a kept choice is exactly the router's weight.
- Outputs do not depend on the order of the sequences in the batch.

A few shapes are drawn from small sets so that compiled kernels are reused;
example counts are small and deadlines off to keep the suite fast.
"""

import math

import keras
import numpy as np
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_moe.layers import SparseMoE
from keras_moe.ops.dispatch import combine
from keras_moe.ops.dispatch import compute_dispatch_plan
from keras_moe.ops.dispatch import dispatch
from keras_moe.ops.dispatch import expert_capacity
from testing import to_numpy

HIDDEN_DIM = 8
SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Each example builds a layer: fewer of them.
LAYER_SETTINGS = settings(SETTINGS, max_examples=5)


def reference_kept(expert_ids, num_experts, capacity, token_mask):
    """GShard priority, one choice at a time: ranks first, then tokens."""
    num_tokens, top_k = expert_ids.shape
    used = np.zeros(num_experts, int)
    kept = np.zeros((num_tokens, top_k), bool)
    for rank in range(top_k):
        for token in range(num_tokens):
            if not token_mask[token]:
                continue
            expert = expert_ids[token, rank]
            if capacity is None or used[expert] < capacity:
                used[expert] += 1
                kept[token, rank] = True
    return kept


@st.composite
def routings(draw):
    """Expert choices `[T, k]` (distinct per token), a mask and a capacity."""
    num_experts = draw(st.sampled_from([1, 2, 4, 8]))
    top_k = draw(st.integers(1, min(num_experts, 3)))
    num_tokens = draw(st.sampled_from([1, 5, 12]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    expert_ids = np.stack(
        [rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)]
    ).astype("int32")
    token_mask = rng.random(num_tokens) < draw(st.sampled_from([1.0, 0.7, 0.3]))
    capacity = draw(st.one_of(st.none(), st.integers(1, num_tokens)))
    return expert_ids, token_mask, capacity, num_experts


@SETTINGS
@given(routings())
def test_every_kept_choice_is_processed_by_its_expert_exactly_once(routing):
    expert_ids, token_mask, capacity, num_experts = routing
    num_tokens, top_k = expert_ids.shape
    plan = compute_dispatch_plan(
        expert_ids[None], num_experts, capacity, token_mask[None]
    )
    kept = to_numpy(plan.kept)[0]
    expected_kept = reference_kept(expert_ids, num_experts, capacity, token_mask)
    np.testing.assert_array_equal(kept, expected_kept)
    if capacity is None:  # dropless: every real choice is kept
        np.testing.assert_array_equal(kept, np.repeat(token_mask[:, None], top_k, 1))

    # Tokens are one-hot rows, so a buffer slot says which token it holds.
    tokens = np.eye(num_tokens, dtype="float32")[None]
    buffers = to_numpy(dispatch(tokens, plan))[0]  # [E, C, T]
    processed = np.zeros((num_tokens, num_experts), int)
    for expert in range(num_experts):
        for row in buffers[expert]:
            if row.any():
                assert row.sum() == 1.0  # one whole token, nothing mixed
                processed[int(row.argmax()), expert] += 1
    expected = np.zeros((num_tokens, num_experts), int)
    for token, rank in zip(*np.nonzero(expected_kept)):
        expected[token, expert_ids[token, rank]] += 1
    np.testing.assert_array_equal(processed, expected)


@SETTINGS
@given(routings(), st.integers(0, 2**31))
def test_combine_gives_each_kept_choice_its_router_weight(routing, seed):
    expert_ids, token_mask, capacity, num_experts = routing
    num_tokens, top_k = expert_ids.shape
    weights = np.random.default_rng(seed).random((1, num_tokens, top_k)).astype("float32")
    plan = compute_dispatch_plan(
        expert_ids[None], num_experts, capacity, token_mask[None]
    )
    slots = to_numpy(plan.slot_filled).shape[-1]
    # Expert e answers every filled slot with the one-hot vector of e.
    expert_outputs = np.zeros((1, num_experts, slots, num_experts), "float32")
    for expert in range(num_experts):
        expert_outputs[0, expert, :, expert] = 1.0
    outputs = to_numpy(combine(expert_outputs, plan, weights))[0]  # [T, E]
    kept = reference_kept(expert_ids, num_experts, capacity, token_mask)
    expected = np.zeros((num_tokens, num_experts), "float32")
    for token, rank in zip(*np.nonzero(kept)):
        expected[token, expert_ids[token, rank]] = weights[0, token, rank]
    np.testing.assert_array_equal(outputs, expected)


class ProbedMoE(SparseMoE):
    """A `SparseMoE` whose experts are replaced by a probe.

    Expert `e` answers each filled buffer slot with the one-hot vector of
    `e`, so a token's output is `sum over kept choices of weight * e_hot`:
    it shows which experts processed the token, how often, and with which
    combine weight. The buffers are kept for inspection.
    """

    def _run_experts(self, buffers, *routing_groups):
        self.buffers = buffers
        filled = ops.cast(
            ops.any(ops.not_equal(buffers, 0), axis=-1, keepdims=True), buffers.dtype
        )
        signatures = ops.eye(self.num_experts, self.hidden_dim, dtype=buffers.dtype)
        return filled * signatures[None, :, None, :]


@st.composite
def layer_cases(draw):
    num_experts = draw(st.sampled_from([2, 4, 8]))
    top_k = draw(st.integers(1, min(num_experts, 3)))
    batch, length = draw(st.sampled_from([(1, 6), (3, 4)]))
    capacity_factor = draw(st.sampled_from([None, 0.5, 1.0, 2.0]))
    masked = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    return num_experts, top_k, batch, length, capacity_factor, masked, seed


@LAYER_SETTINGS
@given(layer_cases())
def test_layer_routes_each_kept_choice_once_with_the_router_weight(case):
    num_experts, top_k, batch, length, capacity_factor, masked, seed = case
    rng = np.random.default_rng(seed)
    layer = ProbedMoE(
        num_experts, 4, top_k=top_k, capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor, normalize_top_k=False,
    )
    x = rng.normal(size=(batch, length, HIDDEN_DIM)).astype("float32")
    mask = np.ones((batch, length), bool)
    if masked:
        mask = rng.random((batch, length)) < 0.7
    outputs = to_numpy(layer(x, mask=mask))[..., :num_experts].reshape(-1, num_experts)

    tokens = x.reshape(-1, HIDDEN_DIM)
    token_mask = mask.reshape(-1)
    routing = layer.router(tokens)
    expert_ids = to_numpy(routing.expert_ids)
    weights = to_numpy(routing.expert_weights)
    num_tokens = len(tokens)
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
        assert capacity == max(1, min(num_tokens, math.ceil(
            capacity_factor * num_tokens * top_k / num_experts - 1e-6)))
    kept = reference_kept(expert_ids, num_experts, capacity, token_mask)
    expected = np.zeros((num_tokens, num_experts), "float32")
    for token, rank in zip(*np.nonzero(kept)):
        expected[token, expert_ids[token, rank]] = weights[token, rank]
    # Kept choices carry exactly the router's weight, dropped ones nothing,
    # and no expert saw a token twice (that would double its weight).
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-7)
    if capacity_factor is None:
        assert kept[token_mask].all()

    # Each expert's buffer holds exactly the real tokens that kept it.
    buffers = to_numpy(layer.buffers)[0]
    for expert in range(num_experts):
        rows = [row for row in buffers[expert] if np.any(row != 0)]
        holders = sorted(
            token for token, rank in zip(*np.nonzero(kept))
            if expert_ids[token, rank] == expert
        )
        found = sorted(
            int(np.flatnonzero(np.all(tokens == row, axis=-1))[0]) for row in rows
        )
        assert found == holders


@SETTINGS
@given(layer_cases())
def test_outputs_do_not_depend_on_batch_order(case):
    num_experts, top_k, batch, length, _, masked, seed = case
    if batch == 1:
        batch, length = 3, 4
    rng = np.random.default_rng(seed)
    # Dropless, and a capacity that cannot bind (C = T when cf >= E / k):
    # then no token competes for a slot and order cannot matter.
    for capacity_factor in (None, num_experts / top_k):
        keras.utils.set_random_seed(seed % 1000)
        layer = SparseMoE(
            num_experts, 4, top_k=top_k, capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
        )
        x = rng.normal(size=(batch, length, HIDDEN_DIM)).astype("float32")
        mask = rng.random((batch, length)) < 0.7 if masked else np.ones((batch, length), bool)
        order = rng.permutation(batch)
        outputs = to_numpy(layer(x, mask=mask))
        permuted = to_numpy(layer(x[order], mask=mask[order]))
        np.testing.assert_allclose(permuted, outputs[order], rtol=1e-5, atol=1e-6)
