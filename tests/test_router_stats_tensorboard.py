"""RouterStats logs, read back by a real TensorBoard server over HTTP."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest

from keras_moe.callbacks import RouterStats
from keras_moe.callbacks import collect_router_stats
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.ops.router_stats import ROUTED_SCALARS
from keras_moe.ops.router_stats import SOFT_SCALARS

TENSORBOARD = pathlib.Path(sys.executable).parent / "tensorboard"
ROUTED_LAYERS = ("moe_a", "moe_bias")
HEATMAP = "router/expert_load_heatmap"


def moe_model():
    inputs = keras.Input((8,), dtype="int32")
    hidden = keras.layers.Embedding(32, 16, mask_zero=True)(inputs)
    hidden = hidden + SparseMoE(4, 16, top_k=2, name="moe_a")(hidden)
    hidden = hidden + SoftMoE(4, 8, name="soft")(hidden)
    hidden = hidden + SparseMoE(
        8, 8, top_k=2, score_function="sigmoid", bias_update_rate=0.01,
        aux_loss_weight=0.0, name="moe_bias",
    )(hidden)
    return keras.Model(inputs, keras.layers.Dense(4)(hidden))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of fit with Keras' TensorBoard and two RouterStats, one log_dir."""
    keras.utils.set_random_seed(0)
    log_dir = str(tmp_path_factory.mktemp("logs"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, size=(64, 8)).astype("int32")
    y = rng.normal(size=(64, 8, 4)).astype("float32")
    model = moe_model()
    model.compile(optimizer="adam", loss="mse")
    model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y),
        callbacks=[
            keras.callbacks.TensorBoard(log_dir),
            RouterStats(log_dir),
            RouterStats(log_dir, update_freq=2, run_name="router_steps"),
        ],
    )
    return log_dir, collect_router_stats(model)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(base, path, **query):
    url = base + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(trained):
    """A TensorBoard serving the log_dir; yields its base URL."""
    log_dir, _ = trained
    port = free_port()
    process = subprocess.Popen(
        [
            str(TENSORBOARD), "--logdir", log_dir, "--host", "127.0.0.1",
            "--port", str(port), "--load_fast", "false", "--reload_interval", "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace")
                pytest.fail(f"tensorboard exited early:\n{output[-3000:]}")
            try:
                tags = get_json(base, "/data/plugin/images/tags")
                scalars = get_json(base, "/data/plugin/scalars/tags")
                if "router" in tags and "train" in scalars:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard did not load the logs within 180 s")
            time.sleep(1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_every_layer_series_is_served(tensorboard):
    scalars = get_json(tensorboard, "/data/plugin/scalars/tags")
    histograms = get_json(tensorboard, "/data/plugin/histograms/tags")
    for run in ("router", "router_steps"):
        for layer in ROUTED_LAYERS:
            for stat in ROUTED_SCALARS:
                assert f"router/{layer}/{stat}" in scalars[run], (run, layer, stat)
            for vector in ("expert_load", "expert_importance"):
                assert f"router/{layer}/{vector}" in histograms[run]
        for stat in SOFT_SCALARS + ("scale",):
            assert f"router/soft/{stat}" in scalars[run]
        assert "router/soft/expert_share" in histograms[run]
        assert "router/moe_bias/expert_bias" in histograms[run]
        assert "router/moe_a/expert_bias" not in histograms[run]
    # Keras' own TensorBoard callback, same log_dir: its runs are intact.
    assert "epoch_loss" in scalars["train"]
    assert "epoch_loss" in scalars["validation"]


def test_scalars_hold_the_epoch_values(tensorboard, trained):
    _, final_stats = trained
    series = get_json(
        tensorboard, "/data/plugin/scalars/scalars",
        run="router", tag="router/moe_a/maxvio",
    )
    assert [step for _, step, _ in series] == [0, 1]
    assert series[-1][2] == pytest.approx(final_stats["moe_a"]["maxvio"], rel=1e-5)
    # Every 2 of the 4 batches of each epoch: steps 2, 4, 6, 8.
    steps = get_json(
        tensorboard, "/data/plugin/scalars/scalars",
        run="router_steps", tag="router/moe_a/dropped_fraction",
    )
    assert [step for _, step, _ in steps] == [2, 4, 6, 8]


def test_load_histogram_has_one_bucket_per_expert(tensorboard, trained):
    _, final_stats = trained
    series = get_json(
        tensorboard, "/data/plugin/histograms/histograms",
        run="router", tag="router/moe_bias/expert_load",
    )
    _, step, buckets = series[-1]
    assert step == 1
    assert len(buckets) == 8
    np.testing.assert_allclose(
        [count for _, _, count in buckets], final_stats["moe_bias"]["expert_load"],
        rtol=1e-5,
    )


def test_heatmap_image_is_served(tensorboard):
    import tensorflow as tf

    tags = get_json(tensorboard, "/data/plugin/images/tags")
    assert HEATMAP in tags["router"]
    assert "moe_a" in tags["router"][HEATMAP]["description"]
    entries = get_json(
        tensorboard, "/data/plugin/images/images", run="router", tag=HEATMAP, sample=0
    )
    assert len(entries) == 2
    with urllib.request.urlopen(
        tensorboard + "/data/plugin/images/individualImage?" + entries[-1]["query"],
        timeout=10,
    ) as response:
        png = response.read()
    image = tf.io.decode_png(png).numpy()
    assert image.shape[-1] == 3 and image.shape[0] > 40 and image.shape[1] > 100
    # Not a blank picture: the colour scale and the cells are drawn.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
