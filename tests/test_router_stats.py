"""Router statistics: against NumPy from the same routing, in fit logs, in callbacks.

The references recompute every statistic with loops from the routing
decisions of `routing_reference` / `moe_reference` (the published
algorithms), padding and capacity drops included.
"""

import io
import math
import warnings
from contextlib import redirect_stdout

import keras
import numpy as np
import pytest
from keras import ops

from script_backends import runs_on
from keras_moe.callbacks import RouterStats
from keras_moe.callbacks import collect_router_stats
from keras_moe.callbacks import render_load_heatmap
from keras_moe.callbacks import router_stats
from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.ops.router_stats import COMPACT_STATS
from keras_moe.ops.router_stats import max_violation
from testing import moe_reference
from testing import reload_keras_file
from testing import routing_reference

BACKEND = keras.backend.backend()
HIDDEN_DIM = 6
COMPACT_NAMES = sorted(COMPACT_STATS)


def randomize(layer, rng, scale=0.7):
    """Random weights; returns them as float64 keyed by inner path."""
    arrays = {}
    for variable in layer.trainable_weights:
        value = rng.normal(scale=scale, size=variable.shape).astype("float32")
        variable.assign(value)
        arrays[variable.path.split("/", 1)[1]] = value.astype("float64")
    return arrays


def padding_mask(num_tokens, rng):
    mask = rng.random(num_tokens) > 0.3
    mask[0] = True
    return mask


# NumPy references -----------------------------------------------------------


def reference_routed_stats(expert_ids, kept, probs, logits, token_mask):
    """Every routed statistic, one token and one choice at a time."""
    num_experts = probs.shape[1]
    real = [t for t in range(len(token_mask)) if token_mask[t]]
    counts = np.zeros(num_experts)
    routed = kept_choices = 0
    for t in real:
        for rank, expert in enumerate(expert_ids[t]):
            counts[expert] += 1
            routed += 1
            kept_choices += bool(kept[t, rank])
    load = counts / counts.sum()
    importance = np.mean([probs[t] for t in real], axis=0)
    entropies, log_z = [], []
    for t in real:
        entropy = -sum(p * math.log(p) for p in probs[t] if p > 0)
        entropies.append(entropy / math.log(num_experts))
        top = logits[t].max()
        log_z.append(top + math.log(np.exp(logits[t] - top).sum()))
    return {
        "aux_loss": num_experts * float(np.sum(load * importance)),
        "z_loss": float(np.mean(np.square(log_z))),
        "maxvio": routing_reference.max_violation(counts),
        "load_cv": float(np.std(counts) / np.mean(counts)),
        "router_entropy": float(np.mean(entropies)),
        "dropped_fraction": (routed - kept_choices) / routed,
        "expert_load": load,
        "expert_importance": importance,
    }


def assert_stats_close(actual, expected):
    assert set(expected) <= set(actual)
    for name, value in expected.items():
        np.testing.assert_allclose(
            actual[name], value, rtol=1e-4, atol=1e-5, err_msg=name
        )


def one_step_stats(layer, tokens, mask):
    layer.router_stats.reset_state()
    layer(tokens.astype("float32"), mask=mask, training=True)
    stats = layer.router_stats.values()
    assert stats["steps"] == 1
    return stats


# Statistics against NumPy ----------------------------------------------------

TOKEN_CHOICE_CASES = {
    "softmax_top2_drops": (dict(top_k=2, capacity_factor=1.0), True),
    "softmax_top2_dropless": (dict(top_k=2, capacity_factor=None), True),
    "softmax_top1_tight": (dict(top_k=1, capacity_factor=0.5), False),
    "sigmoid_groups_bias": (
        dict(
            top_k=3,
            score_function="sigmoid",
            expert_groups=4,
            top_groups=2,
            bias_update_rate=0.01,
            capacity_factor=1.0,
        ),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CHOICE_CASES))
