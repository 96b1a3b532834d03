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
# # Switch Transformer, sequence to sequence: pre-training, fine-tuning, and a dense baseline
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/switch_seq2seq.ipynb)
#
# Switch Transformer (Fedus et al., 2021) is T5 with its feed-forward
# blocks replaced, every other block, by *Switch layers*: a router sends
# each token to one of many experts (top-1), so parameters grow with the
# number of experts while the compute per token stays that of one
# feed-forward block. keras-moe builds it as keras-hub builds T5: a
# `SwitchEncoderDecoderBackbone` and a `SwitchSeq2SeqLM` task with
# `fit` and `generate`.
#
# This guide follows the paper's recipe at toy size, on a CPU, in minutes:
#
# 1. pre-train `switch_t5_small` with T5's span-corruption objective on an
#    offline corpus, with the router statistics in TensorBoard;
# 2. fine-tune it on a small translation task (dates as people write them
#    to ISO dates);
# 3. do the same with a dense T5 of equal *active* parameters, and compare
#    validation loss against steps and against time.

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
import matplotlib.pyplot as plt
import numpy as np

from keras_moe import presets
from keras_moe.callbacks import RouterStats
from keras_moe.datasets import date_translation_pairs
from keras_moe.datasets import offline_corpus
from keras_moe.datasets import span_corruption_arrays
from keras_moe.models import MoETokenizer
from keras_moe.models import SwitchSeq2SeqLM
from keras_moe.models import SwitchSeq2SeqLMPreprocessor

# The tests run every guide with KERAS_MOE_GUIDE_FAST=1: fewer steps, a
# tiny model.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
PRETRAIN_EPOCHS, PRETRAIN_STEPS = (2, 2) if FAST else (6, 30)
FINETUNE_EPOCHS, FINETUNE_STEPS = (2, 2) if FAST else (10, 60)
BATCH_SIZE = 4 if FAST else 16
keras.utils.set_random_seed(0)
print("Keras backend:", keras.backend.backend())

# %% [markdown]
# ## The model
#
# `switch_t5_small` is a byte-level Switch Transformer: 3 encoder and 3
# decoder T5 blocks of width 128, and in the second block of each stack a
# Switch layer of 8 ReLU experts (top-1, capacity factor 1.25 in training
# and 2.0 in evaluation, router jitter 0.01, load-balancing loss 0.01).
# `count_params` counts the parameters a token uses ("active"): one expert
# per Switch layer.
#
# Span corruption needs *sentinel* tokens, which mark the hidden spans (T5
# calls them `<extra_id_0>`, `<extra_id_1>`, ...). The byte tokenizer has
# 259 ids (256 bytes, start, end, pad), so the vocabulary is widened by the
# sentinels; the tokenizer never produces them and drops them when
# detokenizing.

# %%
NUM_SENTINELS = 64
tokenizer = MoETokenizer()
VOCABULARY_SIZE = tokenizer.vocabulary_size() + NUM_SENTINELS
SENTINEL_IDS = list(range(tokenizer.vocabulary_size(), VOCABULARY_SIZE))
PAD_ID, END_ID = tokenizer.pad_token_id, tokenizer.end_token_id

overrides = dict(vocabulary_size=VOCABULARY_SIZE)
if FAST:
    overrides.update(hidden_dim=32, intermediate_dim=64, num_heads=2, key_value_dim=16)
# Dense T5 of equal active parameters: the same blocks with no Switch layer
# (each Switch layer's experts have the dense block's width).
DENSE = dict(encoder_sparse_step=0, decoder_sparse_step=0)

# Training runs on token arrays (`preprocessor=None`); text comes back
# with a preprocessor for fine-tuning and generation.
switch = presets.load("switch_t5_small", preprocessor=None, **overrides)
dense = presets.load("switch_t5_small", preprocessor=None, **overrides, **DENSE)
for name, model in (("switch", switch), ("dense", dense)):
    counts = presets.count_params(
        {**presets.config("switch_t5_small"), **overrides, **({} if name == "switch" else DENSE)}
    )
    print(f"{name:>6}: {counts['total'] / 1e6:5.2f}M parameters, "
          f"{counts['active'] / 1e6:5.2f}M active per token")
print([block.is_sparse for block in switch.backbone.encoder_layers])

# %% [markdown]
# ## Pre-training data: span corruption
#
# T5's objective hides about 15% of the tokens in spans of mean length 3.
# The encoder reads the text with each span replaced by a sentinel; the
# decoder writes each sentinel followed by the span it hid
# (`keras_moe.datasets.span_corruption_arrays`). The corpus is Python's
# reference documentation, which every CPython ships
# (`keras_moe.datasets.offline_corpus`), as bytes.

# %%
SEQUENCE_LENGTH = 64 if FAST else 128
corpus = np.frombuffer(offline_corpus().encode("utf-8"), dtype=np.uint8).astype("int32")
# Every training step sees new text: the corpus holds about 3,600 windows
# of 128 bytes, enough for the steps above.
num_train = PRETRAIN_EPOCHS * PRETRAIN_STEPS * BATCH_SIZE
num_val = 4 * BATCH_SIZE
examples = span_corruption_arrays(
    corpus, SEQUENCE_LENGTH, SENTINEL_IDS, num_sequences=num_train + num_val,
    pad_id=PAD_ID, seed=0,
)


