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
# # Training `mixtral_small`: presets, data, `fit`, `generate`, saving
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/train_mixtral_small.ipynb)
#
# keras-moe ships *presets*: named model configurations, from small ones
# that train on a laptop CPU in minutes to the published shapes of Mixtral
# 8x7B or DeepSeek-V3. `keras_moe.presets.load(name)` builds a
# `MoECausalLM`, a keras-hub `CausalLM` that takes strings, trains with
# `model.fit` and samples with `model.generate`.
#
# This guide trains `mixtral_small` (Mixtral's architecture at toy size:
# 8 SwiGLU experts per layer, top-2 routing, grouped-query attention with
# RoPE, a byte-level tokenizer) on a text, samples from it, and saves and
# reloads it. It runs in a few minutes on a CPU.

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

import json
import math

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_moe import presets
from keras_moe.datasets import offline_corpus

# The tests run every guide with KERAS_MOE_GUIDE_FAST=1: fewer steps, a
# tiny model, no download.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
EPOCHS = 1 if FAST else 4
STEPS_PER_EPOCH = 2 if FAST else 60
SEQUENCE_LENGTH = 32 if FAST else 128
keras.utils.set_random_seed(0)
print("Keras backend:", keras.backend.backend())

# %% [markdown]
# ## Presets
#
# `names()` lists them; `info(name)` is the whole record (description, the
# paper or model card it follows, training defaults); `config(name)` the
# backbone configuration; `count_params(name)` the total and *active*
# (used per token) parameter counts, computed from the configuration without
# building anything, so it works for the full-size presets too.

# %%
print(presets.names())
record = presets.info("mixtral_small")
print(record["description"])
print(json.dumps(presets.config("mixtral_small"), indent=1))

for name in ("mixtral_small", "mixtral_8x7b", "deepseek_v3"):
    counts = presets.count_params(name)
    print(f"{name:>14}: {counts['total'] / 1e6:12,.1f}M parameters, "
          f"{counts['active'] / 1e6:10,.1f}M active per token")

# %% [markdown]
# ## Loading
#
# `load(name, **overrides)` builds the model, randomly initialised, with its
# preprocessor (the byte tokenizer for small presets). Any backbone argument
# can be overridden; `moe_options` is merged into the preset's MoE options.
# Full-size presets check first that their weights fit in memory and, if
# not, say how much they need and how to shard them.

# %%
overrides = {}
if FAST:
    overrides = dict(num_layers=1, hidden_dim=64, moe_intermediate_dim=64)
model = presets.load("mixtral_small", **overrides)
model.preprocessor.sequence_length = SEQUENCE_LENGTH
model.summary()

# %% [markdown]
# The preprocessor turns strings into what the model takes: byte ids with a
# start token in front, padded to `sequence_length`, a padding mask, and as
# labels the same ids shifted by one (the next token at every position).

# %%
x, y, sample_weight = model.preprocessor(["Hello, experts!"], sequence_length=20)
print("token_ids   ", keras.ops.convert_to_numpy(x["token_ids"])[0])
print("padding_mask", keras.ops.convert_to_numpy(x["padding_mask"])[0].astype(int))
print("labels      ", keras.ops.convert_to_numpy(y)[0])

# %% [markdown]
# ## Data
#
# With internet access the text is Shakespeare (public domain, the copy of
# TensorFlow's text generation tutorial); offline it is Python's reference
# documentation, which every CPython ships
# (`keras_moe.datasets.offline_corpus`). The text is cut into pieces of
# `SEQUENCE_LENGTH` characters, the last 5% held out for validation, and
# fed as a `tf.data` pipeline of strings: `fit` runs the preprocessor
# inside the pipeline.

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
                return response.read().decode("utf-8"), "Shakespeare"
        except OSError as error:
            print(f"No download ({error}); using the offline corpus.")
    return offline_corpus(), "Python's reference documentation"


text, source = load_text()
pieces = [
    text[i : i + SEQUENCE_LENGTH - 1]  # The start token takes one position.
    for i in range(0, len(text) - SEQUENCE_LENGTH, SEQUENCE_LENGTH - 1)
]
split = int(len(pieces) * 0.95)
train_texts, val_texts = pieces[:split], pieces[split:]
print(f"{source}: {len(train_texts):,} training and {len(val_texts):,} "
      f"validation pieces of {SEQUENCE_LENGTH - 1} characters")

