"""The routing family against slow NumPy versions of the published algorithms.

Token choice with softmax or sigmoid scores, group-limited routing, bias
balancing, routed scaling (DeepSeek-V3), expert choice (Zhou et al.), the
gating tree (HierarchicalMoE), shared experts (DeepSeekMoE, Qwen-MoE),
jitter and noisy gating, and the sequence-wise balance loss.
"""


import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SparseMoE
from keras_moe.layers import TopKRouter
from keras_moe.ops.dispatch import compute_expert_choice_plan
from testing import check_gradients
from testing import moe_reference
from testing import reload_keras_file
from testing import routing_reference
from testing import run_layer_test
from testing import to_numpy
from testing import value_and_grads

HIDDEN_DIM = 6


def randomize(layer, rng, scale=0.7):
    """Random float32 weights; returns them as float64 keyed by inner path."""
    arrays = {}
    for variable in layer.trainable_weights:
        value = rng.normal(scale=scale, size=variable.shape).astype("float32")
        variable.assign(value)
        key = variable.path.split("/", 1)[1]
        arrays[key] = value.astype("float64")
    return arrays


def expert_arrays(arrays, prefix="experts/"):
    """The reference's per-expert weight dict from `randomize`'s arrays."""
    return {
        key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)
    }


def dense_ffn(tokens, arrays, activation, gated):
    """An always-on feed-forward block (the shared experts), one matrix set."""
    act = moe_reference.ACTIVATIONS[activation]
    up = tokens @ arrays["up_kernel"]
    hidden = act(tokens @ arrays["gate_kernel"]) * up if gated else act(up)
    return hidden @ arrays["down_kernel"]


TOKEN_CHOICE_CASES = {
    "softmax_unnormalised": dict(top_k=2, normalize_top_k=False),
    "sigmoid_scaled": dict(
        top_k=2, score_function="sigmoid", routed_scaling_factor=2.5
    ),
    "sigmoid_groups_bias": dict(
        top_k=3,
        score_function="sigmoid",
        expert_groups=4,
        top_groups=2,
        bias_update_rate=0.01,
        routed_scaling_factor=2.5,
    ),
    "softmax_groups": dict(top_k=2, expert_groups=2, top_groups=1),
}


def token_choice_reference(layer, arrays, tokens, capacity_factor, expert_bias=None, token_mask=None):
    router = layer.router
    ids, weights, logits, probs = routing_reference.token_choice(
        tokens,
        arrays["router/kernel"],
        top_k=router.top_k,
        score_function=router.score_function,
        normalize_top_k=router.normalize_top_k,
        routed_scaling_factor=router.routed_scaling_factor,
        expert_groups=router.expert_groups,
        top_groups=router.top_groups,
        expert_bias=expert_bias,
    )
    num_tokens = tokens.shape[0]
    if token_mask is None:
        token_mask = np.ones(num_tokens, dtype=bool)
    capacity = moe_reference.capacity_for(
        num_tokens, layer.num_experts, router.top_k, capacity_factor
    )
    kept = moe_reference.assign_capacity(ids, layer.num_experts, capacity, token_mask)
    outputs = routing_reference.apply_experts(
        tokens,
        expert_arrays(arrays),
        ids,
        weights,
        kept,
        layer.experts.activation,
        layer.experts.gated,
    )
    real = np.flatnonzero(token_mask)
    counts = np.bincount(ids[real].reshape(-1), minlength=layer.num_experts)
    aux_loss = layer.num_experts * np.sum(
        counts / counts.sum() * probs[real].mean(axis=0)
    )
    return dict(ids=ids, weights=weights, outputs=outputs, counts=counts, aux_loss=aux_loss, probs=probs)


