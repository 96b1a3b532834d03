"""The dispatch plan: which choices are kept, and where each one goes."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.ops import combine
from keras_moe.ops import compute_dispatch_plan
from keras_moe.ops import dispatch
from keras_moe.ops import expert_capacity
from testing import moe_reference


def random_choices(rng, num_groups, num_tokens, num_experts, top_k, skew=0.0):
    """Distinct experts per token; `skew` > 0 piles tokens onto expert 0."""
    scores = rng.normal(size=(num_groups, num_tokens, num_experts))
    scores[..., 0] += skew
    return np.argsort(-scores, axis=-1)[..., :top_k].astype("int32")


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,capacity",
    [(16, 4, 2, 3), (16, 4, 2, 8), (30, 8, 1, 2), (12, 3, 3, 1), (25, 5, 2, 25)],
)
@pytest.mark.parametrize("with_mask", [False, True])
def test_kept_choices_match_reference_priority(
    num_tokens, num_experts, top_k, capacity, with_mask
):
    rng = np.random.default_rng(num_tokens + capacity)
    num_groups = 2
    expert_ids = random_choices(rng, num_groups, num_tokens, num_experts, top_k, 1.0)
    token_mask = rng.random((num_groups, num_tokens)) > 0.3 if with_mask else None
    plan = compute_dispatch_plan(expert_ids, num_experts, capacity, token_mask)
    kept = ops.convert_to_numpy(plan.kept)
    counts = ops.convert_to_numpy(plan.expert_counts)
    for group in range(num_groups):
        mask = np.ones(num_tokens, bool) if token_mask is None else token_mask[group]
        expected = moe_reference.assign_capacity(
            expert_ids[group], num_experts, capacity, mask
        )
        np.testing.assert_array_equal(kept[group], expected)
        expected_counts = np.bincount(
            expert_ids[group][mask].reshape(-1), minlength=num_experts
        )
        np.testing.assert_array_equal(counts[group], expected_counts)


def test_slots_and_choices_point_at_each_other():
    rng = np.random.default_rng(0)
    num_groups, num_tokens, num_experts, top_k, capacity = 3, 20, 5, 2, 6
    expert_ids = random_choices(rng, num_groups, num_tokens, num_experts, top_k, 2.0)
    plan = compute_dispatch_plan(expert_ids, num_experts, capacity)
    slot_tokens = ops.convert_to_numpy(plan.slot_tokens)
    slot_filled = ops.convert_to_numpy(plan.slot_filled)
    choice_slots = ops.convert_to_numpy(plan.choice_slots)
    choice_kept = ops.convert_to_numpy(plan.choice_kept)
    assert slot_tokens.shape == (num_groups, num_experts, capacity)
    for group in range(num_groups):
        seen = set()
        for rank in range(top_k):
            for token in range(num_tokens):
                if not choice_kept[group, rank, token]:
                    continue
                expert, slot = divmod(int(choice_slots[group, rank, token]), capacity)
                assert expert == expert_ids[group, token, rank]
                assert slot_filled[group, expert, slot]
                assert slot_tokens[group, expert, slot] == token
                seen.add((expert, slot))
        # Every filled slot belongs to exactly one kept choice.
        assert len(seen) == slot_filled[group].sum() == choice_kept[group].sum()
        # Slots fill from the front of each expert's buffer.
        for expert in range(num_experts):
            filled = slot_filled[group, expert]
            assert list(filled) == sorted(filled, reverse=True)


def test_dispatch_and_combine_route_rows_exactly():
    rng = np.random.default_rng(1)
    num_groups, num_tokens, num_experts, top_k, capacity = 2, 10, 4, 2, 3
    expert_ids = random_choices(rng, num_groups, num_tokens, num_experts, top_k, 1.5)
    weights = rng.random((num_groups, num_tokens, top_k)).astype("float32")
    tokens = rng.normal(size=(num_groups, num_tokens, 3)).astype("float32")
    plan = compute_dispatch_plan(expert_ids, num_experts, capacity)
    buffers = ops.convert_to_numpy(dispatch(tokens, plan))
    assert buffers.shape == (num_groups, num_experts, capacity, 3)
    # Give each expert a distinct linear map so combine's bookkeeping shows.
    scales = np.arange(1, num_experts + 1, dtype="float32")[None, :, None, None]
    outputs = ops.convert_to_numpy(combine(buffers * scales, plan, weights))
    kept = ops.convert_to_numpy(plan.kept)
    expected = np.zeros_like(tokens)
    for group in range(num_groups):
        for token in range(num_tokens):
            for rank in range(top_k):
                if kept[group, token, rank]:
                    scale = expert_ids[group, token, rank] + 1
                    expected[group, token] += (
                        weights[group, token, rank] * scale * tokens[group, token]
                    )
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-6)
    # Empty slots are zero, not a copy of some token.
    filled = ops.convert_to_numpy(plan.slot_filled)
    assert np.all(buffers[~filled] == 0.0)


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,capacity_factor",
    [(4096, 64, 2, 1.25), (4096, 8, 2, 1.0), (10, 11, 1, 1.1), (7, 2, 1, 0.01), (5, 2, 2, 9.0)],
)
def test_capacity_formula(num_tokens, num_experts, top_k, capacity_factor):
    exact = capacity_factor * num_tokens * top_k / num_experts
    expected = min(max(math.ceil(round(exact, 9)), 1), num_tokens)
    assert expert_capacity(num_tokens, num_experts, top_k, capacity_factor) == expected
    # The same number when the token count is only known at run time.
    dynamic = expert_capacity(
        ops.convert_to_tensor(num_tokens, "int32"), num_experts, top_k, capacity_factor
    )
    assert int(ops.convert_to_numpy(dynamic)) == expected
    assert expert_capacity(num_tokens, num_experts, top_k, None) == num_tokens
    if keras.backend.backend() == "jax":
        # And when it is a symbolic dimension (`model.export` traces the
        # batch size as one): the capacity sizes a buffer.
        import jax
        from jax import export

        def buffer(tokens):
            capacity = expert_capacity(
                tokens.shape[0], num_experts, top_k, capacity_factor
            )
            return jax.numpy.zeros((capacity,))

        (symbolic_tokens,) = export.symbolic_shape("tokens")
        exported = export.export(jax.jit(buffer))(
            jax.ShapeDtypeStruct((symbolic_tokens,), "float32")
        )
        assert exported.call(np.zeros(num_tokens, "float32")).shape == (expected,)


def test_expert_counts_are_exact_integers():
    rng = np.random.default_rng(3)
    expert_ids = random_choices(rng, 2, 50, 6, 2, skew=1.0)
    plan = compute_dispatch_plan(expert_ids, 6, capacity=4)
    # Counted in int32 (float32 sums stop being exact at 2**24 choices).
    assert ops.convert_to_numpy(plan.expert_counts).dtype == np.int32
    for group in range(2):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(plan.expert_counts)[group],
            np.bincount(expert_ids[group].reshape(-1), minlength=6),
        )


def test_dropless_plan_keeps_everything_and_sizes_buffers_by_busiest_expert():
    from keras_moe.backend import data_dependent_shapes_allowed

    rng = np.random.default_rng(2)
    num_tokens, num_experts = 40, 8
    expert_ids = random_choices(rng, 1, num_tokens, num_experts, 2, skew=0.5)
    plan = compute_dispatch_plan(expert_ids, num_experts, capacity=None)
    assert ops.convert_to_numpy(plan.choice_kept).all()
    busiest = np.bincount(expert_ids.reshape(-1), minlength=num_experts).max()
    capacity = plan.slot_tokens.shape[-1]
    # Eager PyTorch/TensorFlow size buffers by the busiest expert; compiled
    # code (and JAX, always traced) needs the static bound T.
    assert capacity == (busiest if data_dependent_shapes_allowed() else num_tokens)


def test_groups_too_large_for_int32_sort_keys_are_refused():
    expert_ids = np.zeros((1, 2**23, 1), "int32")  # 8M tokens, top-1
    with pytest.raises(ValueError, match=r"tokens_per_group \* top_k = 8388608"):
        compute_dispatch_plan(expert_ids, num_experts=256, capacity=1)
