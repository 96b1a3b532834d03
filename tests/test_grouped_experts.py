"""The grouped expert path (dropless at sparse cost) against NumPy references."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SparseMoE
from keras_moe.ops.dispatch import compute_dispatch_plan
from keras_moe.ops.dispatch import grouped_rows_bound
from keras_moe.ops.grouped_matmul import TileLayout
from keras_moe.ops.grouped_matmul import grouped_matmul
from test_sparse_moe import HIDDEN_DIM
from test_sparse_moe import NUM_EXPERTS
from test_sparse_moe import make_layer
from test_sparse_moe import reference_for
from testing import value_and_grads

BACKEND_KERNEL = {"jax": "ragged_dot", "torch": "grouped_mm"}.get(
    keras.backend.backend()
)
KERNELS = ["tiles"] + ([BACKEND_KERNEL] if BACKEND_KERNEL else [])


def _layout(expert_rows, tile_size, max_tiles):
    """A grouped layout, in NumPy, for `expert_rows[e]` rows per expert."""
    tiles_per_expert = [-(-rows // tile_size) for rows in expert_rows]
    tile_experts = np.concatenate(
        [np.full(count, expert) for expert, count in enumerate(tiles_per_expert)]
        + [np.full(max_tiles - sum(tiles_per_expert), len(expert_rows) - 1)]
    ).astype("int32")
    return TileLayout(
        tile_size,
        tile_experts,
        np.int32(sum(tiles_per_expert)),
        np.array(tiles_per_expert, "int32") * tile_size,
    )


def _numpy_grouped(rows, kernels, layout, transpose):
    """Each used tile's rows times its expert's kernel, row by row."""
    kernels = np.swapaxes(kernels, -1, -2) if transpose else kernels
    outputs = np.zeros((rows.shape[0], kernels.shape[-1]))
    for tile in range(int(layout.num_tiles)):
        expert = layout.tile_experts[tile]
        for row in range(tile * layout.tile_size, (tile + 1) * layout.tile_size):
            outputs[row] = rows[row] @ kernels[expert]
    return outputs


class GroupedProbe(keras.layers.Layer):
    """`grouped_matmul` with trainable kernels, for gradients."""

    def __init__(self, kernels, layout, kernel, transpose):
        super().__init__(dtype="float32")
        self.kernels = self.add_weight(
            shape=kernels.shape, initializer=keras.initializers.Constant(kernels)
        )
        self.layout, self.kernel, self.transpose = layout, kernel, transpose
        self.built = True

    def call(self, rows):
        return grouped_matmul(
            rows, self.kernels, self.layout, self.kernel, self.transpose
        )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "expert_rows",
    [[5, 3, 8, 4], [0, 12, 0, 0], [7, 0, 0, 1]],
    ids=["spread", "one_expert", "empty_experts"],
)
def test_grouped_matmul_matches_numpy(kernel, transpose, expert_rows):
    rng = np.random.default_rng(len(expert_rows) + sum(expert_rows))
    tile_size, max_tiles = 4, 8
    layout = _layout(expert_rows, tile_size, max_tiles)
    rows = rng.normal(size=(tile_size * max_tiles, 4)).astype("float32")
    # Padding rows of the layout hold zeros, as dispatch leaves them.
    for expert, start in enumerate(np.cumsum(layout.group_sizes) - layout.group_sizes):
        rows[start + expert_rows[expert] : start + layout.group_sizes[expert]] = 0.0
    rows[int(layout.num_tiles) * tile_size :] = 0.0
    kernel_shape = (4, 8, 4) if transpose else (4, 4, 8)
    kernels = rng.normal(size=kernel_shape).astype("float32")
    cotangent = rng.normal(size=(rows.shape[0], 8))

    probe = GroupedProbe(kernels, layout, kernel, transpose)
    _, rows_grad, kernel_grads = value_and_grads(
        probe,
        rows,
        lambda outputs, losses: ops.sum(outputs * ops.convert_to_tensor(cotangent, outputs.dtype)),
    )
    outputs = ops.convert_to_numpy(probe(rows))
    expected = _numpy_grouped(rows, kernels, layout, transpose)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    # The gradients of the tile loop, written out in NumPy: each used row
    # sends its cotangent back through its expert's kernel, and each expert's
    # kernel gathers its rows' outer products.
    used = int(layout.num_tiles) * tile_size
    row_experts = np.repeat(layout.tile_experts, tile_size)
    forward_kernels = np.swapaxes(kernels, -1, -2) if transpose else kernels
    expected_rows_grad = np.zeros_like(rows, dtype="float64")
    expected_kernel_grad = np.zeros(forward_kernels.shape)
    for row in range(used):
        expert = row_experts[row]
        expected_rows_grad[row] = forward_kernels[expert] @ cotangent[row]
        expected_kernel_grad[expert] += np.outer(rows[row], cotangent[row])
    if transpose:
        expected_kernel_grad = np.swapaxes(expected_kernel_grad, -1, -2)
    np.testing.assert_allclose(rows_grad, expected_rows_grad, rtol=1e-4, atol=1e-4)
    (kernel_grad,) = kernel_grads.values()
    np.testing.assert_allclose(kernel_grad, expected_kernel_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("capacity", [None, 3])
def test_grouped_plan_lays_each_expert_out_in_whole_tiles(capacity):
    rng = np.random.default_rng(1)
    num_tokens, top_k, num_experts, tile_size = 11, 2, 5, 4
    expert_ids = np.stack(
        [rng.choice(num_experts, top_k, replace=False) for _ in range(num_tokens)]
    )[None]
    token_mask = np.ones((1, num_tokens), bool)
    token_mask[0, 3] = False
    plan = compute_dispatch_plan(
        expert_ids, num_experts, capacity, token_mask, tile_size=tile_size
    )
    buffers = compute_dispatch_plan(expert_ids, num_experts, capacity, token_mask)
    tiles = plan.tiles
    tile_experts = ops.convert_to_numpy(tiles.tile_experts)[0]
    num_tiles = int(ops.convert_to_numpy(tiles.num_tiles)[0])
    row_tokens = ops.convert_to_numpy(plan.slot_tokens)[0]
    row_filled = ops.convert_to_numpy(plan.slot_filled)[0]
    choice_rows = ops.convert_to_numpy(plan.choice_slots)[0]
    kept = ops.convert_to_numpy(plan.choice_kept)[0]

    # The same choices are kept as in per-expert buffers.
    np.testing.assert_array_equal(kept, ops.convert_to_numpy(buffers.choice_kept)[0])
    max_kept = num_tokens * top_k if capacity is None else num_experts * capacity
    assert row_tokens.shape == (grouped_rows_bound(max_kept, num_experts, tile_size)[1],)
    # Expert by expert, in order: its kept choices in priority order, then
    # padding up to a whole tile.
    row = 0
    for expert in range(num_experts):
        choices = [
            (rank, token)
            for rank in range(top_k)
            for token in range(num_tokens)
            if token_mask[0, token] and expert_ids[0, token, rank] == expert
        ]
        choices = choices if capacity is None else choices[:capacity]
        for rank, token in choices:
            assert row_tokens[row] == token and row_filled[row]
            assert kept[rank, token] and choice_rows[rank, token] == row
            row += 1
        padded = -(-len(choices) // tile_size) * tile_size
        assert not row_filled[row : row + padded - len(choices)].any()
        np.testing.assert_array_equal(
            tile_experts[(row - len(choices)) // tile_size : (row - len(choices) + padded) // tile_size],
            expert,
        )
        row += padded - len(choices)
    assert num_tiles * tile_size == row
    assert not row_filled[row:].any()


@pytest.mark.parametrize("top_k,use_bias", [(1, False), (2, True), (3, False)])
def test_grouped_layer_matches_reference(top_k, use_bias):
    kernel = "tiles"
    rng = np.random.default_rng(top_k)
    layer, arrays = make_layer(
        rng, expert_kernel=kernel, top_k=top_k, capacity_factor=None, use_bias=use_bias,
        aux_loss_weight=0.01, z_loss_weight=0.001,
    )
    inputs = rng.normal(size=(3, 8, HIDDEN_DIM)).astype("float32")
    mask = np.ones((3, 8), bool)
    mask[1, 5:] = False
    outputs = ops.convert_to_numpy(layer(inputs, mask=mask, training=True))
    reference = reference_for(
        layer, arrays, inputs.reshape(-1, HIDDEN_DIM), None, mask.reshape(-1)
    )
    np.testing.assert_allclose(
        outputs.reshape(-1, HIDDEN_DIM), reference["outputs"], rtol=1e-4, atol=1e-5
    )
    aux_loss, z_loss = [float(ops.convert_to_numpy(loss)) for loss in layer.losses]
    np.testing.assert_allclose(aux_loss, 0.01 * reference["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(z_loss, 0.001 * reference["z_loss"], rtol=1e-5)
    assert np.all(outputs[~mask] == 0.0)


def test_backend_kernel_matches_the_tile_loop_in_a_layer():
    """`ragged_dot` (JAX) and `grouped_mm` (PyTorch) against `"tiles"`;
    TensorFlow, which has no grouped kernel, checks "tiles" against buffers."""
    rng = np.random.default_rng(4)
    inputs = rng.normal(size=(2, 40, 8)).astype("float32")
    kernels = [BACKEND_KERNEL or "buffers", "tiles"]
    layers = [
        SparseMoE(4, 16, capacity_factor=None, use_bias=True, expert_kernel=kernel)
        for kernel in kernels
    ]
    for layer in layers:
        layer.build(inputs.shape)
    layers[1].set_weights(layers[0].get_weights())
    cotangent = rng.normal(size=inputs.shape)

    def objective(outputs, losses):
        return ops.sum(outputs * ops.convert_to_tensor(cotangent, outputs.dtype))

    results = [value_and_grads(layer, inputs, objective, training=True) for layer in layers]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
    for first, second in zip(results[0][2].values(), results[1][2].values()):
        np.testing.assert_allclose(first, second, rtol=1e-4, atol=1e-5)


def test_every_token_on_one_expert_is_computed_in_full():
    rng = np.random.default_rng(5)
    layer, arrays = make_layer(
        rng, expert_kernel="tiles", top_k=2, capacity_factor=None
    )
    router = np.zeros((HIDDEN_DIM, NUM_EXPERTS))
    router[:, 0], router[:, 1] = 3.0, 1.0  # experts 2 and 3 get nothing
    layer.router.kernel.assign(router.astype("float32"))
    arrays["router_kernel"] = router
    inputs = np.abs(rng.normal(size=(70, HIDDEN_DIM))).astype("float32") + 0.1
    reference = reference_for(layer, arrays, inputs, None)
    assert (reference["expert_ids"][:, 0] == 0).all()
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(inputs)), reference["outputs"], rtol=1e-4, atol=1e-5
    )


def _count_grouped_calls(layer, monkeypatch):
    calls = []
    original = type(layer.experts).grouped_call

    def counting(self, rows, layout, kernel="tiles", training=None):
        calls.append(kernel)
        return original(self, rows, layout, kernel, training)

    monkeypatch.setattr(type(layer.experts), "grouped_call", counting)
    return calls


@pytest.mark.parametrize(
    "capacity_factor,num_tokens,grouped",
    [(None, 128, True), (None, 8, False), (1.25, 128, False)],
    ids=["dropless", "decoding", "capacity"],
)
def test_auto_runs_the_grouped_path_for_dropless_calls(
    monkeypatch, capacity_factor, num_tokens, grouped
):
    rng = np.random.default_rng(2)
    layer, arrays = make_layer(rng, capacity_factor=capacity_factor)
    calls = _count_grouped_calls(layer, monkeypatch)
    inputs = rng.normal(size=(num_tokens, HIDDEN_DIM)).astype("float32")
    outputs = ops.convert_to_numpy(layer(inputs, training=True))
    assert bool(calls) == grouped
    reference = reference_for(layer, arrays, inputs, capacity_factor)
    np.testing.assert_allclose(outputs, reference["outputs"], rtol=1e-4, atol=1e-5)


def test_compiled_training_matches_eager_on_the_grouped_path():
    """`fit` (XLA on TensorFlow, `jax.jit`) gives the losses of the buffers."""
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(4, 32, 8)).astype("float32")
    targets = rng.normal(size=(4, 32, 8)).astype("float32")
    results = {}
    for expert_kernel in ("buffers", "auto"):
        keras.utils.set_random_seed(1)
        layer_input = keras.Input((32, 8))
        moe = SharedExpertMoE(8, 16, capacity_factor=None, expert_kernel=expert_kernel)
        model = keras.Model(layer_input, moe(layer_input))
        model.compile("sgd", "mse", jit_compile=keras.backend.backend() != "torch")
        history = model.fit(inputs, targets, epochs=3, batch_size=4, verbose=0)
        results[expert_kernel] = (history.history["loss"], model.predict(inputs, verbose=0))
    np.testing.assert_allclose(results["auto"][0], results["buffers"][0], rtol=1e-5)
    np.testing.assert_allclose(results["auto"][1], results["buffers"][1], rtol=1e-4, atol=1e-5)


def test_expert_kernel_is_saved_in_the_config():
    layer = SparseMoE(4, 8, capacity_factor=None, expert_kernel="tiles")
    restored = SparseMoE.from_config(layer.get_config())
    assert restored.expert_kernel == "tiles"


def test_bad_expert_kernels_are_named():
    with pytest.raises(ValueError, match="expert_kernel.*'fast'"):
        SparseMoE(4, 8, expert_kernel="fast")
    other = "grouped_mm" if keras.backend.backend() != "torch" else "ragged_dot"
    with pytest.raises(ValueError, match=f"expert_kernel='{other}' runs on the"):
        SparseMoE(4, 8, expert_kernel=other)
    with pytest.raises(ValueError, match="applies to token-choice"):
        SparseMoE(4, 8, routing="expert_choice", expert_kernel="tiles")
