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
# # Routing strategies side by side
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/routing_strategies.ipynb)
#
# How a MoE layer decides which expert processes which token is its
# *routing strategy*. In keras-moe every strategy is a constructor argument
# of the same layers, so this guide trains one small model per strategy on
# the same data and puts their router statistics side by side:
#
# | strategy | layer and arguments | from |
# |---|---|---|
# | token choice, top-2 | `SparseMoE(top_k=2)` | Shazeer 2017, GShard, Mixtral |
# | token choice, top-1 | `SparseMoE(top_k=1, normalize_top_k=False)` | Switch Transformer |
# | token choice, no balancing | `SparseMoE(aux_loss_weight=0)` | (what goes wrong) |
# | expert choice | `SparseMoE(routing="expert_choice")` | Zhou et al. 2022 |
# | soft routing | `SoftMoE(slots_per_expert=1)` | Puigcerver et al. 2023 |
# | shared experts | `SharedExpertMoE(num_shared_experts=1)` | DeepSeekMoE, Qwen-MoE |
# | bias balancing | `SparseMoE(score_function="sigmoid", bias_update_rate=1e-3, aux_loss_weight=0)` | DeepSeek-V3 (Wang et al. 2024) |
#
# Expert choice and soft routing look at every token of a sequence to route
# any one of them, the future included, so they cannot be used in a causal
# decoder. To compare all strategies on one task, the models here are small
# *encoders* trained to fill in masked bytes of text (BERT's objective, on
# bytes). Runs in a few minutes on a CPU.

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

import time

import keras
import keras_hub
import numpy as np

from keras_moe.callbacks import collect_router_stats
from keras_moe.datasets import byte_lm_arrays
from keras_moe.datasets import offline_corpus
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE

# The tests run every guide with KERAS_MOE_GUIDE_FAST=1: fewer steps, tiny
# models, no download.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
EPOCHS = 1 if FAST else 3
STEPS_PER_EPOCH = 2 if FAST else 60
SEQUENCE_LENGTH = 32 if FAST else 64
BATCH_SIZE = 8 if FAST else 32
HIDDEN_DIM = 32 if FAST else 64
NUM_LAYERS = 1 if FAST else 2
NUM_EXPERTS = 8
keras.utils.set_random_seed(0)
print("Keras backend:", keras.backend.backend())

# %% [markdown]
# ## Data: masked bytes
#
# Text as bytes (Shakespeare when online, else Python's bundled reference
# documentation), cut into sequences; in each sequence 15% of the bytes are
# replaced by a mask token (id 256) and the model predicts them. The loss
# and accuracy count the masked positions only (sample weights).

# %%
import urllib.request

SHAKESPEARE_URL = (
    "https://storage.googleapis.com/download.tensorflow.org/data/shakespeare.txt"
)
MASK_ID = 256


def load_text():
    """A public-domain text when online, else the offline corpus."""
    if not FAST:
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=10) as response:
                return response.read().decode("utf-8"), "Shakespeare"
        except OSError as error:
            print(f"No download ({error}); using the offline corpus.")
    return offline_corpus(), "Python's reference documentation"


def masked_bytes(token_ids, rate=0.15, seed=0):
    rng = np.random.default_rng(seed)
    masked = rng.random(token_ids.shape) < rate
    inputs = np.where(masked, MASK_ID, token_ids).astype("int32")
    return inputs, token_ids, masked.astype("float32")


text, source = load_text()
# `byte_lm_arrays` cuts the text into sequences; the next-byte targets are
# not needed here.
(sequences, _), (val_sequences, _) = byte_lm_arrays(
    text, SEQUENCE_LENGTH, validation_split=0.05
)
train_data = masked_bytes(sequences, seed=0)
val_data = masked_bytes(val_sequences[: 8 * BATCH_SIZE], seed=1)
print(f"{source}: {len(sequences):,} training sequences of {SEQUENCE_LENGTH} "
      "bytes")

# %% [markdown]
# ## One encoder, many MoE layers
#
# Two pre-norm transformer blocks (bidirectional self-attention, then the
# MoE layer under test, each with a residual connection). Every routed
# strategy has 8 experts and, per token, the same expert width in use: two
# experts of `2 * HIDDEN_DIM` units for top-2 routing, one of
# `4 * HIDDEN_DIM` for top-1; expert choice and soft routing give each
# expert as many slots as top-2 routing would fill on average.

