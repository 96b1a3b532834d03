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
# # Getting started with keras-moe
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/getting_started.ipynb)
#
# A Mixture-of-Experts (MoE) layer replaces one feed-forward layer with many
# (the *experts*) and a small *router* that sends each token to a few of
# them. The model gets the parameters of all the experts but each token pays
# only for the ones it visits, so a MoE model can be much larger than a dense
# model of the same cost per token.
#
# keras-moe has three MoE layers, all drop-in replacements for a
# feed-forward layer on `[batch, tokens, features]` inputs:
#
# | layer | each token goes to | use it in |
# |---|---|---|
# | `SparseMoE` | its `top_k` experts (or: each expert picks its tokens) | decoders and encoders |
# | `SharedExpertMoE` | its `top_k` experts, plus always-on shared experts | decoders and encoders |
# | `SoftMoE` | every expert *slot* sees a weighted mix of all tokens | encoders only |
#
# This guide builds them, shows what `top_k`, capacity and the balancing
# losses do, and trains models with them using `model.fit`. It runs in a
# few minutes on a CPU.

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

import keras
import keras_hub
import numpy as np

import keras_moe
from keras_moe.datasets import byte_lm_arrays
from keras_moe.datasets import offline_corpus
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE

# The tests run every guide with KERAS_MOE_GUIDE_FAST=1: fewer steps, tiny
# models, no download.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
EPOCHS = 1 if FAST else 3
STEPS_PER_EPOCH = 2 if FAST else 100
SEQUENCE_LENGTH = 32 if FAST else 64
BATCH_SIZE = 8 if FAST else 32
HIDDEN_DIM = 32 if FAST else 64
NUM_LAYERS = 1 if FAST else 2
keras.utils.set_random_seed(0)
print("Keras backend:", keras.backend.backend())

# %% [markdown]
# ## Data
#
# Byte-level language modeling: each UTF-8 byte is a token (256 token ids,
# no tokenizer), and the model predicts the next byte. With internet access
# the text is Shakespeare (public domain, the copy that TensorFlow's text
# generation tutorial uses); offline it is Python's reference documentation,
# which ships with every CPython (`keras_moe.datasets.offline_corpus`).

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
(x_train, y_train), (x_val, y_val) = byte_lm_arrays(
    text, SEQUENCE_LENGTH, validation_split=0.05
)
print(f"{source}: {len(text):,} characters, {len(x_train):,} training and "
      f"{len(x_val):,} validation sequences of {SEQUENCE_LENGTH} bytes")
print(repr(bytes(x_train[0].tolist()).decode("utf-8", errors="replace")))

# %% [markdown]
# ## One layer
#
# `SparseMoE(num_experts, intermediate_dim, top_k)` takes `[..., d]` and
# returns the same shape. Each expert is a SwiGLU feed-forward network of
# `intermediate_dim` units (`activation="gelu"` gives GeGLU, `gated=False`
# a plain two-layer MLP); the router is one `[d, num_experts]` matrix.

# %%
moe = SparseMoE(num_experts=8, intermediate_dim=128, top_k=2)
x = np.random.default_rng(0).normal(size=(4, 16, 64)).astype("float32")
y = moe(x)
print("input", x.shape, "-> output", tuple(y.shape))

d, f, E, k = 64, 128, 8, 2
expert_params = 3 * d * f  # SwiGLU: gate, up and down kernels.
print(f"parameters: {moe.count_params():,} in all, "
      f"{k * expert_params + d * E:,} used per token "
      f"(router + {k} of {E} experts)")

# %% [markdown]
# ### Top-k and capacity
#
# The router scores every expert for every token (a softmax over the
# experts) and each token goes to its `top_k` best; its output is the sum of
# those experts' outputs weighted by their scores (renormalised over the
# `top_k`, as in Mixtral).
#
# To keep shapes static, which XLA needs, each expert gets a buffer of
# `C = ceil(capacity_factor * tokens * top_k / num_experts)` slots. Tokens
# fill them in order, first choices before second choices; a choice that
# finds its expert full is *dropped*: it adds nothing, and the residual
# connection around the layer carries the token on. `capacity_factor=1.25`
# (Switch Transformer's training default) leaves 25% slack;
# `capacity_factor=None` sizes the buffers so that nothing is ever dropped.
# Outside training `eval_capacity_factor` (2.0 by default) applies.
#
# Every MoE layer records what its router did in training calls:
# `layer.router_stats.values()`.

# %%
from keras_moe.ops import expert_capacity

