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
# # Converting and fine-tuning a Hugging Face checkpoint
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/checkpoint_conversion.ipynb)
#
# Mixture-of-Experts checkpoints are published in Hugging Face format: a
# directory with `config.json`, `*.safetensors` weights and usually a
# `tokenizer.json`. `keras_moe.presets.load` reads such a directory (or an
# `hf://org/name` handle) and returns a `MoECausalLM` that computes the same
# logits as `transformers`, trains with `model.fit` on any Keras backend, and
# exports back with `keras_moe.convert.to_transformers`.
#
# This guide goes through the whole loop on a small Mixtral-style checkpoint
# made on the spot, so it runs offline on a CPU in a few minutes:
#
# 1. a checkpoint in Hugging Face format (weights and tokenizer),
# 2. loading it with `presets.load`,
# 3. checking logits against `transformers`,
# 4. fine-tuning a few steps with `model.fit`,
# 5. exporting and loading the result back in `transformers`.
#
# The same code loads `mixtral`, `qwen2_moe`, `qwen3_moe`, `deepseek_v2`,
# `deepseek_v3`, `olmoe`, `glm4_moe`, `dbrx`, `gpt_oss` and `llama4`
# checkpoints, and Switch Transformer (`switch_transformers`) encoder-decoders.

# %%
# Install keras-moe (and transformers, to compare with) when it is missing,
# as on a fresh Colab runtime.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("keras_moe") is None:
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q", "keras-moe",
         "transformers", "safetensors"]
    )

# %%
import os

# Any Keras backend works: "tensorflow", "jax" or "torch" (set it before
# importing keras).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tempfile
from pathlib import Path

import keras
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import keras_moe
from keras_moe import convert, presets
from keras_moe.datasets import offline_corpus

# The tests run every guide with KERAS_MOE_GUIDE_FAST=1: fewer steps.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
EPOCHS = 2 if FAST else 3
STEPS_PER_EPOCH = 2 if FAST else 20
SEQUENCE_LENGTH = 32 if FAST else 64
keras.utils.set_random_seed(0)
print("Keras backend:", keras.backend.backend())

# %% [markdown]
# ## 1. A checkpoint in Hugging Face format
#
# With internet access, a real checkpoint is one line:
#
# ```python
# model = presets.load("hf://Qwen/Qwen1.5-MoE-A2.7B", dtype="bfloat16")
# ```
#
# It downloads `config.json`, the safetensors shards and the tokenizer files
# (never pickled `.bin` weights) through `huggingface_hub`, then reads them
# like a local directory. Real MoE checkpoints are tens of gigabytes, though;
# `load` checks the memory they need before building anything and says how
# to shard them when they do not fit.
#
# Here we write a small checkpoint ourselves, as a training run with
# `transformers` would: a byte-level BPE tokenizer trained on an offline
# corpus (the Python documentation that ships with CPython) and a
# Mixtral-style model with 8 experts, top-2 routing and grouped-query
# attention.

# %%
text = offline_corpus()
if FAST:
    text = text[:100_000]
paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
print(f"{len(paragraphs)} paragraphs of training text")

checkpoint_dir = Path(tempfile.mkdtemp()) / "tiny-mixtral"
checkpoint_dir.mkdir()

hf_tokenizer = Tokenizer(models.BPE())
hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
hf_tokenizer.decoder = decoders.ByteLevel()
hf_tokenizer.train_from_iterator(
    paragraphs,
    trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
)
hf_tokenizer.save(str(checkpoint_dir / "tokenizer.json"))
(checkpoint_dir / "tokenizer_config.json").write_text(
    '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", '
    '"eos_token": "</s>", "add_bos_token": true}'
)

config = transformers.MixtralConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    bos_token_id=0,
    eos_token_id=1,
)
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint_dir)
print(sorted(os.listdir(checkpoint_dir)))

# %% [markdown]
# ## 2. Load it
#
# `presets.load` sees a `config.json` written by `transformers`, reads its
# `model_type` and converts: a `MoEBackbone` with the same shapes, routing
# that is *dropless* and scores experts exactly as the source model does
# (softmax, top-2, weights renormalised, for Mixtral), and the weights read
# one tensor at a time from the memory-mapped safetensors files. The
# `tokenizer.json` becomes a `HuggingFaceTokenizer` inside a
# `MoECausalLMPreprocessor`, so the model takes strings. We compile it at
# once: an optimizer for `fit`, a sampler for `generate`.

# %%
model = presets.load(checkpoint_dir)
model.preprocessor.sequence_length = SEQUENCE_LENGTH
model.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=1e-3), sampler="greedy"
)
backbone = model.backbone
print(type(model).__name__, "with", f"{model.count_params():,}", "parameters")
print("routing:", backbone.num_experts, "experts, top", backbone.top_k,
      "| MoE options:", backbone.moe_options)

# %% [markdown]
# ## 3. Check logits against transformers
#
# A batch of two prompts of different lengths, right-padded: the logits of
# every real token must agree. (The padded positions are not compared:
# they are padding.)

# %%
prompts = ["The for statement is used", "A class definition"]
batch, _, _ = model.preprocessor(prompts, sequence_length=12)
token_ids = keras.ops.convert_to_numpy(batch["token_ids"])
padding_mask = keras.ops.convert_to_numpy(batch["padding_mask"]).astype("int32")


