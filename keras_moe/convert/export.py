"""`to_transformers`: write a model as a Hugging Face checkpoint."""

import json
import os

import keras
import numpy as np

from keras_moe.convert import registry
from keras_moe.convert.checkpoint import CONFIG_FILE
from keras_moe.convert.checkpoint import INDEX_FILE
from keras_moe.convert.checkpoint import SINGLE_FILE
from keras_moe.convert.weight_mapping import weight_mappings

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def infer_model_type(backbone):
    """The transformers `model_type` that can hold a `MoEBackbone`.

    Each registered family says whether it describes the backbone (see
    `keras_moe.convert.registry.family_of`): MLA attention is DeepSeek
    (`deepseek_v3` with sigmoid routing, `deepseek_v2` with softmax). GQA
    with LayerNorm is `dbrx`, with attention sinks `gpt_oss`, with routing
    weights on the expert inputs `llama4_text`, with sigmoid routing
    `glm4_moe`; otherwise GQA with per-head q/k norm is `qwen3_moe`, with
    projection-wide q/k norm `olmoe`, with shared experts `qwen2_moe`, and
    plain GQA is `mixtral`.

    Args:
        backbone: a `MoEBackbone`.

    Returns:
        A `model_type` string.

    Example:

    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=2, top_k=1, moe_intermediate_dim=4)
    >>> infer_model_type(backbone)
    'mixtral'
    """
    return registry.family_of(backbone).model_type


def _family(backbone, model_type):
    if model_type is None:
        return registry.family_of(backbone)
    return registry.lookup(model_type)


def transformers_config(backbone, model_type=None):
    """The transformers `config.json` dict describing a `MoEBackbone`.

    Args:
        backbone: a `MoEBackbone`.
        model_type: one of `SUPPORTED_MODEL_TYPES`, or `None` to infer it
            (`infer_model_type`).

    Returns:
        A JSON-serializable dict.

    Raises:
        ConversionError: if the family cannot express the model (the
            message says which setting).

    Example:

    >>> from keras_moe import presets
    >>> config = transformers_config(presets.load("mixtral_small").backbone)
    >>> config["model_type"], config["architectures"]
    ('mixtral', ['MixtralForCausalLM'])
    """
    return _family(backbone, model_type).transformers_config(backbone)


def _tensors(mapping):
    """`(name, array)` pairs of one mapping, in checkpoint layout."""
    value = keras.ops.convert_to_numpy(mapping.variable)
    if mapping.kind == "experts":
        for j, name in enumerate(mapping.names):
            yield name, np.ascontiguousarray(mapping.to_checkpoint(value[j]))
    else:
        yield mapping.names[0], np.ascontiguousarray(mapping.to_checkpoint(value))


def to_transformers(
    model, directory, *, model_type=None, max_shard_size=DEFAULT_MAX_SHARD_BYTES
):
    """Write a model as a Hugging Face checkpoint that transformers loads.

    Writes `config.json` and the weights as safetensors (one
    `model.safetensors`, or shards of at most `max_shard_size` bytes with a
    `model.safetensors.index.json`), in the layout of the family's
    checkpoints on the Hub (one tensor per expert), so
    `AutoModelForCausalLM.from_pretrained(directory)` computes the same
    logits. GPT-OSS experts are written stacked, in float (not MXFP4).
    With a preprocessor, `config.json` holds its tokenizer's special token
    ids; a `HuggingFaceTokenizer` also writes its `tokenizer.json` and a
    `tokenizer_config.json`, and a Switch model's SentencePiece tokenizer
    its `spiece.model`.

    Weights are written in their dtype. Shards are written one at a time:
    at most one shard's tensors are held in memory in checkpoint layout.
    Transformers routes dropless: a model trained with a `capacity_factor`
    gives the logits of its dropless routing once exported.

    Args:
        model: a `MoECausalLM` or a `MoEBackbone`, or a `SwitchSeq2SeqLM`
            or `SwitchEncoderDecoderBackbone` (written as a
            `switch_transformers` checkpoint).
        directory: the output directory (created if needed).
        model_type: one of `SUPPORTED_MODEL_TYPES`, or `None` to infer it
            from the architecture (see `infer_model_type`).
        max_shard_size: int, the most bytes of tensors per file.

    Raises:
        ConversionError: if the model uses settings the family cannot
            express (the message names them).

    Example:

    >>> import json, os, tempfile
    >>> from keras_moe import convert, presets
    >>> model = presets.load("mixtral_small", preprocessor=None, num_layers=1)
    >>> directory = tempfile.mkdtemp()
    >>> convert.to_transformers(model, directory)
    >>> sorted(os.listdir(directory))
    ['config.json', 'model.safetensors']
    """
    from safetensors.numpy import save_file

    backbone = getattr(model, "backbone", model)
    family = _family(backbone, model_type)
    config = family.transformers_config(backbone)
    tokenizer = getattr(getattr(model, "preprocessor", None), "tokenizer", None)
    if tokenizer is not None:
        config.update(family.special_token_ids(tokenizer))
    if hasattr(family, "weight_mappings"):  # a family of its own backbone class
        mappings = family.weight_mappings(backbone)
    else:
        mappings = weight_mappings(backbone, family)
    os.makedirs(directory, exist_ok=True)

    shards, current, current_bytes = [], {}, 0
    weight_map = {}
    total_bytes = 0

    def flush():
        nonlocal current, current_bytes
        if current:
            index = len(shards) + 1
            file_name = f"model-{index:05d}.safetensors"
            save_file(current, os.path.join(directory, file_name), {"format": "pt"})
            shards.append(file_name)
            for name in current:
                weight_map[name] = file_name
        current, current_bytes = {}, 0

    # Tensors a family's checkpoints store more than once (DeepSeek-V3's
    # multi-token prediction layer copies the embedding and output head).
    copies = {}
    if hasattr(family, "tensor_copies"):
        copies = family.tensor_copies(backbone)
    tensors = (pair for mapping in mappings for pair in _tensors(mapping))
    for name, tensor in family.stored_tensors(backbone, tensors):
        for stored_name in [name, *copies.get(name, ())]:
            if current and current_bytes + tensor.nbytes > max_shard_size:
                flush()
            current[stored_name] = tensor
            current_bytes += tensor.nbytes
            total_bytes += tensor.nbytes
    flush()
    if len(shards) == 1:
        os.replace(
            os.path.join(directory, shards[0]), os.path.join(directory, SINGLE_FILE)
        )
    else:
        count = len(shards)
        renamed = {}
        for index, file_name in enumerate(shards, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(directory, file_name), os.path.join(directory, final))
            renamed[file_name] = final
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {name: renamed[file] for name, file in weight_map.items()},
        }
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as file:
            json.dump(index, file, indent=2)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    family.write_tokenizer(tokenizer, backbone, directory)