def as_seq2seq_batch(encoder_ids, encoder_mask, target_ids, target_mask):
    """Model inputs, labels and weights from sources and targets (T5 packing).

    The decoder reads the target shifted right behind the start token (T5
    starts with the pad id) and predicts it, ending with the end token.
    """
    length = target_ids.shape[1] + 1
    labels = np.full((len(target_ids), length), PAD_ID, "int32")
    weights = np.zeros((len(target_ids), length), bool)
    ends = target_mask.sum(axis=1)
    for row, end in enumerate(ends):
        labels[row, :end] = target_ids[row, :end]
        labels[row, end] = END_ID
        weights[row, : end + 1] = True
    decoder_ids = np.concatenate(
        [np.full((len(labels), 1), PAD_ID, "int32"), labels[:, :-1]], axis=1
    )
    x = {
        "encoder_token_ids": encoder_ids,
        "encoder_padding_mask": encoder_mask,
        "decoder_token_ids": decoder_ids,
        "decoder_padding_mask": weights,
    }
    return x, labels, weights


pretrain_x, pretrain_y, pretrain_w = as_seq2seq_batch(
    examples["encoder_token_ids"], examples["encoder_padding_mask"],
    examples["decoder_token_ids"], examples["decoder_padding_mask"],
)


def split(arrays, start, stop):
    x, y, w = arrays
    return {k: v[start:stop] for k, v in x.items()}, y[start:stop], w[start:stop]


pretrain_train = split((pretrain_x, pretrain_y, pretrain_w), 0, num_train)
pretrain_val = split((pretrain_x, pretrain_y, pretrain_w), num_train, num_train + num_val)


def show(ids):
    """Bytes as text, sentinels as <X0>, <X1>, ..., padding dropped."""
    text = ""
    for token in ids:
        if token in SENTINEL_IDS:
            text += f"<X{SENTINEL_IDS.index(token)}>"
        elif token < 256:
            text += chr(token)
    return repr(text)


print("original:", show(corpus[:SEQUENCE_LENGTH]))
print("encoder: ", show(examples["encoder_token_ids"][0]))
print("decoder: ", show(examples["decoder_token_ids"][0]))

# %% [markdown]
# ## Training both models side by side
#
# Same data, same steps, same optimizer (AdamW with warmup and cosine
# decay). `fit` runs on token arrays here; the Switch layers add their
# load-balancing loss to the language-model loss. A small callback records
# the validation loss after every epoch with the wall-clock time, and
# `RouterStats` writes the Switch layers' expert load, dropped tokens and
# balance losses to TensorBoard (`tensorboard --logdir logs/switch_seq2seq`).

