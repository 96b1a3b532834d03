# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Router statistics in TensorBoard: reading the heatmap, diagnosing collapse
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/router_stats_tensorboard.ipynb)
#
# A MoE model can train to a fine-looking loss while its routers misbehave:
# a few experts take most tokens (the others idle, their parameters
# wasted), tokens are dropped at full experts, router logits drift. None of
# this shows in the loss curve. Every keras-moe MoE layer therefore
# measures its own routing in each training step, and
# `keras_moe.callbacks.RouterStats` writes it to TensorBoard:
#
# - per layer, scalars: `aux_loss`, `z_loss`, `maxvio`, `load_cv`,
#   `router_entropy`, `dropped_fraction`;
# - per layer, histograms over the expert index: `expert_load` and
#   `expert_importance` (and `expert_bias` under bias balancing);
# - one image, `router/expert_load_heatmap`: layers x experts, each cell an
#   expert's load relative to an even split.
#
# This guide trains a `mixtral_small` with `RouterStats`, reads the
# statistics in the notebook and in TensorBoard, then provokes a router
# collapse, recognises it in the statistics and fixes it. A few minutes on a
# CPU.

# %%
# Install keras-moe when it is missing, as on a fresh Colab runtime.
# keras-moe is not on PyPI yet: it installs from its Git repository (use the
# URL of your fork or checkout if you work from one). In a local checkout
# with `pip install -e .` done, this cell does nothing.
import importlib.util
import subprocess
import sys

KERAS_MOE_SOURCE = "git+https://github.com/keras-moe/keras-moe"
if importlib.util.find_spec("keras_moe") is None:
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q", KERAS_MOE_SOURCE]
    )

# %%
import os

# Any Keras backend works: "tensorflow", "jax" or "torch".
os.environ.setdefault("KERAS_BACKEND", "jax")

import shutil

import keras
import matplotlib.pyplot as plt
import numpy as np

from keras_moe import presets
from keras_moe.callbacks import RouterStats
from keras_moe.callbacks import collect_router_stats
from keras_moe.callbacks import render_load_heatmap
from keras_moe.callbacks import router_stats
from keras_moe.datasets import byte_lm_arrays
from keras_moe.datasets import offline_corpus
from keras_moe.layers import SparseMoE

# The tests run every guide with KERAS_MOE_GUIDE_FAST=1: fewer steps, a
# tiny model, no download.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
EPOCHS = 2 if FAST else 4
STEPS_PER_EPOCH = 2 if FAST else 40
SEQUENCE_LENGTH = 32 if FAST else 128
BATCH_SIZE = 4 if FAST else 8
LOG_DIR = "logs/router_stats"
shutil.rmtree(LOG_DIR, ignore_errors=True)
keras.utils.set_random_seed(0)
print("Keras backend:", keras.backend.backend())

# %% [markdown]
# ## Train with `RouterStats`
#
# `mixtral_small` (8 experts, top-2, Mixtral's balancing loss weight 0.02),
# trained on bytes of text: Shakespeare when online, else Python's bundled
# reference documentation. The model takes token ids directly here
# (`preprocessor=None`); `byte_lm_arrays` makes the inputs and next-byte
# targets.
#
# `RouterStats(log_dir)` goes beside Keras' own `TensorBoard` callback, in
# the same `log_dir`: Keras writes the `train` and `validation` runs,
# `RouterStats` the `router` run. `update_freq="epoch"` (the default)
# writes the mean of each epoch; `update_freq=N` every N batches.

# %%
import urllib.request

SHAKESPEARE_URL = (
    "https://storage.googleapis.com/download.tensorflow.org/data/shakespeare.txt"
)


def load_text():
    """A public-domain text when online, else the offline corpus."""
    if not FAST:
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=10) as response:
                return response.read().decode("utf-8")
        except OSError as error:
            print(f"No download ({error}); using the offline corpus.")
    return offline_corpus()


(x_train, y_train), (x_val, y_val) = byte_lm_arrays(
    load_text(), SEQUENCE_LENGTH, validation_split=0.05
)


def as_inputs(token_ids):
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


overrides = dict(num_layers=4)
if FAST:
    overrides = dict(num_layers=2, hidden_dim=32, moe_intermediate_dim=32)
model = presets.load("mixtral_small", preprocessor=None, **overrides)
model.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=2e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
history = model.fit(
    as_inputs(x_train),
    y_train,
    batch_size=BATCH_SIZE,
    epochs=EPOCHS,
    steps_per_epoch=STEPS_PER_EPOCH,
    validation_data=(as_inputs(x_val[:64]), y_val[:64]),
    callbacks=[
        keras.callbacks.TensorBoard(LOG_DIR),
        RouterStats(LOG_DIR, update_freq="epoch"),
    ],
    verbose=2,
)