def test_token_choice_stats_match_numpy(case):
    options, masked = TOKEN_CHOICE_CASES[case]
    rng = np.random.default_rng(len(case))
    layer = SparseMoE(8, 5, **options)
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    num_tokens = 24
    tokens = rng.normal(size=(num_tokens, HIDDEN_DIM))
    mask = padding_mask(num_tokens, rng) if masked else np.ones(num_tokens, bool)
    router = layer.router
    ids, _, logits, probs = routing_reference.token_choice(
        tokens,
        arrays["router/kernel"],
        top_k=router.top_k,
        score_function=router.score_function,
        expert_groups=router.expert_groups,
        top_groups=router.top_groups,
    )
    capacity = moe_reference.capacity_for(
        num_tokens, 8, router.top_k, layer.capacity_factor
    )
    kept = moe_reference.assign_capacity(ids, 8, capacity, mask)

    stats = one_step_stats(layer, tokens, mask if masked else None)

    expected = reference_routed_stats(ids, kept, probs, logits, mask)
    assert_stats_close(stats, expected)
    if options.get("capacity_factor") is None:
        assert stats["dropped_fraction"] == 0.0
    if options.get("bias_update_rate"):
        # The bias after this step's update, as the router holds it.
        np.testing.assert_allclose(
            stats["expert_bias"], ops.convert_to_numpy(router.expert_bias)
        )
        assert np.any(stats["expert_bias"] != 0)


def test_drops_are_counted_when_capacity_is_tight():
    rng = np.random.default_rng(5)
    layer = SparseMoE(4, 5, top_k=1, capacity_factor=0.25)
    layer.build((None, HIDDEN_DIM))
    randomize(layer, rng)
    tokens = rng.normal(size=(16, HIDDEN_DIM))
    stats = one_step_stats(layer, tokens, None)
    # One slot per expert: at most 4 of the 16 choices are kept.
    assert stats["dropped_fraction"] >= 12 / 16


def test_hierarchical_stats_use_the_joint_distribution():
    rng = np.random.default_rng(7)
    layer = HierarchicalMoE(
        num_groups=3, experts_per_group=4, intermediate_dim=5,
        top_groups=2, top_k=1, capacity_factor=1.0,
    )
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    num_tokens = 18
    tokens = rng.normal(size=(num_tokens, HIDDEN_DIM))
    mask = padding_mask(num_tokens, rng)
    ids, _, logits, probs = routing_reference.hierarchical(
        tokens,
        arrays["router/group_kernel"],
        arrays["router/expert_kernel"],
        top_groups=2,
        top_k=1,
        normalize_top_k=False,
    )
    capacity = moe_reference.capacity_for(num_tokens, 12, 2, 1.0)
    kept = moe_reference.assign_capacity(ids, 12, capacity, mask)
    stats = one_step_stats(layer, tokens, mask)
    assert_stats_close(stats, reference_routed_stats(ids, kept, probs, logits, mask))


def test_shared_expert_layer_reports_its_routed_experts():
    rng = np.random.default_rng(8)
    layer = SharedExpertMoE(6, 5, num_shared_experts=2, top_k=2, capacity_factor=1.0)
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    tokens = rng.normal(size=(20, HIDDEN_DIM))
    mask = np.ones(20, bool)
    ids, _, logits, probs = routing_reference.token_choice(
        tokens, arrays["router/kernel"], top_k=2
    )
    kept = moe_reference.assign_capacity(
        ids, 6, moe_reference.capacity_for(20, 6, 2, 1.0), mask
    )
    stats = one_step_stats(layer, tokens, None)
    assert_stats_close(stats, reference_routed_stats(ids, kept, probs, logits, mask))


