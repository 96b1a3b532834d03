"""Expert dropout: dropout on each expert's hidden activation, in training only.

The experts here are built so that every output unit is the sum of two
hidden units (`down` adds units `2j` and `2j + 1` into output `j`). Dropout
of the hidden activation at rate 1/2 then leaves each output at one of four
values, `0`, `2 h_2j`, `2 h_2j+1` or `2 (h_2j + h_2j+1)`, with `h` computed
here in NumPy. Dropout of the outputs (or of whole experts) would give only
`0` or the full sum, so the four values seen in about equal numbers show
that the units are dropped inside the experts, one by one.
"""

import keras
import numpy as np
import pytest

from keras_moe.layers import Experts
from keras_moe.layers import FeedForward
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.models import SwitchEncoderDecoderBackbone
from testing import to_numpy

HIDDEN_DIM = 4
INTERMEDIATE_DIM = 2 * HIDDEN_DIM
NUM_EXPERTS = 3
RATE = 0.5

BACKEND_KERNEL = {"jax": "ragged_dot", "torch": "grouped_mm"}.get(
    keras.backend.backend()
)
GROUPED_KERNELS = ["tiles"] + ([BACKEND_KERNEL] if BACKEND_KERNEL else [])


def pairwise_sum_kernels(rng):
    """`up [E, d, f]` (positive) and `down [E, f, d]` summing unit pairs."""
    up = rng.uniform(0.1, 1.0, size=(NUM_EXPERTS, HIDDEN_DIM, INTERMEDIATE_DIM))
    down = np.zeros((NUM_EXPERTS, INTERMEDIATE_DIM, HIDDEN_DIM))
    for unit in range(INTERMEDIATE_DIM):
        down[:, unit, unit // 2] = 1.0
    return up.astype("float32"), down.astype("float32")


def set_pairwise_kernels(experts, rng):
    up, down = pairwise_sum_kernels(rng)
    experts.up_kernel.assign(up)
    experts.down_kernel.assign(down)
    return up


def positive_tokens(rng, *shape):
    return rng.uniform(0.5, 1.5, size=shape + (HIDDEN_DIM,)).astype("float32")


def outcome_counts(outputs, hidden, rate=RATE):
    """How often each output is 0, the first unit, the second, or both.

    Args:
        outputs: `[N, d]` expert outputs.
        hidden: `[N, f]` the hidden units without dropout (NumPy).

    Returns:
        `[4]` counts; raises if an output is none of the four values.
    """
    pairs = hidden.reshape(len(hidden), HIDDEN_DIM, 2) / (1 - rate)
    candidates = np.stack(
        [np.zeros_like(pairs[..., 0]), pairs[..., 0], pairs[..., 1], pairs.sum(-1)],
        axis=-1,
    )  # [N, d, 4]
    distance = np.abs(candidates - outputs[..., None])
    closest = distance.argmin(-1)
    error = np.take_along_axis(distance, closest[..., None], -1)[..., 0]
    assert error.max() < 1e-4 * (1 + np.abs(outputs).max()), error.max()
    return np.bincount(closest.reshape(-1), minlength=4)


@pytest.fixture(autouse=True)
def seeded():
    # Dropout layers draw their seeds from Python's generator when built.
    keras.utils.set_random_seed(0)


def assert_units_dropped_one_by_one(counts):
    total = counts.sum()
    # Each outcome has probability 1/4: within 4 standard deviations of a
    # binomial count (outer dropout would leave two outcomes at 0).
    margin = 4 * np.sqrt(total * 0.25 * 0.75)
    assert np.all(np.abs(counts - total / 4) < margin), counts


def test_experts_drop_hidden_units_in_training_only():
    rng = np.random.default_rng(0)
    experts = Experts(
        NUM_EXPERTS, INTERMEDIATE_DIM, activation="relu", gated=False, dropout=RATE
    )
    experts.build((NUM_EXPERTS, None, HIDDEN_DIM))
    up = set_pairwise_kernels(experts, rng)
    buffers = positive_tokens(rng, NUM_EXPERTS, 200)
    hidden = np.einsum("ecd,edf->ecf", buffers, up)  # positive: relu is identity

    expected = hidden.reshape(NUM_EXPERTS, 200, HIDDEN_DIM, 2).sum(-1)
    for training in (None, False):
        np.testing.assert_allclose(
            to_numpy(experts(buffers, training=training)), expected, rtol=1e-5
        )
    outputs = to_numpy(experts(buffers, training=True))
    counts = outcome_counts(
        outputs.reshape(-1, HIDDEN_DIM), hidden.reshape(-1, INTERMEDIATE_DIM)
    )
    assert_units_dropped_one_by_one(counts)


@pytest.mark.parametrize("kernel", GROUPED_KERNELS)
def test_grouped_rows_drop_hidden_units(kernel):
    from keras_moe.ops.grouped_matmul import TileLayout

    rng = np.random.default_rng(1)
    experts = Experts(
        NUM_EXPERTS, INTERMEDIATE_DIM, activation="relu", gated=False, dropout=RATE
    )
    experts.build((NUM_EXPERTS, None, HIDDEN_DIM))
    up = set_pairwise_kernels(experts, rng)
    rows_per_expert = 96
    rows = positive_tokens(rng, NUM_EXPERTS * rows_per_expert)
    tile_size = 1 if kernel == "grouped_mm" else 32
    tiles_per_expert = rows_per_expert // tile_size
    layout = TileLayout(
        tile_size,
        np.repeat(np.arange(NUM_EXPERTS), tiles_per_expert).astype("int32"),
        np.int32(NUM_EXPERTS * tiles_per_expert),
        np.full(NUM_EXPERTS, rows_per_expert, "int32"),
    )
    row_experts = np.repeat(np.arange(NUM_EXPERTS), rows_per_expert)
    hidden = np.einsum("rd,rdf->rf", rows, up[row_experts])

    evaluated = to_numpy(experts.grouped_call(rows, layout, kernel, training=False))
    np.testing.assert_allclose(
        evaluated, hidden.reshape(-1, HIDDEN_DIM, 2).sum(-1), rtol=1e-5
    )
    outputs = to_numpy(experts.grouped_call(rows, layout, kernel, training=True))
    assert_units_dropped_one_by_one(outcome_counts(outputs, hidden))


# `SparseMoE` paths: capacity buffers, and dropless grouped rows (the
# default kernel of each backend on CPU, and the portable tiles).
SPARSE_PATHS = {
    "buffers": dict(
        capacity_factor=float(NUM_EXPERTS),
        eval_capacity_factor=float(NUM_EXPERTS),  # room for every token
        expert_kernel="buffers",
    ),
    "dropless_auto": dict(capacity_factor=None),
    "dropless_tiles": dict(capacity_factor=None, expert_kernel="tiles"),
}


@pytest.mark.parametrize("path", sorted(SPARSE_PATHS))
def test_sparse_moe_drops_units_inside_its_experts(path):
    rng = np.random.default_rng(2)
    # Top-1 with a renormalised weight of 1: each output is its expert's.
    layer = SparseMoE(
        NUM_EXPERTS, INTERMEDIATE_DIM, top_k=1, activation="relu", gated=False,
        expert_dropout=RATE, aux_loss_weight=0.0, **SPARSE_PATHS[path],
    )
    tokens = positive_tokens(rng, 2, 96)
    layer.build(tokens.shape)
    up = set_pairwise_kernels(layer.experts, rng)
    chosen = np.argmax(tokens.reshape(-1, HIDDEN_DIM) @ to_numpy(layer.router.kernel), -1)
    flat = tokens.reshape(-1, HIDDEN_DIM)
    hidden = np.einsum("td,tdf->tf", flat, up[chosen])

    evaluated = to_numpy(layer(tokens, training=False)).reshape(-1, HIDDEN_DIM)
    np.testing.assert_allclose(
        evaluated, hidden.reshape(-1, HIDDEN_DIM, 2).sum(-1), rtol=1e-5
    )
    outputs = to_numpy(layer(tokens, training=True)).reshape(-1, HIDDEN_DIM)
    assert_units_dropped_one_by_one(outcome_counts(outputs, hidden))


def test_expert_dropout_is_unbiased():
    # Inverted dropout: over many copies of one token, the mean training
    # output is the evaluation output.
    rng = np.random.default_rng(3)
    experts = Experts(2, 64, dropout=0.3)
    token = rng.normal(size=(1, 1, HIDDEN_DIM)).astype("float32")
    buffers = np.broadcast_to(token, (2, 20000, HIDDEN_DIM))
    evaluated = to_numpy(experts(buffers[:, :1]))
    mean = to_numpy(experts(buffers, training=True)).mean(axis=1)
    scale = np.abs(evaluated).max()
    np.testing.assert_allclose(mean, evaluated[:, 0], atol=0.03 * scale)


def test_soft_and_shared_expert_layers_use_expert_dropout():
    rng = np.random.default_rng(4)
    tokens = rng.normal(size=(2, 12, HIDDEN_DIM)).astype("float32")
    for layer_class, arguments in [
        (SoftMoE, dict(slots_per_expert=2)),
        (SharedExpertMoE, dict(top_k=1, capacity_factor=None, num_shared_experts=1)),
    ]:
        with_dropout = layer_class(4, 16, expert_dropout=0.5, **arguments)
        without = layer_class.from_config({**with_dropout.get_config(), "expert_dropout": 0.0})
        with_dropout.build(tokens.shape)
        without.build(tokens.shape)
        without.set_weights(with_dropout.get_weights())
        # Nothing else is random in these layers: outputs differ in
        # training only, and only with the dropout.
        np.testing.assert_allclose(
            to_numpy(with_dropout(tokens)), to_numpy(without(tokens)), rtol=1e-6
        )
        np.testing.assert_allclose(
            to_numpy(without(tokens, training=True)), to_numpy(without(tokens)), rtol=1e-6
        )
        difference = to_numpy(with_dropout(tokens, training=True)) - to_numpy(without(tokens))
        assert np.abs(difference).max() > 1e-3, layer_class.__name__
    shared = SharedExpertMoE(4, 16, expert_dropout=0.25)
    assert shared.shared_experts.dropout == 0.25 == shared.experts.dropout


def test_int8_and_int4_experts_drop_units():
    rng = np.random.default_rng(5)
    buffers = positive_tokens(rng, NUM_EXPERTS, 400)
    for mode in ("int8", "int4"):
        experts = Experts(
            NUM_EXPERTS, INTERMEDIATE_DIM, activation="relu", gated=False, dropout=RATE
        )
        experts.build((NUM_EXPERTS, None, HIDDEN_DIM))
        set_pairwise_kernels(experts, rng)
        experts.quantize(mode)
        # An output is exactly zero when both of its hidden units are
        # dropped (probability 1/4), and never without dropout.
        assert np.count_nonzero(to_numpy(experts(buffers)) == 0) == 0
        zeros = np.mean(to_numpy(experts(buffers, training=True)) == 0)
        assert 0.2 < zeros < 0.3, (mode, zeros)


def test_rate_zero_adds_no_layer_and_no_state():
    layer = SparseMoE(NUM_EXPERTS, 8)
    layer.build((None, HIDDEN_DIM))
    assert layer.experts.dropout_layer is None
    with_dropout = SparseMoE(NUM_EXPERTS, 8, expert_dropout=0.1)
    with_dropout.build((None, HIDDEN_DIM))
    # Same weights (nothing more saved or counted); one more variable, the
    # dropout's seed state.
    assert len(with_dropout.weights) == len(layer.weights)
    assert len(with_dropout.variables) == len(layer.variables) + 1


@pytest.mark.parametrize("rate", [1.0, -0.1, "0.2", None])
def test_bad_expert_dropout_is_named(rate):
    with pytest.raises(ValueError, match=r"`expert_dropout`.*expert_dropout="):
        SparseMoE(NUM_EXPERTS, 8, expert_dropout=rate)
    with pytest.raises(ValueError, match=r"`dropout`.*dropout="):
        FeedForward(8, dropout=rate)


def test_compiled_training_steps_draw_new_masks():
    # With a zero learning rate the weights stay put, so two training
    # steps differ only if the dropout mask moves on between compiled steps;
    # evaluation has no dropout at all.
    rng = np.random.default_rng(6)
    inputs = keras.Input((16, HIDDEN_DIM))
    outputs = SparseMoE(
        NUM_EXPERTS, 16, top_k=1, expert_dropout=0.5, capacity_factor=None,
        aux_loss_weight=0.0,
    )(inputs)
    model = keras.Model(inputs, outputs)
    # Compiled where the backend compiles by default (JAX, TensorFlow).
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(size=(4, 16, HIDDEN_DIM)).astype("float32")
    y = np.zeros_like(x)
    losses = [model.train_on_batch(x, y, return_dict=True)["loss"] for _ in range(3)]
    assert len(set(losses)) == 3, losses
    evaluated = [model.test_on_batch(x, y, return_dict=True)["loss"] for _ in range(2)]
    assert evaluated[0] == evaluated[1]


def test_keras_file_keeps_expert_dropout(tmp_path):
    inputs = keras.Input((6, HIDDEN_DIM))
    outputs = SparseMoE(NUM_EXPERTS, 8, expert_dropout=0.3)(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(7).normal(size=(2, 6, HIDDEN_DIM)).astype("float32")
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    layer = reloaded.layers[-1]
    assert layer.expert_dropout == 0.3 and layer.experts.dropout == 0.3
    np.testing.assert_array_equal(to_numpy(reloaded(x)), to_numpy(model(x)))


def test_switch_backbone_expert_dropout_defaults_to_dropout():
    def backbone(**arguments):
        return SwitchEncoderDecoderBackbone(
            vocabulary_size=16, num_layers=2, hidden_dim=8, num_heads=2,
            intermediate_dim=16, num_experts=4, **arguments,
        )

    def rates(model):
        sparse = [b.feedforward.experts.dropout for b in model.encoder_layers if b.is_sparse]
        dense = [b.feedforward.dropout for b in model.encoder_layers if not b.is_sparse]
        return sparse, dense

    assert rates(backbone(dropout=0.1)) == ([0.1], [0.1])
    fine_tuning = backbone(dropout=0.1, expert_dropout=0.4)  # the paper's fine-tuning
    assert rates(fine_tuning) == ([0.4], [0.1])
    config = fine_tuning.get_config()
    assert config["expert_dropout"] == 0.4
    assert rates(SwitchEncoderDecoderBackbone.from_config(config)) == ([0.4], [0.1])
    with pytest.raises(ValueError, match="expert_dropout=1.5"):
        backbone(expert_dropout=1.5)
