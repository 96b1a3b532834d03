"""Data-parallel training with `tf.distribute.MirroredStrategy`, for a test.

TensorFlow fixes its logical devices when it starts, so this runs in a fresh
interpreter: two logical CPU devices, a tiny `mixtral_small` trained on one
device and under a two-replica `MirroredStrategy` from the same weights.

    python tests/tf_distribute_scenario.py OUTPUT_JSON
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

import json  # noqa: E402

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import presets  # noqa: E402

BATCH, LENGTH = 8, 16
# Dropless routing and no auxiliary loss: each replica's half batch then
# gives exactly its share of the one-device loss and gradient.
TINY = dict(
    num_layers=2,
    hidden_dim=32,
    num_query_heads=4,
    num_key_value_heads=2,
    moe_intermediate_dim=48,
    moe_options={"capacity_factor": None, "aux_loss_weight": 0.0},
)


def tiny_model():
    return presets.load("mixtral_small", preprocessor=None, **TINY)


def batch_data(seed=0, num_batches=1):
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 200, size=(BATCH * num_batches, 1))
    token_ids = (starts + np.arange(LENGTH + 1)).astype("int32")
    x = {
        "token_ids": token_ids[:, :-1],
        "padding_mask": np.ones((BATCH * num_batches, LENGTH), "int32"),
    }
    return x, token_ids[:, 1:]


def one_step(model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    logits = model.predict(x, batch_size=BATCH, verbose=0)
    return history.history["loss"][0], np.asarray(logits)


def main(output):
    x, y = batch_data()
    keras.utils.set_random_seed(0)
    reference = tiny_model()
    weights = reference.get_weights()
    reference_loss, reference_logits = one_step(reference, x, y)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = tiny_model()
        model.set_weights(weights)
        loss, logits = one_step(model, x, y)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        x_train, y_train = batch_data(seed=2, num_batches=2)
        history = model.fit(
            x_train, y_train, batch_size=BATCH, epochs=4, shuffle=False, verbose=0
        )
    result = {
        "num_replicas": strategy.num_replicas_in_sync,
        "loss": float(loss),
        "reference_loss": float(reference_loss),
        "logits_difference_after_step": float(
            np.max(np.abs(logits - reference_logits))
        ),
        "fit_losses": [float(v) for v in history.history["loss"]],
    }
    with open(output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