@pytest.mark.parametrize("masked", [False, True])
def test_expert_choice_stats_match_numpy(masked):
    rng = np.random.default_rng(11)
    layer = SparseMoE(4, 5, routing="expert_choice", capacity_factor=1.0)
    layer.build((None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    num_tokens = 16
    tokens = rng.normal(size=(num_tokens, HIDDEN_DIM))
    mask = padding_mask(num_tokens, rng) if masked else np.ones(num_tokens, bool)
    weights = {"router_kernel": arrays["router/kernel"]}
    weights.update(
        {k[len("experts/"):]: v for k, v in arrays.items() if k.startswith("experts/")}
    )
    _, chosen, logits = routing_reference.expert_choice(
        tokens, weights, capacity_factor=1.0, activation="silu", gated=True,
        token_mask=mask,
    )
    probs = np.array([routing_reference.softmax(row) for row in logits])
    counts = np.array([len(tokens_of_expert) for tokens_of_expert in chosen])
    real = np.flatnonzero(mask)
    taken = {t for tokens_of_expert in chosen for t in tokens_of_expert}
    entropies = [
        -np.sum(probs[t] * np.log(probs[t])) / math.log(4) for t in real
    ]
    log_z = [np.log(np.sum(np.exp(logits[t]))) for t in real]
    load = counts / counts.sum()
    importance = probs[real].mean(axis=0)
    expected = {
        "expert_load": load,
        "expert_importance": importance,
        "aux_loss": 4 * np.sum(load * importance),
        "z_loss": np.mean(np.square(log_z)),
        "maxvio": routing_reference.max_violation(counts),
        "load_cv": np.std(counts) / np.mean(counts),
        "router_entropy": np.mean(entropies),
        "dropped_fraction": len(set(real) - taken) / len(real),
    }
    stats = one_step_stats(layer, tokens, mask if masked else None)
    assert_stats_close(stats, expected)


def test_maxvio_is_zero_for_perfectly_balanced_expert_choice():
    rng = np.random.default_rng(12)
    layer = SparseMoE(8, 5, routing="expert_choice", capacity_factor=1.5)
    x = rng.normal(size=(4, 16, HIDDEN_DIM)).astype("float32")
    layer(x, training=True)
    stats = layer.router_stats.values()
    assert stats["maxvio"] == 0.0
    assert stats["load_cv"] == 0.0
    np.testing.assert_array_equal(stats["expert_load"], np.full(8, 1 / 8))
    assert stats["aux_loss"] == pytest.approx(1.0, abs=1e-6)


def test_max_violation_definition():
    assert float(max_violation([3.0, 3.0, 3.0])) == 0.0
    # DeepSeek's worst case: one expert takes everything.
    assert float(max_violation([8.0, 0.0, 0.0, 0.0])) == pytest.approx(3.0)
    assert float(max_violation([6.0, 2.0, 2.0, 2.0])) == pytest.approx(
        routing_reference.max_violation([6, 2, 2, 2])
    )


def soft_reference_stats(tokens, slot_kernel, scale, mask, num_experts):
    """SoftMoE's weights (cosine logits, two softmaxes) and their statistics."""
    def normalized(v):
        return v / math.sqrt(float(np.sum(v * v)) + 1e-6)

    batch, num_tokens, _ = tokens.shape
    num_slots = slot_kernel.shape[1]
    slots = [normalized(slot_kernel[:, n]) for n in range(num_slots)]
    dispatch_entropy, dispatch_max, combine_entropy, combine_max = [], [], [], []
    share = np.zeros(num_experts)
    num_real = 0
    for b in range(batch):
        real = [t for t in range(num_tokens) if mask[b, t]]
        logits = np.array(
            [[scale * normalized(tokens[b, t]) @ slots[n] for n in range(num_slots)]
             for t in real]
        )
        for n in range(num_slots):
            weights = routing_reference.softmax(logits[:, n])
            dispatch_max.append(weights.max())
            if len(real) >= 2:
                dispatch_entropy.append(
                    -np.sum(weights * np.log(weights)) / math.log(len(real))
                )
        for row in logits:
            weights = routing_reference.softmax(row)
            combine_entropy.append(
                -np.sum(weights * np.log(weights)) / math.log(num_slots)
            )
            combine_max.append(weights.max())
            share += weights.reshape(num_experts, -1).sum(axis=1)
            num_real += 1
    return {
        "dispatch_entropy": np.mean(dispatch_entropy),
        "combine_entropy": np.mean(combine_entropy),
        "dispatch_max_weight": np.mean(dispatch_max),
        "combine_max_weight": np.mean(combine_max),
        "expert_share": share / num_real,
    }


@pytest.mark.parametrize("masked", [False, True])
def test_soft_moe_stats_match_numpy(masked):
    rng = np.random.default_rng(13)
    layer = SoftMoE(3, 5, slots_per_expert=2)
    layer.build((None, None, HIDDEN_DIM))
    arrays = randomize(layer, rng)
    layer.scale.assign(1.7)
    tokens = rng.normal(size=(3, 7, HIDDEN_DIM))
    mask = np.ones((3, 7), bool)
    if masked:
        mask[0, 4:] = False
        mask[2, 1:] = False  # one real token: no spread to measure
    stats = one_step_stats(layer, tokens, mask if masked else None)
    expected = soft_reference_stats(tokens, arrays["slot_kernel"], 1.7, mask, 3)
    assert_stats_close(stats, expected)
    assert stats["scale"] == pytest.approx(1.7)


# Recording rules --------------------------------------------------------------


def test_statistics_are_means_over_training_steps_only():
    rng = np.random.default_rng(14)
    layer = SparseMoE(4, 8, top_k=1, capacity_factor=1.0)
    batches = [rng.normal(size=(12, HIDDEN_DIM)).astype("float32") for _ in range(3)]
    per_step = []
    for batch in batches[:2]:
        layer.router_stats.reset_state()
        layer(batch, training=True)
        per_step.append(layer.router_stats.values())
    layer.router_stats.reset_state()
    for batch in batches[:2]:
        layer(batch, training=True)
    layer(batches[2])  # inference: not recorded
    layer(batches[2], training=False)
    stats = layer.router_stats.values()
    assert stats["steps"] == 2
    for name in ("maxvio", "aux_loss", "dropped_fraction", "router_entropy"):
        expected = (per_step[0][name] + per_step[1][name]) / 2
        assert stats[name] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(
        stats["expert_load"],
        (per_step[0]["expert_load"] + per_step[1]["expert_load"]) / 2,
        rtol=1e-5,
    )
    # A reset keeps the finished period until the next step is recorded.
    layer.router_stats.reset_state()
    layer.router_stats.reset_state()
    assert layer.router_stats.values()["steps"] == 2
    layer(batches[0], training=True)
    assert layer.router_stats.values()["steps"] == 1


def test_statistics_are_state_not_weights():
    def build(track):
        keras.utils.set_random_seed(3)
        layer = SoftMoE(4, 8) if track == "soft" else SparseMoE(
            4, 8, bias_update_rate=0.01, track_router_stats=bool(track)
        )
        layer.build((None, 5, HIDDEN_DIM))
        return layer

    tracked, untracked = build(True), build(False)
    assert untracked.router_stats is None
    def inner_paths(variables):
        return [v.path.split("/", 1)[1] for v in variables]

    assert inner_paths(tracked.weights) == inner_paths(untracked.weights)
    assert tracked.count_params() == untracked.count_params()
    assert len(tracked.get_weights()) == len(untracked.get_weights())
    extra = set(inner_paths(tracked.non_trainable_variables)) - set(
        inner_paths(untracked.non_trainable_variables)
    )
    assert extra == {"router_stats", "router_stats_last"}
    assert tracked.router_stats in tracked.metrics
    soft = build("soft")
    assert {v.name for v in soft.weights} == {
        "slot_kernel", "scale", "gate_kernel", "up_kernel", "down_kernel"
    }


def test_untracked_layer_gives_the_same_outputs():
    rng = np.random.default_rng(15)
    x = rng.normal(size=(2, 6, HIDDEN_DIM)).astype("float32")
    outputs = []
    for track in (True, False):
        keras.utils.set_random_seed(4)
        layer = SparseMoE(4, 8, capacity_factor=1.0, track_router_stats=track)
        outputs.append(ops.convert_to_numpy(layer(x, training=True)))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_track_router_stats_must_be_a_bool():
    with pytest.raises(ValueError, match="track_router_stats"):
        SparseMoE(4, 8, track_router_stats="yes")
    with pytest.raises(ValueError, match="track_router_stats"):
        SoftMoE(4, 8, track_router_stats=1)


# In model.fit -------------------------------------------------------------------


def moe_model(mask_zero=False):
    """Embedding (padding id 0) -> token choice, shared-expert, soft, expert choice."""
    inputs = keras.Input((8,), dtype="int32")
    hidden = keras.layers.Embedding(32, 16, mask_zero=mask_zero)(inputs)
    hidden = hidden + SparseMoE(4, 16, top_k=2, capacity_factor=1.0, name="moe_a")(hidden)
    hidden = hidden + SharedExpertMoE(
        4, 8, top_k=1, score_function="sigmoid", bias_update_rate=0.01,
        aux_loss_weight=0.0, capacity_factor=1.0, name="moe_b",
    )(hidden)
    hidden = hidden + SoftMoE(4, 8, name="soft")(hidden)
    hidden = hidden + SparseMoE(4, 8, routing="expert_choice", name="moe_c")(hidden)
    outputs = keras.layers.Dense(4)(hidden)
    return keras.Model(inputs, outputs)


def token_data(num_samples=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 32, size=(num_samples, 8)).astype("int32")
    x[:, 6:] = 0  # padding at the end of every sequence
    y = rng.normal(size=(num_samples, 8, 4)).astype("float32")
    return x, y


class RecordStats(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.batches = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(collect_router_stats(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(collect_router_stats(self.model))


def compiled_model(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = moe_model(mask_zero=True)
    model.compile(optimizer="adam", loss="mse", **compile_kwargs)
    return model


def test_fit_logs_the_compact_set_as_means_over_layers():
    model = compiled_model()
    x, y = token_data()
    recorder = RecordStats()
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        history = model.fit(
            x, y, batch_size=16, epochs=2, verbose=1,
            validation_data=(x, y), callbacks=[recorder],
        )
    for name in COMPACT_NAMES:
        assert name in stdout.getvalue()
        assert len(history.history[name]) == 2
        assert "val_" + name not in history.history  # evaluation records nothing
    for epoch, stats in enumerate(recorder.epochs):
        routed = [stats[name] for name in ("moe_a", "moe_b", "moe_c")]
        assert all(layer_stats["steps"] == 3 for layer_stats in routed)
        for log_name, stat in COMPACT_STATS.items():
            expected = np.mean([layer_stats[stat] for layer_stats in routed])
            assert history.history[log_name][epoch] == pytest.approx(
                expected, rel=1e-5, abs=1e-6
            )
    # Mid-epoch reads see the steps so far, on every backend.
    assert [b["moe_a"]["steps"] for b in recorder.batches] == [1, 2, 3] * 2
    assert set(recorder.epochs[0]["soft"]) >= {"dispatch_entropy", "scale"}
    assert recorder.epochs[0]["moe_c"]["maxvio"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_returns_what_it_did_before():
    model = compiled_model()
    x, y = token_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    loss = model.evaluate(x, y, batch_size=16, verbose=0)
    assert np.ndim(loss) == 0
    assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss"}


def test_padding_from_a_keras_mask_does_not_count():
    # Dropless, so that capacity (which depends on the number of slots the
    # padding occupies in the batch) plays no part: the statistics of a
    # padded batch are those of its real tokens alone.
    keras.utils.set_random_seed(6)
    embedding = keras.layers.Embedding(32, HIDDEN_DIM, mask_zero=True)
    moe = SparseMoE(4, 8, top_k=2, capacity_factor=None)
    inputs = keras.Input((8,), dtype="int32")
    model = keras.Model(inputs, moe(embedding(inputs)))
    x, _ = token_data(6)
    model(x, training=True)
    padded = moe.router_stats.values()
    real_tokens = ops.convert_to_numpy(embedding(x))[x != 0]
    moe.router_stats.reset_state()
    moe(real_tokens, training=True)
    alone = moe.router_stats.values()
    assert padded["steps"] == alone["steps"] == 1
    assert_stats_close(padded, {k: v for k, v in alone.items() if k != "steps"})


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA compilation of a TF step")
def test_tensorflow_jit_compile_fit_records_statistics():
    model = compiled_model(jit_compile=True)
    x, y = token_data()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    stats = collect_router_stats(model)
    assert stats["moe_a"]["steps"] == 3
    assert history.history["moe_maxvio"][0] == pytest.approx(
        np.mean([stats[n]["maxvio"] for n in ("moe_a", "moe_b", "moe_c")]), rel=1e-5
    )


def test_keras_file_round_trip_keeps_outputs_and_tracking(tmp_path):
    model = compiled_model()
    x, y = token_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    restored = reload_keras_file(model, tmp_path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(restored(x)), ops.convert_to_numpy(model(x)),
        rtol=1e-6, atol=1e-6,
    )
    assert restored.get_layer("moe_a").track_router_stats is True
    assert restored.count_params() == model.count_params()
    # The statistics start afresh and record again.
    assert collect_router_stats(restored)["moe_a"]["steps"] == 0
    restored.compile(optimizer="adam", loss="mse")
    history = restored.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert set(COMPACT_NAMES) <= set(history.history)


def test_model_without_statistics_logs_no_compact_set():
    inputs = keras.Input((8, HIDDEN_DIM))
    outputs = SparseMoE(4, 8, track_router_stats=False)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((4, 8, HIDDEN_DIM), "float32")
    history = model.fit(x, x, verbose=0)
    assert set(history.history) == {"loss"}
    assert collect_router_stats(model) == {}


# Helpers and callback arguments ------------------------------------------------


def test_router_stats_table_measures_inference_and_restores_training_stats():
    model = compiled_model()
    x, y = token_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = collect_router_stats(model)
    rows = router_stats(model, x, batch_size=8)
    assert [row["layer"] for row in rows] == ["moe_a", "moe_b", "soft", "moe_c"]
    assert all(row["steps"] == 6 for row in rows)
    assert rows[0]["kind"] == "routed" and rows[2]["kind"] == "soft"
    assert rows[3]["maxvio"] == pytest.approx(0.0, abs=1e-6)
    after = collect_router_stats(model)
    for name in before:
        assert after[name]["steps"] == before[name]["steps"]
        assert after[name].get("maxvio") == before[name].get("maxvio")
    # Inference is not recorded once the table is made.
    model.predict(x, verbose=0)
    assert collect_router_stats(model)["moe_a"]["steps"] == before["moe_a"]["steps"]
    image = render_load_heatmap([row.get("expert_load", row.get("expert_share")) for row in rows])
    assert image.dtype == np.uint8 and image.ndim == 3


def read_router_events(run_dir, layer):
    """`{step: {statistic: value}}` as written to the TensorBoard event files."""
    import glob
    import os

    import tensorflow as tf

    written = {}
    prefix = f"router/{layer}/"
    for path in glob.glob(os.path.join(run_dir, "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith(prefix):
                    array = tf.make_ndarray(value.tensor)
                    # Histograms: one [left, right, height] bucket per expert.
                    array = array if array.ndim == 0 else array[:, 2]
                    written.setdefault(event.step, {})[value.tag[len(prefix):]] = array
    return written


@pytest.mark.parametrize("update_freq", [2, 4])
def test_batch_writes_are_means_of_the_steps_since_the_last_write_in_the_epoch(
    tmp_path, update_freq
):
    # 3 steps per epoch, and an update_freq that does not divide it: writes
    # straddle epoch resets. The reference is each step's statistics measured
    # by a forward pass of its own (learning rate 0: every step sees the
    # same weights).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, SparseMoE(4, 16, top_k=2, name="moe")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.random.default_rng(0).normal(size=(12, 4, 8)).astype("float32")
    model.fit(
        x, x, batch_size=4, epochs=3, shuffle=False, verbose=0,
        callbacks=[RouterStats(str(tmp_path), update_freq=update_freq)],
    )
    per_step = []
    metric = model.get_layer("moe").router_stats
    for batch in range(3):
        metric.reset_state()
        model(x[4 * batch : 4 * (batch + 1)], training=True)
        per_step.append(metric.values())
    written = read_router_events(str(tmp_path / "router"), "moe")
    assert sorted(written) == list(range(update_freq, 10, update_freq))
    for step, values in written.items():
        # Global steps 1..9; the write at `step` covers the steps after the
        # previous write, from the start of the epoch at the earliest.
        first = max(step - update_freq + 1, (step - 1) // 3 * 3 + 1)
        batches = [(s - 1) % 3 for s in range(first, step + 1)]
        for name in ("aux_loss", "maxvio", "expert_load", "expert_importance"):
            expected = np.mean([per_step[b][name] for b in batches], axis=0)
            np.testing.assert_allclose(
                values[name], expected, rtol=1e-4, atol=1e-6,
                err_msg=f"{name} written at step {step}",
            )


@pytest.mark.parametrize("update_freq", ["weekly", 0, -3, 1.5, True, None])
def test_bad_update_freq_is_refused(tmp_path, update_freq):
    with pytest.raises(ValueError, match="update_freq.*'epoch', 'batch' or a positive integer"):
        RouterStats(str(tmp_path), update_freq=update_freq)


def test_unwritable_log_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="log_dir"):
        RouterStats(str(blocker / "logs"))
    with pytest.raises(ValueError, match="log_dir"):
        RouterStats("")


def test_model_without_moe_layers_warns_and_trains(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    callback = RouterStats(str(tmp_path))
    with pytest.warns(UserWarning, match="no MoE layer"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 2)), verbose=0, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collect_router_stats(model) == {}
    with pytest.raises(ValueError, match="`model` must be a Keras model"):
        collect_router_stats("model")


@runs_on("torch")
def test_overhead_benchmark_smoke_run():
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "router_stats_overhead.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--backends", BACKEND,
         "--rounds", "1", "--steps", "2"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "KERAS_BACKEND": BACKEND},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for measure in ("model.fit step", "compiled step"):
        assert f"{BACKEND:<11} {measure}" in result.stdout
    assert "paired ratio" in result.stdout