batch_size = 4 if FAST else record["training"]["batch_size"]
train_ds = (
    tf.data.Dataset.from_tensor_slices(train_texts)
    .shuffle(len(train_texts), seed=0)
    .batch(batch_size, drop_remainder=True)
    .repeat()
)
val_ds = tf.data.Dataset.from_tensor_slices(val_texts[: 8 * batch_size]).batch(
    batch_size
)

# %% [markdown]
# ## Training
#
# The preset's training defaults (`record["training"]`): AdamW with weight
# decay, gradient clipping, a warmup then cosine decay. The MoE layers add
# their load-balancing loss (Mixtral's weight, 0.02) to the language-model
# loss; `fit` also logs the router statistics `moe_aux_loss`, `moe_maxvio`
# and `moe_dropped_fraction`.

# %%
training = record["training"]
total_steps = EPOCHS * STEPS_PER_EPOCH
warmup_steps = max(1, int(training["warmup_fraction"] * total_steps))
schedule = keras.optimizers.schedules.CosineDecay(
    initial_learning_rate=0.0,
    decay_steps=total_steps - warmup_steps,
    warmup_target=training["learning_rate"],
    warmup_steps=warmup_steps,
    alpha=0.1,
)
model.compile(
    optimizer=keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=training["weight_decay"],
        clipnorm=training["clipnorm"],
    ),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    weighted_metrics=["sparse_categorical_accuracy"],
)
history = model.fit(
    train_ds,
    epochs=EPOCHS,
    steps_per_epoch=STEPS_PER_EPOCH,
    validation_data=val_ds,
    verbose=2,
)
val_loss = history.history["val_loss"][-1]
print(f"Validation loss: {val_loss:.3f} nats per byte "
      f"({val_loss / math.log(2):.2f} bits; a uniform guess over 259 tokens "
      f"is {math.log2(259):.2f} bits)")

# %% [markdown]
# ## Generating
#
# `generate` samples autoregressively with a key/value cache. The sampler is
# set in `compile`: `"greedy"`, or any `keras_hub.samplers` sampler. (The
# model routes dropless at inference: `mixtral_small`'s
# `eval_capacity_factor` is `None`.)

# %%
prompt = "The " if FAST else "KING HENRY:\n" if source == "Shakespeare" else "The "
max_length = SEQUENCE_LENGTH if FAST else 120

model.compile(sampler="greedy")
print(model.generate(prompt, max_length=max_length))

model.compile(sampler=keras_hub.samplers.TopKSampler(k=10, temperature=0.8, seed=0))
print(model.generate(prompt, max_length=max_length))

# %% [markdown]
# ## Saving and reloading
#
# Two formats:
#
# - `model.save("file.keras")`: one file with the configuration, weights and
#   the preprocessor; `keras.saving.load_model` restores it.
# - `model.save_to_preset(directory)`: a keras-hub preset directory
#   (`config.json`, `model.weights.h5`, the tokenizer and preprocessor
#   configs), which `presets.load(directory)` (or
#   `keras_moe.models.MoECausalLM.from_preset(directory)`) loads. This is
#   the format to share a trained model in.

# %%
token_ids = {"token_ids": np.array([[256, 84, 104, 101, 32]], "int32"),
             "padding_mask": np.ones((1, 5), "int32")}
logits = keras.ops.convert_to_numpy(model(token_ids))

model.save("mixtral_small_trained.keras")
reloaded = keras.saving.load_model("mixtral_small_trained.keras")
difference = np.abs(keras.ops.convert_to_numpy(reloaded(token_ids)) - logits).max()
print(f"Reloaded from .keras: max |logits difference| {difference:.1e}")
assert difference < 1e-5

model.save_to_preset("mixtral_small_trained")
print(sorted(os.listdir("mixtral_small_trained")))
from_preset = presets.load("mixtral_small_trained")
difference = np.abs(keras.ops.convert_to_numpy(from_preset(token_ids)) - logits).max()
print(f"Reloaded from the preset directory: max |logits difference| {difference:.1e}")
assert difference < 1e-5

# %% [markdown]
# ## Next
#
# - Train on your own files from the command line, with TensorBoard logs:
#   `python examples/train_lm.py --preset mixtral_small --text-files ...`
#   (`--help` lists the options; `deepseek_small`, `gpt_oss_small` and `switch_decoder_small` are
#   the other small presets).
# - [Routing strategies](routing_strategies.ipynb) compares the routers
#   these presets use.
# - [Router statistics in TensorBoard](router_stats_tensorboard.ipynb).