@pytest.mark.parametrize("case", sorted(TOKEN_CHOICE_CASES))
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_token_choice_options_match_reference(case, capacity_factor):
    rng = np.random.default_rng(len(case))
    layer = SparseMoE(
        8, 5, capacity_factor=capacity_factor, **TOKEN_CHOICE_CASES[case]
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    expert_bias = None
    if layer.router.bias_update_rate:
        expert_bias = rng.normal(scale=0.3, size=8).astype("float32")
        layer.router.expert_bias.assign(expert_bias)
        expert_bias = expert_bias.astype("float64")
    tokens = rng.normal(size=(20, HIDDEN_DIM)).astype("float32")
    reference = token_choice_reference(
        layer, arrays, tokens.astype("float64"), capacity_factor, expert_bias
    )

    routing = layer.router(tokens)
    np.testing.assert_array_equal(to_numpy(routing.expert_ids), reference["ids"])
    np.testing.assert_allclose(
        to_numpy(routing.expert_weights), reference["weights"], rtol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(routing.router_probs), reference["probs"], rtol=1e-5, atol=1e-7
    )
    outputs = layer(tokens, training=True)
    np.testing.assert_allclose(
        to_numpy(outputs), reference["outputs"], rtol=1e-4, atol=1e-5
    )
    (aux_loss,) = [float(to_numpy(loss)) for loss in layer.losses]
    np.testing.assert_allclose(aux_loss, 0.01 * reference["aux_loss"], rtol=1e-5)


def test_group_limited_selection_with_ties():
    # Tokens are one-hot, so each token's logits are one row of the kernel
    # and ties are exact. 8 experts in 4 groups of 2; each token may use 2
    # groups.
    logits = np.array(
        [
            # Groups 0 and 1 tie for second place behind group 3: group 0
            # (the lower index) wins; inside, experts 0 and 1 tie as well.
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 3.0, 0.5],
            # Every group ties: groups 0 and 1 are kept, and their four
            # equal experts are taken lowest index first.
            [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
            # Groups rank by their two best experts: group 0 holds the best
            # single expert but loses to groups 1 and 2.
            [4.0, -4.0, 1.5, 1.5, 0.6, 0.6, -1.0, -1.0],
        ],
        "float32",
    )
    router = TopKRouter(
        8, top_k=3, score_function="sigmoid", expert_groups=4, top_groups=2,
        dtype="float32",
    )
    router.build((None, 8))
    kernel = np.zeros((8, 8), "float32")
    kernel[: len(logits)] = logits
    router.kernel.assign(kernel)
    tokens = np.eye(8, dtype="float32")[: len(logits)]
    expected_ids, _, _, _ = routing_reference.token_choice(
        tokens.astype("float64"), kernel.astype("float64"), top_k=3,
        score_function="sigmoid", expert_groups=4, top_groups=2,
    )
    assert expected_ids.tolist() == [[6, 0, 1], [0, 1, 2], [2, 3, 4]]
    np.testing.assert_array_equal(to_numpy(router(tokens).expert_ids), expected_ids)


def test_bias_steers_selection_but_not_weights():
    router = TopKRouter(
        4, top_k=2, score_function="sigmoid", normalize_top_k=False,
        bias_update_rate=0.001, dtype="float32",
    )
    router.build((None, HIDDEN_DIM))
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(10, HIDDEN_DIM)).astype("float32")
    unbiased = router(tokens)
    router.expert_bias.assign(np.array([0.0, 0.0, 0.0, 10.0], "float32"))
    biased = router(tokens)
    ids = to_numpy(biased.expert_ids)
    assert (ids[:, 0] == 3).all()
    scores = 1.0 / (1.0 + np.exp(-to_numpy(unbiased.router_logits).astype("float64")))
    np.testing.assert_allclose(
        to_numpy(biased.expert_weights),
        np.take_along_axis(scores, ids, axis=-1),
        rtol=1e-6,
    )
    # The same tokens, so the same probabilities: the bias is not a weight.
    np.testing.assert_allclose(
        to_numpy(biased.router_probs), to_numpy(unbiased.router_probs)
    )