# %% [markdown]
# ## In TensorBoard
#
# In Colab or Jupyter, the next cell opens TensorBoard inline (as a script,
# run `tensorboard --logdir logs/router_stats` instead). Under *Scalars*,
# filter on `router/` for the per-layer curves; *Histograms* shows the
# expert loads; *Images* shows `router/expert_load_heatmap`, one slider
# position per epoch.
#
# Here is what those pages look like for a small model whose three MoE
# layers route the same skewed tokens: without balancing (heatmap row 0,
# where two experts take nearly all the tokens), with the Switch loss
# (row 1) and with bias balancing (row 2), written every 25 steps
# (`examples/tensorboard_screenshot.py` trains it and takes the
# screenshots). The collapsing layer's MaxVio climbs towards its maximum
# E/k - 1 = 3 while the other two fall; the section *Diagnosing a collapse*
# below runs the same experiment.
#
# ![TensorBoard's Images page: the expert load heatmap](https://raw.githubusercontent.com/keras-moe/keras-moe/main/docs/images/router_stats_heatmap.png)
#
# ![TensorBoard's Scalars page: MaxVio of the three layers](https://raw.githubusercontent.com/keras-moe/keras-moe/main/docs/images/router_stats_scalars.png)

# %%
# %load_ext tensorboard
# %tensorboard --logdir logs/router_stats

# %% [markdown]
# The event files are plain TensorBoard summaries; here are the tags
# written to the `router` run:

# %%
from tensorboard.backend.event_processing import event_accumulator

events = event_accumulator.EventAccumulator(
    os.path.join(LOG_DIR, "router"),
    size_guidance={event_accumulator.TENSORS: 0},
)
events.Reload()
tags = events.Tags()["tensors"]
print(len(tags), "tags, for example:")
for tag in tags:
    if "decoder_block_0" in tag or "heatmap" in tag:
        print("  ", tag)

# %% [markdown]
# ## The same statistics in the notebook
#
# `collect_router_stats(model)` returns what the layers recorded during the
# last training epoch, keyed by layer path. `router_stats(model, data)`
# instead runs the model over `data` the way it runs at inference (the
# evaluation capacity factor, no router noise) and returns one row per
# layer; `pandas.DataFrame(rows)` makes a table of it.

# %%
trained = collect_router_stats(model)
rows = router_stats(model, as_inputs(x_val[:64]), batch_size=BATCH_SIZE)
rows.sort(key=lambda row: row["layer"])
print(f"{'layer':<40}{'maxvio':>8}{'load_cv':>8}{'dropped':>9}{'entropy':>9}")
for row in rows:
    print(f"{row['layer']:<40}{row['maxvio']:8.2f}{row['load_cv']:8.2f}"
          f"{row['dropped_fraction']:9.1%}{row['router_entropy']:9.2f}")

# %% [markdown]
# ### Reading the heatmap
#
# One row per MoE layer, one column per expert; a cell is the expert's load
# times the number of experts, so **1 is a balanced expert** (its even
# share), 0 an idle one and E an expert that gets every token. A healthy
# model shows rows of similar colour around 1. Warning signs:
#
# - a row with one or two bright cells and the rest dark: that layer's
#   router has *collapsed* onto a few experts;
# - the same dark columns in every epoch: experts that never get tokens
#   (dead experts), whose parameters learn nothing;
# - in the scalars: `maxvio` climbing (the busiest expert's excess load,
#   0 when even, E - 1 when collapsed), `router_entropy` falling towards 0
#   (the router is certain of one expert for every token), and
#   `dropped_fraction` rising (full experts drop tokens).
#
# `render_load_heatmap` draws the same picture as the TensorBoard image:

# %%
heatmap = render_load_heatmap([row["expert_load"] for row in rows])
plt.figure(figsize=(6, 2.5))
plt.imshow(heatmap)
plt.axis("off")
plt.title("expert load / even share, validation text")
plt.show()


# %% [markdown]
# ## Diagnosing a collapse
#
# Collapse is self-reinforcing: an expert that gets more tokens trains
# more, scores higher, and gets more tokens. It is easiest to provoke with
# inputs that share a strong common direction, so that a freshly
# initialised router already sends most tokens to the same experts (real
# models see this with, for example, a dominant token type, or after a
# learning-rate spike). Below: one `SparseMoE` layer in a small regression
# model, on such tokens, three times with the same data and steps:
#
# - no balancing (`aux_loss_weight=0`),
# - the Switch load-balancing loss (`aux_loss_weight=0.1`),
# - DeepSeek-V3's aux-loss-free bias balancing (`bias_update_rate=0.01`).
#
# (The same experiment at 300 steps is `benchmarks/router_balance.py`; its
# results are in BENCHMARKS.md.)