def transformers_logits(directory):
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        return reference.eval()(
            input_ids=torch.tensor(token_ids, dtype=torch.long),
            attention_mask=torch.tensor(padding_mask),
        ).logits.numpy()


def keras_logits(model):
    logits = model({"token_ids": token_ids, "padding_mask": padding_mask})
    return keras.ops.convert_to_numpy(logits)


def compare(a, b):
    real = padding_mask.astype(bool)
    return float(np.abs(a - b)[real].max())


difference = compare(keras_logits(model), transformers_logits(checkpoint_dir))
print(f"max |logits difference| keras-moe vs transformers: {difference:.2e}")
assert difference < 1e-4

# %% [markdown]
# ## 4. Fine-tune
#
# The converted model is an ordinary Keras model: `fit` trains it on text. The preprocessor tokenizes inside the `tf.data` pipeline, the
# MoE layers add their load-balancing loss (`router_aux_loss_coef` from the
# checkpoint's config) to the language-model loss. For DeepSeek-V3
# checkpoints the router's `expert_bias` (transformers'
# `e_score_correction_bias`) is updated by aux-loss-free balancing during
# training, and exported back.

# %%
import tensorflow as tf

train_texts = paragraphs[: 8 * STEPS_PER_EPOCH]
dataset = tf.data.Dataset.from_tensor_slices(train_texts).batch(8)
history = model.fit(dataset, epochs=EPOCHS, verbose=2)
losses = history.history["loss"]
print(f"training loss: {losses[0]:.3f} (epoch 1) -> {losses[-1]:.3f} (epoch {EPOCHS})")

# %%
print(model.generate("The while statement", max_length=SEQUENCE_LENGTH))

# %% [markdown]
# ## 5. Export back to Hugging Face format
#
# `to_transformers` writes `config.json`, the weights as safetensors (one
# tensor per expert, the layout of the family's checkpoints on the Hub,
# sharded above `max_shard_size`) and the tokenizer. `transformers` loads the
# directory and computes the fine-tuned model's logits.

# %%
export_dir = checkpoint_dir.parent / "tiny-mixtral-finetuned"
convert.to_transformers(model, export_dir)
print(sorted(os.listdir(export_dir)))

difference = compare(keras_logits(model), transformers_logits(export_dir))
print(f"max |logits difference| after export: {difference:.2e}")
assert difference < 1e-4

# %% [markdown]
# ## What converts, and what does not
#
# | `model_type` | keras-moe model |
# |---|---|
# | `mixtral` | GQA + RoPE, `SparseMoE` in every layer, softmax top-k renormalised |
# | `qwen2_moe` | q/k/v biases, `SharedExpertMoE` with a sigmoid-gated shared expert, `norm_topk_prob`, dense layers from `mlp_only_layers` / `decoder_sparse_step` |
# | `qwen3_moe` | per-head q/k RMSNorm, `norm_topk_prob`, `mlp_only_layers` |
# | `deepseek_v2` | multi-head latent attention (YaRN RoPE), `greedy` or `group_limited_greedy` (`n_group`, `topk_group`: `group_score="max"`) softmax top-k times `routed_scaling_factor`, shared experts, `first_k_dense_replace` dense layers |
# | `deepseek_v3` | MLA with query LoRA and YaRN RoPE, sigmoid group-limited routing with `e_score_correction_bias` as the router's `expert_bias`, `routed_scaling_factor`, shared experts, the multi-token prediction layer (`num_mtp_layers`) when the checkpoint holds it |
# | `olmoe` | q/k RMSNorm over the whole projection (`qk_norm_per_head=False`), `clip_qkv`, 64 experts top-8 without renormalisation |
# | `glm4_moe` | q/k/v biases, partial RoPE (`partial_rotary_factor`), optional q/k norm, DeepSeek-V3 routing and shared experts (its multi-token prediction layer is skipped) |
# | `dbrx` | fused `Wqkv` split into q, k, v with `clip_qkv`, LayerNorm without bias (`norm_type="layer"`), fused expert tensors read row range by row range |
# | `gpt_oss` | attention sinks, alternating sliding-window / full attention, biases, YaRN RoPE, router bias, clamped SwiGLU; MXFP4 experts dequantized on load, one expert at a time |
# | `llama4_text`, `llama4` | chunked attention, NoPE layers with temperature tuning, q/k L2 norm, llama3 RoPE, top-1 sigmoid routing weighting the expert inputs, a shared expert; `llama4` reads `text_config` and leaves the vision encoder out |
# | `switch_transformers` | the T5 encoder-decoder as a `SwitchSeq2SeqLM`: relative position buckets, cross-attention, Switch layers every sparse step, T5's SentencePiece tokenizer |
#
# Sliding windows (`sliding_window`, Qwen's `use_sliding_window` and
# `layer_types`) are reproduced in training, in the full forward pass and in
# cached decoding. Refused with an error naming the field: RoPE scaling the
# family does not use (`rope_scaling`), quantized weights other than
# GPT-OSS's MXFP4 experts (`quantization_config`, e.g. DeepSeek-V3's FP8
# release: dequantize to bfloat16 first), DBRX's
# `moe_normalize_expert_weights` other than 1, and pickled `.bin` weights,
# which are never unpickled. Grok-1 has a preset (`grok_1`) with its
# published shapes but no conversion: it has no standard checkpoint format.
# Load large checkpoints with
# `dtype="bfloat16"`, and under a `keras.distribution` layout
# (`keras_moe.distribution.get_layout_map`) when one device cannot hold them.