def test_bias_update_step_follows_loads_of_real_tokens():
    rng = np.random.default_rng(1)
    layer = SparseMoE(
        6, 4, top_k=2, score_function="sigmoid", bias_update_rate=0.01,
        capacity_factor=0.5, aux_loss_weight=0.0,
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    start_bias = rng.normal(scale=0.05, size=6).astype("float32")
    layer.router.expert_bias.assign(start_bias)
    tokens = rng.normal(size=(3, 7, HIDDEN_DIM)).astype("float32")
    mask = rng.random((3, 7)) > 0.3
    layer(tokens, mask=mask, training=True)
    reference = token_choice_reference(
        layer, arrays, tokens.reshape(-1, HIDDEN_DIM).astype("float64"), 0.5,
        start_bias.astype("float64"), mask.reshape(-1),
    )
    # Loads are counted before capacity (what the router asked for) and
    # without padding.
    counts = reference["counts"]
    expected = start_bias + 0.01 * np.sign(counts.mean() - counts)
    np.testing.assert_allclose(to_numpy(layer.router.expert_bias), expected, atol=1e-7)
    # Inference leaves it alone.
    layer(tokens, mask=mask, training=False)
    np.testing.assert_allclose(to_numpy(layer.router.expert_bias), expected, atol=1e-7)


def test_bias_balancing_under_fit_and_saving(tmp_path):
    rng = np.random.default_rng(2)
    inputs = keras.Input((8, HIDDEN_DIM))
    moe = SparseMoE(
        8, 8, top_k=2, score_function="sigmoid", bias_update_rate=0.01,
        aux_loss_weight=0.0, capacity_factor=None, name="moe",
    )
    model = keras.Model(inputs, moe(inputs))
    # Skewed inputs: one direction dominates, so the router starts unbalanced.
    x = (rng.normal(size=(64, 8, HIDDEN_DIM)) + 2.0).astype("float32")
    y = rng.normal(size=(64, 8, HIDDEN_DIM)).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # 8 steps, compiled
    bias = to_numpy(moe.router.expert_bias)
    steps = bias / 0.01
    # Every step moves every expert by exactly +-u (or 0 at the mean).
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(bias).max() > 0.02
    assert abs(bias.sum()) < 0.01 * 8 * 8  # favours some, penalises others
    restored = reload_keras_file(model, tmp_path)
    np.testing.assert_array_equal(
        to_numpy(restored.get_layer("moe").router.expert_bias), bias
    )
    np.testing.assert_allclose(
        to_numpy(restored(x[:4])), to_numpy(model(x[:4])), atol=1e-6
    )


@pytest.mark.parametrize(
    "case", ["sigmoid_groups_bias", "sigmoid_scaled"]
)
def test_token_choice_gradients_match_finite_differences(case):
    rng = np.random.default_rng(3)
    layer = SparseMoE(
        8, 5, capacity_factor=None, aux_loss_weight=0.1, **TOKEN_CHOICE_CASES[case]
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    expert_bias = None
    if layer.router.bias_update_rate:
        expert_bias = rng.normal(scale=0.3, size=8)
        layer.router.expert_bias.assign(expert_bias.astype("float32"))
        expert_bias = expert_bias.astype("float32").astype("float64")
    tokens = rng.normal(size=(10, HIDDEN_DIM)).astype("float32")

    def reference_objective(tokens64):
        reference = token_choice_reference(layer, arrays, tokens64, None, expert_bias)
        return reference["outputs"], 0.1 * reference["aux_loss"]

    check_layer_gradients(layer, tokens, arrays, reference_objective, rng)


def check_layer_gradients(layer, tokens, arrays, reference_objective, rng):
    """`check_gradients` of a training call, `arrays` keyed as `randomize`'s."""
    weights = {f"{layer.name}/{key}": array for key, array in arrays.items()}
    check_gradients(layer, tokens, weights, reference_objective, rng, training=True)


# Expert choice.


def test_expert_choice_matches_reference_and_fills_every_expert():
    rng = np.random.default_rng(4)
    layer = SparseMoE(
        4, 5, routing="expert_choice", capacity_factor=1.5, eval_capacity_factor=2.0
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(2, 6, HIDDEN_DIM)).astype("float32")
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    for training, factor in [(True, 1.5), (False, 2.0)]:
        expected, chosen, _ = routing_reference.expert_choice(
            tokens.reshape(-1, HIDDEN_DIM).astype("float64"),
            {"router_kernel": arrays["router/kernel"], **expert_arrays(arrays)},
            capacity_factor=factor,
            activation="silu",
            gated=True,
            token_mask=mask.reshape(-1),
        )
        outputs = layer(tokens, mask=mask, training=training)
        np.testing.assert_allclose(
            to_numpy(outputs).reshape(-1, HIDDEN_DIM), expected, rtol=1e-4, atol=1e-5
        )
        # Perfect balance: every expert holds exactly C real tokens.
        assert {len(tokens_of_expert) for tokens_of_expert in chosen} == {
            int(np.ceil(factor * 12 / 4))
        }
    # Tokens that no expert took get zero; some took several experts.
    taken = np.bincount(np.concatenate(chosen), minlength=12)
    assert taken.max() >= 2
    # Balanced by construction: no load-balancing loss is added.
    layer(tokens, training=True)
    assert layer.losses == []


def test_expert_choice_plan_gives_every_expert_capacity_slots():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(8), size=(2, 40)).astype("float32")
    plan, weights = compute_expert_choice_plan(probs, capacity=10)
    counts = to_numpy(plan.expert_counts)
    np.testing.assert_array_equal(counts, np.full((2, 8), 10))
    slot_tokens = to_numpy(plan.slot_tokens)
    for group in range(2):
        for expert in range(8):
            expected = routing_reference.best_first(probs[group, :, expert], 10)
            assert slot_tokens[group, expert].tolist() == expected
            np.testing.assert_allclose(
                to_numpy(weights)[group, expert], probs[group, expected, expert]
            )


def test_expert_choice_gradients_match_finite_differences():
    rng = np.random.default_rng(6)
    layer = SparseMoE(4, 5, routing="expert_choice", capacity_factor=1.0, z_loss_weight=0.01)
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(12, HIDDEN_DIM)).astype("float32")

    def reference_objective(tokens64):
        outputs, _, logits = routing_reference.expert_choice(
            tokens64,
            {"router_kernel": arrays["router/kernel"], **expert_arrays(arrays)},
            capacity_factor=1.0,
            activation="silu",
            gated=True,
        )
        log_z = np.log(np.exp(logits).sum(-1))
        return outputs, 0.01 * np.mean(log_z**2)

    check_layer_gradients(layer, tokens, arrays, reference_objective, rng)