# %%
NUM_EXPERTS, HIDDEN = 8, 16


def skewed_tokens(rng, num_sequences, length=32):
    shared = np.linspace(1.0, -1.0, HIDDEN) * 3.0
    x = rng.normal(size=(num_sequences, length, HIDDEN)) + shared
    mixing = np.random.default_rng(1234).normal(size=(HIDDEN, HIDDEN))
    return x.astype("float32"), np.sin(x @ mixing / 4.0).astype("float32")


BALANCING = {
    "no balancing": dict(aux_loss_weight=0.0),
    "Switch loss": dict(aux_loss_weight=0.1),
    "bias balancing": dict(
        aux_loss_weight=0.0, score_function="sigmoid", bias_update_rate=0.01
    ),
}
# The toy model is tiny: 300 steps take seconds, so fast mode runs them all.
x_skewed, y_skewed = skewed_tokens(np.random.default_rng(0), 16 * 300)
x_held_out, _ = skewed_tokens(np.random.default_rng(1), 64)
balance_results = {}
for name, arguments in BALANCING.items():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, HIDDEN))
    moe = SparseMoE(NUM_EXPERTS, 32, top_k=2, capacity_factor=None,
                    name="moe", **arguments)
    toy = keras.Model(inputs, keras.layers.Dense(HIDDEN)(inputs + moe(inputs)))
    toy.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    toy_log_dir = os.path.join("logs/collapse", name.replace(" ", "_"))
    toy.fit(x_skewed, y_skewed, batch_size=16, epochs=1, verbose=0,
            callbacks=[RouterStats(toy_log_dir, update_freq=25)])
    # The routing of the trained model, on held-out tokens.
    balance_results[name] = router_stats(toy, x_held_out, batch_size=16)[0]


def diagnose(stats):
    """Name the state of a router from its statistics."""
    load = np.sort(stats["expert_load"])[::-1]
    num_experts = load.size
    idle = int(np.sum(load < 0.1 / num_experts))  # under 10% of a fair share
    if idle >= num_experts // 2:
        busy = num_experts - idle
        return (f"collapsed: {busy} of {num_experts} experts take "
                f"{load[:busy].sum():.0%} of the routed choices, {idle} idle")
    if stats["maxvio"] > 1.0:
        return (f"imbalanced: the busiest expert gets "
                f"{1 + stats['maxvio']:.1f}x its share")
    return "balanced"


for name, stats in balance_results.items():
    print(f"{name:>15}: MaxVio {stats['maxvio']:.2f}, router entropy "
          f"{stats['router_entropy']:.2f}, loads "
          f"{np.round(stats['expert_load'], 2)}")
    print(f"{'':>15}  -> {diagnose(stats)}")

# %%
heatmap = render_load_heatmap(
    [stats["expert_load"] for stats in balance_results.values()]
)
plt.figure(figsize=(6, 2.5))
plt.imshow(heatmap)
plt.axis("off")
plt.title("rows: " + ", ".join(balance_results))
plt.show()

# %% [markdown]
# Without balancing, a few experts take every token and the others idle:
# their parameters are wasted, and with a capacity limit the overflow of
# the busy experts would be dropped. In TensorBoard
# (`%tensorboard --logdir logs/collapse`, written every 25 steps) the
# unbalanced run's `maxvio` climbs while the other two fall. The two cures:
#
# - **An auxiliary balancing loss** (`aux_loss_weight`, Switch: 0.01,
#   Mixtral: 0.02; raise it when a collapse shows): it pushes the router's
#   probabilities towards an even load, at the price of a gradient that
#   competes with the model's own loss.
# - **Bias balancing** (`bias_update_rate`, DeepSeek-V3: 0.001 per step
#   over long runs; larger for short ones): a non-trainable per-expert bias
#   added to the scores for *selection only*, nudged after every step
#   towards the under-loaded experts. No extra gradient; TensorBoard shows
#   the bias itself as `router/<layer>/expert_bias`.
#
# Other levers: the router z-loss (`z_loss_weight=0.001`) keeps logits
# small, which helps a router that has become too certain (low
# `router_entropy`); a lower learning rate for a run whose collapse
# follows a loss spike; and capacity (`capacity_factor`) only limits the
# damage, dropping the overflow.
#
# In short, watch `maxvio` and the heatmap: a MaxVio that keeps rising, or a
# heatmap row that turns into a few bright cells, is a collapse in the
# making.