# %%
F = 2 * HIDDEN_DIM
# Each strategy: the layer class and its arguments.
STRATEGIES = {
    "token choice top-2": (SparseMoE, dict(top_k=2, intermediate_dim=F)),
    "switch top-1": (
        SparseMoE,
        dict(top_k=1, intermediate_dim=2 * F, normalize_top_k=False, jitter=0.01),
    ),
    "no balancing": (
        SparseMoE, dict(top_k=2, intermediate_dim=F, aux_loss_weight=0.0)
    ),
    "expert_choice": (
        SparseMoE,
        dict(intermediate_dim=F, routing="expert_choice", capacity_factor=2.0),
    ),
    "soft": (
        SoftMoE,
        dict(intermediate_dim=F, slots_per_expert=2 * SEQUENCE_LENGTH // NUM_EXPERTS),
    ),
    # One shared expert plus top-1 of the routed ones: the same active width.
    "shared expert": (
        SharedExpertMoE, dict(intermediate_dim=F, num_shared_experts=1, top_k=1)
    ),
    "bias balancing": (
        SparseMoE,
        dict(top_k=2, intermediate_dim=F, score_function="sigmoid",
             bias_update_rate=1e-3, aux_loss_weight=0.0),
    ),
}


def encoder(moe_class, moe_arguments, num_layers=NUM_LAYERS):
    token_ids = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=257,
        sequence_length=SEQUENCE_LENGTH,
        embedding_dim=HIDDEN_DIM,
    )(token_ids)
    for i in range(num_layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        x = x + keras.layers.MultiHeadAttention(
            num_heads=4, key_dim=HIDDEN_DIM // 4
        )(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        moe = moe_class(NUM_EXPERTS, name=f"moe_{i}", **moe_arguments)
        x = x + moe(h)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    model = keras.Model(token_ids, keras.layers.Dense(256)(x))
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    return model


# %% [markdown]
# ## Train each
#
# Same data, same order, same steps. After training,
# `keras_moe.callbacks.collect_router_stats(model)` returns each MoE layer's
# router statistics, averaged over the last epoch's steps.

# %%
models, results = {}, {}
for name, (moe_class, moe_arguments) in STRATEGIES.items():
    keras.utils.set_random_seed(0)
    model = encoder(moe_class, moe_arguments)
    started = time.perf_counter()
    model.fit(
        *train_data[:2],
        sample_weight=train_data[2],
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        shuffle=False,
        verbose=0,
    )
    seconds = time.perf_counter() - started
    evaluation = model.evaluate(
        *val_data[:2], sample_weight=val_data[2], batch_size=BATCH_SIZE,
        verbose=0, return_dict=True,
    )
    models[name] = model
    results[name] = dict(
        evaluation, seconds=seconds, stats=collect_router_stats(model)
    )
    print(f"{name:>20}: masked-byte accuracy {evaluation['accuracy']:.1%} "
          f"after {seconds:.0f}s of training")

# %% [markdown]
# ## Router statistics, side by side
#
# Per strategy, averaged over its MoE layers:
#
# - `maxvio`: how far the busiest expert is above an even share,
#   `(max load - mean load) / mean load`; 0 is perfectly even, 7 means one
#   expert of 8 gets everything.
# - `load_cv`: the coefficient of variation of the expert loads.
# - `dropped`: the share of routed choices that found their expert full.
# - `entropy`: the router's mean entropy over experts / log E: 1 is a
#   uniform router, 0 a certain one.
#
# Soft routing has no discrete load: its row shows `combine_entropy` (how
# spread a token's output is over the slots) instead.

# %%
print(f"{'strategy':>20} {'accuracy':>9} {'maxvio':>7} {'load_cv':>8} "
      f"{'dropped':>8} {'entropy':>8}")
for name, result in results.items():
    layers = list(result["stats"].values())
    mean = lambda key: np.mean([layer[key] for layer in layers])  # noqa: E731
    if name == "soft":
        print(f"{name:>20} {result['accuracy']:9.1%} {'-':>7} {'-':>8} "
              f"{0:8.1%} {mean('combine_entropy'):8.2f}")
        continue
    print(f"{name:>20} {result['accuracy']:9.1%} {mean('maxvio'):7.2f} "
          f"{mean('load_cv'):8.2f} {mean('dropped_fraction'):8.1%} "
          f"{mean('router_entropy'):8.2f}")

# %% [markdown]
# The expert loads of the first MoE layer, as a share of the routed choices
# (soft routing: each expert's share of the combine weights). A dashed line
# marks an even split.

# %%
import matplotlib.pyplot as plt

figure, axes = plt.subplots(
    1, len(results), figsize=(2.2 * len(results), 2.6), sharey=True
)
for axis, (name, result) in zip(axes, results.items()):
    first_layer = result["stats"]["moe_0"]
    load = first_layer.get("expert_load", first_layer.get("expert_share"))
    axis.bar(np.arange(NUM_EXPERTS), load)
    axis.axhline(1 / NUM_EXPERTS, color="black", linestyle="--", linewidth=1)
    axis.set_title(name, fontsize=9)
    axis.set_xticks(range(NUM_EXPERTS))
    axis.tick_params(labelsize=7)
axes[0].set_ylabel("share of tokens")
figure.tight_layout()
plt.show()

# %% [markdown]
# What to read in them:
#
# - **Token choice** with the Switch balancing loss keeps the load close to
#   even; a few percent of choices are dropped at capacity factor 1.25
#   (evaluation uses 2.0, or dropless with `capacity_factor=None`).
# - **No balancing**: nothing stops the router from sending most tokens to
#   a few experts. Depending on the data and the run this shows as a high
#   MaxVio and many dropped tokens (a collapse); the
#   [router statistics guide](router_stats_tensorboard.ipynb) provokes one
#   and shows how to see it in TensorBoard.
# - **Expert choice** is balanced by construction (MaxVio 0): each expert
#   takes exactly its capacity. A token may be taken by several experts or
#   by none; "dropped" counts the tokens no expert took.
# - **Soft routing** drops nothing and needs no balancing; the price is
#   that every slot mixes the whole sequence (encoders only).
# - **Shared experts** route fewer experts per token beside an always-on
#   one.
# - **Bias balancing** (DeepSeek-V3) balances without an auxiliary loss: a
#   non-trainable bias per expert, nudged after every step towards the
#   under-loaded experts, shifts the *selection* only, so the balancing does
#   not pull on the weights the model learns with. Its bias after training:

# %%
bias_layer = models["bias balancing"].get_layer("moe_0")
print("expert_bias of moe_0:",
      np.round(keras.ops.convert_to_numpy(bias_layer.router.expert_bias), 4))

# %% [markdown]
# At this size, and in a few hundred steps, the accuracies are close; the
# point of the table is the routing behaviour. For a longer comparison of
# sparse and dense models at equal compute, see
# `examples/compare_dense_vs_moe.py` and its results in `BENCHMARKS.md`.