def test_expert_choice_refuses_a_causal_decoder():
    with pytest.raises(ValueError, match="cannot be used in a causal decoder"):
        SparseMoE(4, 8, routing="expert_choice", causal=True)
    # Token choice in a causal decoder is fine.
    SparseMoE(4, 8, causal=True)


# The gating tree.


def hierarchical_reference(layer, arrays, tokens64, capacity_factor):
    ids, weights, logits, probs = routing_reference.hierarchical(
        tokens64,
        arrays["router/group_kernel"],
        arrays["router/expert_kernel"],
        top_groups=layer.router.top_groups,
        top_k=layer.router.top_k,
        normalize_top_k=layer.router.normalize_top_k,
    )
    capacity = moe_reference.capacity_for(
        len(tokens64), layer.num_experts, ids.shape[1], capacity_factor
    )
    kept = moe_reference.assign_capacity(
        ids, layer.num_experts, capacity, np.ones(len(tokens64), bool)
    )
    outputs = routing_reference.apply_experts(
        tokens64, expert_arrays(arrays), ids, weights, kept, "silu", True
    )
    counts = np.bincount(ids.reshape(-1), minlength=layer.num_experts)
    aux_loss = layer.num_experts * np.sum(counts / counts.sum() * probs.mean(0))
    log_z = np.log(np.exp(logits).sum(-1))
    return dict(ids=ids, weights=weights, outputs=outputs, aux_loss=aux_loss, z_loss=np.mean(log_z**2))