tokens = 4 * 16
for capacity_factor in (0.5, 1.0, 1.25, None):
    layer = SparseMoE(8, 128, top_k=2, capacity_factor=capacity_factor)
    layer(x, training=True)
    stats = layer.router_stats.values()
    capacity = expert_capacity(tokens, 8, 2, capacity_factor)
    print(f"capacity_factor={capacity_factor}: {capacity} slots per expert, "
          f"dropped {stats['dropped_fraction']:.1%} of the choices; "
          f"load per expert {np.round(stats['expert_load'], 2)}")

# %% [markdown]
# ### The balancing losses
#
# Left alone, a router tends to favour a few experts, which then get more
# training and more tokens, until the others are idle (*router collapse*)
# and, with a capacity limit, many tokens are dropped. In training the layer
# adds, with `add_loss`:
#
# - the Switch Transformer load-balancing loss
#   `aux_loss_weight * E * sum_i f_i * P_i` (`f_i`: fraction of the routed
#   choices that went to expert `i`, `P_i`: its mean router probability).
#   It is 1 × `aux_loss_weight` when the load is even and grows as the
#   router concentrates; `aux_loss_weight=0.01` by default;
# - the ST-MoE router z-loss `z_loss_weight * mean(logsumexp(logits)^2)`,
#   which keeps the router logits small (off by default).
#
# `model.fit` adds them to the model's loss. DeepSeek-V3's loss-free
# alternative, a bias that steers the routing (`bias_update_rate`), is in
# the routing strategies guide.

# %%
layer = SparseMoE(8, 128, top_k=2, aux_loss_weight=0.01, z_loss_weight=0.001)
layer(x, training=True)
print("losses added in training:",
      [round(float(keras.ops.convert_to_numpy(v)), 5) for v in layer.losses])
layer(x, training=False)
print("in inference:", layer.losses)

# %% [markdown]
# ## A MoE language model
#
# A small GPT: token and position embeddings, two pre-norm blocks of causal
# self-attention and a MoE feed-forward layer, each with a residual
# connection, and a softmax over the 256 bytes. The MoE layer is the only
# thing that differs from a dense transformer.

# %%
def decoder_block(x, feedforward):
    h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    h = keras.layers.MultiHeadAttention(
        num_heads=4, key_dim=HIDDEN_DIM // 4
    )(h, h, use_causal_mask=True)
    x = x + h
    h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    return x + feedforward(h)


def language_model(make_feedforward, num_layers=NUM_LAYERS):
    token_ids = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=256,
        sequence_length=SEQUENCE_LENGTH,
        embedding_dim=HIDDEN_DIM,
    )(token_ids)
    for _ in range(num_layers):
        x = decoder_block(x, make_feedforward())
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    logits = keras.layers.Dense(256)(x)
    model = keras.Model(token_ids, logits)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


model = language_model(
    lambda: SparseMoE(num_experts=8, intermediate_dim=2 * HIDDEN_DIM, top_k=2)
)
model.summary()

# %% [markdown]
# `fit` trains it like any Keras model. Besides the loss (the language-model
# loss plus the router losses) it logs three router statistics, averaged
# over the MoE layers: `moe_aux_loss` (the unweighted balancing loss: 1.0 is
# perfectly even), `moe_maxvio` (how much more than an even share the
# busiest expert gets: 0 is even) and `moe_dropped_fraction`.

# %%
history = model.fit(
    x_train,
    y_train,
    batch_size=BATCH_SIZE,
    epochs=EPOCHS,
    steps_per_epoch=STEPS_PER_EPOCH,
    validation_data=(x_val[: 4 * BATCH_SIZE], y_val[: 4 * BATCH_SIZE]),
    verbose=2,
)
print({name: round(values[-1], 4) for name, values in history.history.items()})


# %% [markdown]
# Sampling one byte at a time from the trained model (a plain loop; the
# `MoECausalLM` models of the next guide have a cached `generate()`):

# %%
def sample(model, prompt, length, temperature=0.7, seed=0):
    rng = np.random.default_rng(seed)
    ids = list(prompt.encode("utf-8"))
    for _ in range(length):
        window = ids[-SEQUENCE_LENGTH:]
        padded = np.zeros((1, SEQUENCE_LENGTH), "int32")
        padded[0, : len(window)] = window
        logits = keras.ops.convert_to_numpy(model(padded))[0, len(window) - 1]
        probs = np.exp((logits - logits.max()) / temperature)
        ids.append(int(rng.choice(256, p=probs / probs.sum())))
    return bytes(ids).decode("utf-8", errors="replace")


print(sample(model, "The ", 8 if FAST else 120))

