"""SparseMoE trains with model.fit, compiled where the backend compiles."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import SparseMoE

BACKEND = keras.backend.backend()


def teacher_task(num_samples, seed=0):
    """Tokens whose target depends on which of 4 clusters they come from."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(4, 8))
    maps = rng.normal(size=(4, 8, 8)) / np.sqrt(8)
    cluster = rng.integers(0, 4, size=(num_samples, 6))
    x = centers[cluster] + rng.normal(size=(num_samples, 6, 8))
    y = np.tanh(np.einsum("nti,ntij->ntj", x, maps[cluster]))
    return x.astype("float32"), y.astype("float32")


def moe_model(**moe_kwargs):
    inputs = keras.Input((6, 8))
    hidden = keras.layers.Dense(16)(inputs)
    hidden = hidden + SparseMoE(4, 32, top_k=2, **moe_kwargs)(hidden)
    outputs = keras.layers.Dense(8)(hidden)
    return keras.Model(inputs, outputs)


def fit_and_evaluate(model, x, y, epochs, **compile_kwargs):
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", **compile_kwargs)
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    return before, after, history


def test_fit_decreases_loss():
    keras.utils.set_random_seed(0)
    x, y = teacher_task(256)
    before, after, history = fit_and_evaluate(moe_model(), x, y, epochs=15)
    assert after < 0.5 * before
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert all(np.isfinite(losses))


def test_aux_loss_is_part_of_the_training_loss():
    keras.utils.set_random_seed(1)
    x, y = teacher_task(64)
    # Dropless, so that training and evaluation route identically.
    model = moe_model(aux_loss_weight=10.0, capacity_factor=None)
    model.compile(optimizer="sgd", loss="mse")
    mse = model.evaluate(x, y, verbose=0, batch_size=64)
    model(x, training=True)
    aux = sum(float(ops.convert_to_numpy(loss)) for loss in model.losses)
    assert aux >= 10.0 * 0.99  # E * sum f_i P_i >= 1 up to rounding
    # The first training step reports the task loss plus the aux loss.
    history = model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(mse + aux, rel=1e-4)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA compilation of a TF step")
def test_tensorflow_jit_compile_training():
    keras.utils.set_random_seed(2)
    # 200 samples in batches of 32: the last, partial batch makes Keras
    # retrace with a different batch size under XLA.
    x, y = teacher_task(200)
    model = moe_model()
    before, after, _ = fit_and_evaluate(model, x, y, epochs=8, jit_compile=True)
    assert model.jit_compile
    assert after < 0.7 * before


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF graph with unknown shapes")
def test_tensorflow_graph_with_unknown_batch_size():
    import tensorflow as tf

    layer = SparseMoE(4, 16, capacity_factor=1.0)
    data = np.random.default_rng(3).normal(size=(5, 7, 8)).astype("float32")
    eager = ops.convert_to_numpy(layer(data, training=True))

    @tf.function(input_signature=[tf.TensorSpec((None, None, 8), tf.float32)])
    def traced(x):
        return layer(x, training=True)

    np.testing.assert_allclose(traced(data).numpy(), eager, rtol=1e-5, atol=1e-6)