# %%
class LossAgainstTime(keras.callbacks.Callback):
    """Validation loss after each epoch, with steps and seconds so far."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.rows = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append(
            ((epoch + 1) * self.steps_per_epoch, time.perf_counter() - self.start, logs["val_loss"])
        )


def train(model, data, validation, epochs, steps, learning_rate, log_dir):
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, epochs * steps, warmup_target=learning_rate,
        warmup_steps=max(1, epochs * steps // 10), alpha=0.1,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["sparse_categorical_accuracy"],
    )
    record = LossAgainstTime(steps)
    callbacks = [record, keras.callbacks.TensorBoard(log_dir)]
    if model.backbone.encoder_sparse_step or model.backbone.decoder_sparse_step:
        callbacks.append(RouterStats(log_dir, update_freq="epoch"))
    x, y, w = data
    model.fit(
        x, y, sample_weight=w, batch_size=BATCH_SIZE, epochs=epochs,
        steps_per_epoch=steps, validation_data=validation,
        callbacks=callbacks, verbose=2,
    )
    return record.rows


curves = {}
for name, model in (("switch", switch), ("dense", dense)):
    print(f"--- pre-training {name}")
    curves[name, "pre-training"] = train(
        model, pretrain_train, pretrain_val, PRETRAIN_EPOCHS, PRETRAIN_STEPS,
        learning_rate=2e-3, log_dir=f"logs/switch_seq2seq/{name}_pretraining",
    )

# %% [markdown]
# ## Fine-tuning: dates as people write them -> ISO dates
#
# `keras_moe.datasets.date_translation_pairs` writes random dates between
# 1900 and 2099 in several everyday formats ("Tuesday, March 5, 2024",
# "the 5th of March, 2024", "03/05/2024", ...) beside their ISO form. The
# `SwitchSeq2SeqLMPreprocessor` (the one `presets.load` attaches by
# default) packs (source, target) text pairs as T5 does; here it makes the
# arrays once.

# %%
pairs = date_translation_pairs(FINETUNE_EPOCHS * FINETUNE_STEPS * BATCH_SIZE + 64, seed=0)
train_pairs, val_pairs = pairs[:-64], pairs[-64:]
print(train_pairs[:3])

preprocessor = SwitchSeq2SeqLMPreprocessor(
    tokenizer, encoder_sequence_length=48, decoder_sequence_length=16
)


def pack(pairs):
    sources, targets = zip(*pairs)
    x, y, w = preprocessor(list(sources), list(targets))
    to_numpy = keras.ops.convert_to_numpy
    return {k: to_numpy(v) for k, v in x.items()}, to_numpy(y), to_numpy(w)


finetune_train, finetune_val = pack(train_pairs), pack(val_pairs)
for name, model in (("switch", switch), ("dense", dense)):
    print(f"--- fine-tuning {name}")
    curves[name, "fine-tuning"] = train(
        model, finetune_train, finetune_val, FINETUNE_EPOCHS, FINETUNE_STEPS,
        learning_rate=1e-3, log_dir=f"logs/switch_seq2seq/{name}_finetuning",
    )

# %% [markdown]
# ## Results
#
# The table gives the last validation loss and the training time of each
# phase; the plots show validation loss against steps (what the data buys)
# and against seconds (what the compute buys). At equal active parameters
# the Switch model has 8 times the feed-forward parameters in its Switch
# layers for about the same compute per token; the paper reports it
# reaching a given loss in fewer steps. At this toy size, on a CPU, the
# routing overhead is a visible share of each step.

# %%
print(f"{'model':>7} | {'phase':>12} | {'steps':>5} | {'seconds':>7} | {'val loss':>8}")
for (name, phase), rows in curves.items():
    steps, seconds, loss = rows[-1]
    print(f"{name:>7} | {phase:>12} | {steps:5d} | {seconds:7.1f} | {loss:8.3f}")

figure, axes = plt.subplots(2, 2, figsize=(10, 7))
for column, phase in enumerate(("pre-training", "fine-tuning")):
    for name in ("switch", "dense"):
        steps, seconds, loss = zip(*curves[name, phase])
        axes[0, column].plot(steps, loss, marker="o", label=name)
        axes[1, column].plot(seconds, loss, marker="o", label=name)
    axes[0, column].set(title=phase, xlabel="steps", ylabel="validation loss")
    axes[1, column].set(xlabel="seconds", ylabel="validation loss")
    axes[0, column].legend()
figure.tight_layout()
figure.savefig("switch_vs_dense.png")
plt.show()

# %% [markdown]
# ## Generating
#
# A `SwitchSeq2SeqLM` built on the trained backbone with the text
# preprocessor translates strings: `generate` encodes the source once and
# decodes with a key/value cache. Exact-match accuracy on the held-out
# dates says how much was learned, and the share of characters in place
# shows the way there: short runs get the format, the month and the day
# right before the year's digits.

# %%
translator = SwitchSeq2SeqLM(backbone=switch.backbone, preprocessor=preprocessor)
translator.compile(sampler="greedy")
sources = [source for source, _ in val_pairs[:16]]
outputs = translator.generate(sources, max_length=16)
for source, output, (_, target) in zip(sources[:5], outputs[:5], val_pairs[:5]):
    print(f"{source!r:>40} -> {output!r} (expected {target!r})")
correct = sum(output == target for output, (_, target) in zip(outputs, val_pairs))
characters = np.mean([
    np.mean([a == b for a, b in zip(output.ljust(10), target)])
    for output, (_, target) in zip(outputs, val_pairs)
])
print(f"Exact match on {len(sources)} held-out dates: {correct}/{len(sources)}; "
      f"characters in place: {characters:.0%}")

# %% [markdown]
# ## Router statistics in TensorBoard
#
# `RouterStats` wrote, per Switch layer, the expert load, the fraction of
# tokens dropped by the capacity limit, and the balance losses:

# %%
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = EventAccumulator("logs/switch_seq2seq/switch_pretraining/router").Reload()
tags = sorted(run.Tags()["tensors"] or run.Tags()["scalars"])
print(f"{len(tags)} router tags, e.g.", [tag for tag in tags if "dropped" in tag][:2])

# %% [markdown]
# ## Next
#
# - Longer runs: set `PRETRAIN_EPOCHS`, `PRETRAIN_STEPS` and the
#   fine-tuning counterparts higher; the full-size presets
#   (`switch_base_8` ... `switch_c_2048`) have the published shapes, and
#   `presets.load(directory)` reads a Hugging Face `switch_transformers`
#   checkpoint ([checkpoint conversion](checkpoint_conversion.ipynb)).
# - Regularisation: the Switch paper fine-tunes with dropout 0.1 and a
#   higher *expert dropout*, 0.4, inside the experts (on their hidden
#   activations): `presets.load("switch_t5_small", dropout=0.1,
#   expert_dropout=0.4)`, or `presets.load(directory, dropout=0.1,
#   moe_options={"expert_dropout": 0.4})` for a converted checkpoint. The
#   short runs above train without dropout.
# - [Router statistics in TensorBoard](router_stats_tensorboard.ipynb)
#   explains the router metrics.