# %% [markdown]
# ## Shared experts
#
# `SharedExpertMoE` adds always-on *shared* experts to the routed ones
# (DeepSeekMoE): every token goes through them, so the routed experts can
# specialise while the shared ones learn what every token needs. Qwen-MoE
# puts one wide shared expert behind a sigmoid gate
# (`shared_expert_gate=True`). Swapping it in is one line.

# %%
shared_model = language_model(
    lambda: SharedExpertMoE(
        num_experts=8,
        intermediate_dim=HIDDEN_DIM,
        num_shared_experts=1,
        top_k=2,
    )
)
shared_history = shared_model.fit(
    x_train,
    y_train,
    batch_size=BATCH_SIZE,
    epochs=EPOCHS,
    steps_per_epoch=STEPS_PER_EPOCH,
    validation_data=(x_val[: 4 * BATCH_SIZE], y_val[: 4 * BATCH_SIZE]),
    verbose=2,
)

# %% [markdown]
# ## SoftMoE, for encoders
#
# `SoftMoE` (Puigcerver et al. 2023) routes nothing discretely: each expert
# has a few *slots*, each slot's input is a softmax-weighted average of all
# the tokens of the sequence, and each token's output is a softmax-weighted
# average of all slot outputs. Nothing is dropped and no balancing loss is
# needed, but every slot looks at the whole sequence, future tokens
# included, so it belongs in encoders, not in causal decoders.
#
# Here it goes into a small encoder trained to fill in masked bytes (BERT's
# objective, on bytes): 15% of the input bytes are replaced by a mask token
# (id 256), and the loss is computed on those positions only.

# %%
MASK_ID = 256


def masked_bytes(token_ids, rate=0.15, seed=0):
    rng = np.random.default_rng(seed)
    masked = rng.random(token_ids.shape) < rate
    inputs = np.where(masked, MASK_ID, token_ids).astype("int32")
    return inputs, token_ids, masked.astype("float32")


def encoder(make_feedforward, num_layers=NUM_LAYERS):
    token_ids = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=257,
        sequence_length=SEQUENCE_LENGTH,
        embedding_dim=HIDDEN_DIM,
    )(token_ids)
    for _ in range(num_layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        # No causal mask: every token sees the whole sequence.
        x = x + keras.layers.MultiHeadAttention(
            num_heads=4, key_dim=HIDDEN_DIM // 4
        )(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        x = x + make_feedforward()(h)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    model = keras.Model(token_ids, keras.layers.Dense(256)(x))
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    return model


mlm_x, mlm_y, mlm_weights = masked_bytes(x_train)
mlm_val = masked_bytes(x_val[: 4 * BATCH_SIZE], seed=1)
soft_encoder = encoder(
    lambda: SoftMoE(num_experts=8, intermediate_dim=2 * HIDDEN_DIM,
                    slots_per_expert=1)
)
soft_history = soft_encoder.fit(
    mlm_x,
    mlm_y,
    sample_weight=mlm_weights,
    batch_size=BATCH_SIZE,
    epochs=EPOCHS,
    steps_per_epoch=STEPS_PER_EPOCH,
    validation_data=mlm_val,
    verbose=2,
)
print(f"SoftMoE encoder: masked-byte accuracy "
      f"{soft_history.history['val_accuracy'][-1]:.1%} on validation text")

# %% [markdown]
# ## Saving
#
# Every layer is registered with Keras serialization, so models save to a
# `.keras` file and load back without `custom_objects`.

# %%
model.save("moe_language_model.keras")
reloaded = keras.saving.load_model("moe_language_model.keras")
same = np.allclose(
    keras.ops.convert_to_numpy(model(x_val[:2])),
    keras.ops.convert_to_numpy(reloaded(x_val[:2])),
    atol=1e-5,
)
print("reloaded model gives the same logits:", same)
assert same

# %% [markdown]
# ## Next
#
# - [Train `mixtral_small`](train_mixtral_small.ipynb): a preset model, its
#   text pipeline, `generate` and saving.
# - [Routing strategies](routing_strategies.ipynb): token choice, expert
#   choice, soft routing, shared experts and DeepSeek's bias balancing side
#   by side.
# - [Router statistics in TensorBoard](router_stats_tensorboard.ipynb):
#   spotting and fixing router collapse.
# - [Distributed training](distributed_training.ipynb): data and expert
#   parallelism.
# - [Checkpoint conversion](checkpoint_conversion.ipynb): Hugging Face
#   Mixtral, Qwen-MoE and DeepSeek checkpoints.