@pytest.mark.parametrize("normalize_top_k", [False, True])
def test_hierarchical_moe_matches_reference(normalize_top_k):
    rng = np.random.default_rng(7)
    layer = HierarchicalMoE(
        3, 4, 5, top_groups=2, top_k=2, normalize_top_k=normalize_top_k,
        capacity_factor=1.0, z_loss_weight=0.001,
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(15, HIDDEN_DIM)).astype("float32")
    reference = hierarchical_reference(layer, arrays, tokens.astype("float64"), 1.0)
    routing = layer.router(tokens)
    np.testing.assert_array_equal(to_numpy(routing.expert_ids), reference["ids"])
    np.testing.assert_allclose(
        to_numpy(routing.expert_weights), reference["weights"], rtol=1e-5
    )
    outputs = layer(tokens, training=True)
    np.testing.assert_allclose(to_numpy(outputs), reference["outputs"], rtol=1e-4, atol=1e-5)
    aux_loss, z_loss = [float(to_numpy(loss)) for loss in layer.losses]
    np.testing.assert_allclose(aux_loss, 0.01 * reference["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(z_loss, 0.001 * reference["z_loss"], rtol=1e-5)


def test_hierarchical_moe_gradients_match_finite_differences():
    rng = np.random.default_rng(8)
    layer = HierarchicalMoE(2, 3, 4, top_groups=1, top_k=2, capacity_factor=None)
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(8, HIDDEN_DIM)).astype("float32")

    def reference_objective(tokens64):
        reference = hierarchical_reference(layer, arrays, tokens64, None)
        return reference["outputs"], 0.01 * reference["aux_loss"]

    check_layer_gradients(layer, tokens, arrays, reference_objective, rng)


# Shared experts.


@pytest.mark.parametrize("shared_expert_gate", [False, True])
def test_shared_expert_moe_matches_reference_and_gradients(shared_expert_gate):
    rng = np.random.default_rng(9)
    layer = SharedExpertMoE(
        4, 3, num_shared_experts=2, shared_expert_gate=shared_expert_gate,
        top_k=2, capacity_factor=None,
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng, scale=0.5)
    assert arrays["shared_experts/up_kernel"].shape == (HIDDEN_DIM, 6)
    tokens = rng.normal(size=(9, HIDDEN_DIM)).astype("float32")

    def reference_objective(tokens64):
        routed = token_choice_reference(layer, arrays, tokens64, None)
        shared = dense_ffn(
            tokens64, expert_arrays(arrays, "shared_experts/"), "silu", True
        )
        if shared_expert_gate:
            shared = shared * routing_reference.sigmoid(
                tokens64 @ arrays["shared_gate_kernel"]
            )
        return routed["outputs"] + shared, 0.01 * routed["aux_loss"]

    expected, _ = reference_objective(tokens.astype("float64"))
    np.testing.assert_allclose(
        to_numpy(layer(tokens)), expected, rtol=1e-4, atol=1e-5
    )
    check_layer_gradients(layer, tokens, arrays, reference_objective, rng)


def test_shared_experts_ignore_padding():
    rng = np.random.default_rng(10)
    layer = SharedExpertMoE(4, 3, shared_expert_gate=True, use_bias=True)
    tokens = rng.normal(size=(2, 5, HIDDEN_DIM)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    outputs = to_numpy(layer(tokens, mask=mask))
    poisoned = tokens.copy()
    poisoned[0, 3:] = np.nan
    np.testing.assert_allclose(to_numpy(layer(poisoned, mask=mask)), outputs)
    np.testing.assert_array_equal(outputs[0, 3:], 0.0)


# Router noise.


@pytest.mark.parametrize(
    "options", [dict(jitter=0.5), dict(noisy_gating=True)], ids=["jitter", "noisy"]
)
def test_router_noise_is_on_in_training_only(options):
    rng = np.random.default_rng(11)
    layer = SparseMoE(4, 5, top_k=1, capacity_factor=None, seed=3, **options)
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(64, HIDDEN_DIM)).astype("float32")
    reference = token_choice_reference(layer, arrays, tokens.astype("float64"), None)
    np.testing.assert_allclose(
        to_numpy(layer(tokens, training=False)), reference["outputs"], rtol=1e-4, atol=1e-5
    )
    clean_ids = to_numpy(layer.router(tokens, training=False).expert_ids)
    noisy_ids = [to_numpy(layer.router(tokens, training=True).expert_ids) for _ in range(2)]
    assert (noisy_ids[0] != clean_ids).any()
    assert (noisy_ids[0] != noisy_ids[1]).any()


def test_noisy_gating_learns_its_noise_kernel():
    rng = np.random.default_rng(12)
    layer = SparseMoE(4, 5, noisy_gating=True, seed=1)
    layer.build((None, HIDDEN_DIM))
    tokens = rng.normal(size=(16, HIDDEN_DIM)).astype("float32")
    _, _, grads = value_and_grads(
        layer, tokens, lambda outputs, losses: ops.sum(outputs**2), training=True
    )
    assert np.abs(grads[layer.router.noise_kernel.path]).max() > 0


# The sequence-wise balance loss.


def test_sequence_balance_loss_matches_reference():
    rng = np.random.default_rng(13)
    layer = SparseMoE(
        6, 4, top_k=2, score_function="sigmoid", aux_loss_weight=0.0,
        sequence_aux_loss_weight=0.5, capacity_factor=None,
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(3, 5, HIDDEN_DIM)).astype("float32")
    mask = np.ones((3, 5), bool)
    mask[1, 2:] = False
    mask[2, :] = False  # a sequence of padding counts for nothing
    layer(tokens, mask=mask, training=True)
    (loss,) = [float(to_numpy(loss)) for loss in layer.losses]
    ids, _, _, probs = routing_reference.token_choice(
        tokens.reshape(-1, HIDDEN_DIM).astype("float64"),
        arrays["router/kernel"], top_k=2, score_function="sigmoid",
    )
    expected = routing_reference.sequence_balance_loss(
        probs.reshape(3, 5, 6), ids.reshape(3, 5, 2), mask
    )
    np.testing.assert_allclose(loss, 0.5 * expected, rtol=1e-5)


def test_sequence_balance_loss_of_a_rank_2_input_is_one_sequence():
    rng = np.random.default_rng(14)
    layer = SparseMoE(
        6, 4, top_k=2, aux_loss_weight=0.0, sequence_aux_loss_weight=0.5,
        capacity_factor=1.0,
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(7, HIDDEN_DIM)).astype("float32")
    mask = np.array([True] * 5 + [False] * 2)
    layer(tokens, mask=mask, training=True)
    (loss,) = [float(to_numpy(loss)) for loss in layer.losses]
    ids, _, _, probs = routing_reference.token_choice(
        tokens.astype("float64"), arrays["router/kernel"], top_k=2,
        score_function="softmax",
    )
    expected = routing_reference.sequence_balance_loss(
        probs[None], ids[None], mask[None]
    )
    np.testing.assert_allclose(loss, 0.5 * expected, rtol=1e-5)


# Keras conventions.


LAYERS = {
    "deepseek_v3_routing": (SparseMoE, dict(
        num_experts=8, intermediate_dim=4, top_k=2, score_function="sigmoid",
        expert_groups=4, top_groups=2, bias_update_rate=0.001,
        routed_scaling_factor=2.5, jitter=0.01, noisy_gating=True,
        sequence_aux_loss_weight=1e-4, seed=5,
    )),
    "expert_choice": (SparseMoE, dict(num_experts=4, intermediate_dim=4,
                                      routing="expert_choice")),
    "shared": (SharedExpertMoE, dict(
        num_experts=8, intermediate_dim=4, num_shared_experts=2,
        shared_intermediate_dim=12, shared_expert_gate=True, top_k=3,
        score_function="sigmoid",
    )),
    "hierarchical": (HierarchicalMoE, dict(
        num_groups=2, experts_per_group=4, intermediate_dim=4, top_groups=2,
        top_k=1, normalize_top_k=True, z_loss_weight=0.01,
    )),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_config_and_keras_file_round_trip(name, tmp_path):
    layer_class, init_kwargs = LAYERS[name]
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    run_layer_test(layer_class, init_kwargs, x, tmp_path=tmp_path)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SparseMoE(8, 4, expert_groups=3), "`expert_groups` must divide `num_experts`"),
        (lambda: SparseMoE(8, 4, expert_groups=4, top_groups=5), r"`top_groups` must be an integer in \[1, 4\]"),
        (lambda: SparseMoE(8, 4, top_k=5, expert_groups=4, top_groups=2), "`top_k` must be at most the number of experts a token can reach: 4"),
        (lambda: SparseMoE(8, 4, top_k=9), "`top_k` must be at most .*: 8"),
        (lambda: SparseMoE(8, 4, bias_update_rate=-0.1), "`bias_update_rate` must be a non-negative number"),
        (lambda: SparseMoE(8, 4, routing="random"), "`routing` must be one of 'token_choice', 'expert_choice'"),
        (lambda: SparseMoE(8, 4, score_function="relu"), "`score_function` must be one of 'softmax', 'sigmoid'"),
        (lambda: SparseMoE(8, 4, jitter=1.0), r"`jitter` must be in \[0, 1\)"),
        (lambda: SparseMoE(8, 4, routed_scaling_factor=0), "`routed_scaling_factor` must be a positive number"),
        (lambda: SparseMoE(8, 4, noisy_gating="yes"), "`noisy_gating` must be True or False"),
        (lambda: SparseMoE(8, 4, routing="expert_choice", capacity_factor=None), "needs `capacity_factor` to be a positive number"),
        (lambda: SparseMoE(8, 4, routing="expert_choice", eval_capacity_factor=None), "needs `eval_capacity_factor` to be a positive number"),
        (lambda: SparseMoE(8, 4, routing="expert_choice", bias_update_rate=0.1), "does not use `expert_groups` or `bias_update_rate`"),
        (lambda: SharedExpertMoE(8, 4, num_shared_experts=0), "`num_shared_experts` must be an integer >= 1"),
        (lambda: SharedExpertMoE(8, 4, shared_intermediate_dim=0), "`shared_intermediate_dim` must be an integer >= 1"),
        (lambda: HierarchicalMoE(2, 4, 8, top_groups=3), r"`top_groups` must be an integer in \[1, 2\]"),
        (lambda: HierarchicalMoE(2, 4, 8, top_k=5), r"`top_k` must be an integer in \[1, 4\]"),
        (lambda: HierarchicalMoE(2, 4, 8, score_function="sigmoid"), "`score_function` configure a flat router"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()
