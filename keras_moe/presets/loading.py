"""`load`: a ready-to-fit `MoECausalLM` from a preset name or directory."""

import difflib
import inspect
import json
import os
from pathlib import Path

from keras_moe import models
from keras_moe.convert import from_transformers
from keras_moe.convert import hub
from keras_moe.models.memory import check_fits_in_memory
from keras_moe.presets.parameter_count import count_params
from keras_moe.presets.preset_registry import info
from keras_moe.presets.preset_registry import names
from keras_moe.presets.switch_parameter_count import is_switch_config

# Files a keras-hub preset directory needs: the backbone config, and its
# weights in one file or sharded (an index plus the shards it lists).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
# Keys that mark a `config.json` written by Hugging Face `transformers`.
HUGGING_FACE_KEYS = ("model_type", "architectures")
# Presets whose name now means another model: old name -> new name.
RENAMED_PRESETS = {"switch_small": "switch_decoder_small"}


def load(
    name_or_dir, preprocessor="default", *, check_memory=True, **overrides
):
    """Build a `MoECausalLM` from a preset name, a directory or `hf://` handle.

    A name builds a fresh, randomly initialised model with the preset's
    config (`config(name)`), changed by `overrides`. A directory holds a
    model saved with `model.save_to_preset(directory)` and comes back with
    its weights. A directory holding a Hugging Face checkpoint (a
    transformers `config.json` and safetensors weights), or an
    `hf://org/name` handle, is converted by
    `keras_moe.convert.from_transformers` (every `model_type` of
    `keras_moe.convert.SUPPORTED_MODEL_TYPES`: Mixtral, Qwen-MoE, DeepSeek,
    OLMoE, GLM-4.5, DBRX, GPT-OSS, Llama 4 and Switch Transformer).

    Switch Transformer encoder-decoders (the `switch_base_*`,
    `switch_large_128`, `switch_xxl_128`, `switch_c_2048` and
    `switch_t5_small` presets, and `switch_transformers` checkpoints) come
    back as a `keras_moe.models.SwitchSeq2SeqLM` instead, with a
    `SwitchSeq2SeqLMPreprocessor` (byte-level for `switch_t5_small`) and
    `SwitchEncoderDecoderBackbone` overrides.

    Before building, the weights' size in the chosen dtype is compared with
    the free memory of the accelerator they go to, or of the host (see
    `available_memory`): a model that cannot fit raises
    `PresetTooLargeError` (a `MemoryError`) at once, saying how many GiB it
    needs and how to shard it, instead of running out of memory halfway.

    Args:
        name_or_dir: a preset name (see `names()`), the path of a
            directory written by `save_to_preset` or of a Hugging Face
            checkpoint, or `hf://org/name` (downloaded with
            `huggingface_hub`).
        preprocessor: `"default"` attaches the preset's preprocessor: the
            byte-level `MoECausalLMPreprocessor` (with the preset's training
            `sequence_length`) for presets that ship the byte tokenizer, the
            saved one for a directory, none for full-size presets (their
            tokenizers come with checkpoint conversion). `None` gives a model
            that takes token ids: `{"token_ids", "padding_mask"}`. A
            preprocessor instance is attached as it is.
        check_memory: bool, whether to refuse models whose weights do not
            fit in the available memory. Defaults to True.
        **overrides: `MoEBackbone` config entries replacing the preset's,
            e.g. `num_layers=2` or `dtype="bfloat16"`. A `moe_options` dict
            is merged into the preset's options. For a directory only
            `dtype` can be given; for a Hugging Face checkpoint `dtype`,
            `dropout` and `moe_options`.

    Returns:
        A `keras_moe.models.MoECausalLM`, not compiled.

    Raises:
        ValueError: for an unknown preset name (the message lists the close
            matches) or an override that is not a `MoEBackbone` argument
            (the message names it).
        FileNotFoundError: for a directory that lacks files `load` needs
            (the message names them).
        keras_moe.convert.ConversionError: for a Hugging Face checkpoint
            that cannot be converted (the message names the field or
            tensor).
        PresetTooLargeError: if the weights cannot fit in memory.

    Example:

    >>> from keras_moe import presets
    >>> model = presets.load("mixtral_small", num_layers=1)
    >>> output = model.generate("def ", max_length=12)
    >>> isinstance(output, str)
    True
    >>> model = presets.load("mixtral_small", preprocessor=None, num_layers=1)
    >>> model.preprocessor is None
    True
    """
    if not isinstance(check_memory, bool):
        raise ValueError(
            "`check_memory` must be True or False. "
            f"Received: check_memory={check_memory!r}"
        )
    _check_preprocessor_argument(preprocessor)
    if hub.is_hub_handle(name_or_dir):
        return _load_hub(name_or_dir, preprocessor, check_memory, overrides)
    if isinstance(name_or_dir, os.PathLike) or (
        isinstance(name_or_dir, str) and name_or_dir not in names()
        and _looks_like_path(name_or_dir)
    ):
        return _load_directory(
            Path(name_or_dir), preprocessor, check_memory, overrides
        )
    if name_or_dir in RENAMED_PRESETS:
        raise ValueError(
            f"The preset {name_or_dir!r} is now named "
            f"{RENAMED_PRESETS[name_or_dir]!r} (a decoder-only model); the "
            "Switch Transformer encoder-decoders are the `switch_base_*`, "
            "`switch_large_128`, `switch_xxl_128`, `switch_c_2048` and "
            "`switch_t5_small` presets."
        )
    return _load_preset(name_or_dir, preprocessor, check_memory, overrides)


def _check_preprocessor_argument(preprocessor):
    if isinstance(preprocessor, str) and preprocessor != "default":
        raise ValueError(
            "`preprocessor` must be 'default', None or a preprocessor. "
            f"Received: preprocessor={preprocessor!r}"
        )


def _looks_like_path(text):
    return os.sep in text or "/" in text or os.path.exists(text)


def _load_preset(name, preprocessor, check_memory, overrides):
    record = info(name)
    if is_switch_config(record["backbone"]):
        return _load_switch_preset(record, preprocessor, check_memory, overrides)
    backbone_config = _apply_overrides(record, overrides, models.MoEBackbone)
    if check_memory:
        check_fits_in_memory(
            f"Preset {name!r}",
            count_params(backbone_config)["total"],
            backbone_config.get("dtype"),
        )
    backbone = models.MoEBackbone(**backbone_config)
    if isinstance(preprocessor, str):  # "default"
        preprocessor = None
        if record.get("tokenizer") == "byte":
            preprocessor = models.MoECausalLMPreprocessor(
                tokenizer=models.MoETokenizer(),
                sequence_length=record.get("training", {}).get(
                    "sequence_length", 1024
                ),
            )
    return models.MoECausalLM(backbone=backbone, preprocessor=preprocessor)


def _load_switch_preset(record, preprocessor, check_memory, overrides):
    """A `SwitchSeq2SeqLM` of a Switch Transformer encoder-decoder preset."""
    backbone_config = _apply_overrides(
        record, overrides, models.SwitchEncoderDecoderBackbone
    )
    if check_memory:
        check_fits_in_memory(
            f"Preset {record['name']!r}",
            count_params(backbone_config)["total"],
            backbone_config.get("dtype"),
        )
    backbone = models.SwitchEncoderDecoderBackbone(**backbone_config)
    if isinstance(preprocessor, str):  # "default"
        preprocessor = None
        if record.get("tokenizer") == "byte":
            training = record.get("training", {})
            preprocessor = models.SwitchSeq2SeqLMPreprocessor(
                tokenizer=models.MoETokenizer(),
                encoder_sequence_length=training.get("encoder_sequence_length", 512),
                decoder_sequence_length=training.get("sequence_length", 512),
            )
    return models.SwitchSeq2SeqLM(backbone=backbone, preprocessor=preprocessor)


def _accepted_keys(backbone_class, preset_config):
    signature = inspect.signature(backbone_class.__init__)
    keys = {
        name
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind is not parameter.VAR_KEYWORD
    }
    # `dtype` and `name` reach keras-hub's `Backbone` through `**kwargs`.
    return keys | set(preset_config) | {"dtype", "name"}


def _apply_overrides(record, overrides, backbone_class):
    backbone_config = dict(record["backbone"])
    accepted = _accepted_keys(backbone_class, backbone_config)
    unknown = [key for key in overrides if key not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(accepted), n=2)
            if close:
                options = " or ".join(map(repr, close))
                hints.append(f"{key!r}: did you mean {options}?")
        raise ValueError(
            f"Unknown override{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} for preset {record['name']!r}: "
            f"overrides must be `{backbone_class.__name__}` config keys. "
            + (" ".join(hints) + " " if hints else "")
            + f"Accepted keys: {', '.join(sorted(accepted))}."
        )
    for key, value in overrides.items():
        if key == "moe_options" and value is not None:
            if not isinstance(value, dict):
                raise ValueError(
                    "`moe_options` must be a dict or None. "
                    f"Received: moe_options={value!r}"
                )
            value = {**(backbone_config.get("moe_options") or {}), **value}
        backbone_config[key] = value
    return backbone_config


def _load_directory(directory, preprocessor, check_memory, overrides):
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{str(directory)!r} is neither a preset name nor an existing "
            f"directory. Preset names: {', '.join(names())}."
        )
    if _holds_hugging_face_checkpoint(directory):
        return _load_hugging_face(directory, preprocessor, check_memory, overrides)
    unknown = [key for key in overrides if key != "dtype"]
    if unknown:
        raise ValueError(
            f"Overrides {', '.join(map(repr, unknown))} cannot be applied to "
            f"the saved preset {str(directory)!r}: its weights fix the "
            "architecture. Only `dtype` can be given when loading a directory."
        )
    saved_config = _read_directory_config(directory)
    if check_memory:
        check_fits_in_memory(
            f"The preset in {str(directory)!r}",
            count_params(saved_config)["total"],
            overrides.get("dtype", saved_config["config"].get("dtype")),
        )
    kwargs = dict(overrides)
    if not isinstance(preprocessor, str):  # Not "default": None or given.
        kwargs["preprocessor"] = preprocessor
    if is_switch_config(saved_config["config"]):
        return models.SwitchSeq2SeqLM.from_preset(str(directory), **kwargs)
    return models.MoECausalLM.from_preset(str(directory), **kwargs)


def _holds_hugging_face_checkpoint(directory):
    try:
        with open(directory / CONFIG_FILE, encoding="utf-8") as file:
            saved_config = json.load(file)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(saved_config, dict) and any(
        key in saved_config for key in HUGGING_FACE_KEYS
    )


def _load_hugging_face(directory, preprocessor, check_memory, overrides):
    return from_transformers(
        directory, preprocessor, check_memory=check_memory, **overrides
    )


def _load_hub(handle, preprocessor, check_memory, overrides):
    """Download `hf://org/name`; load it as a checkpoint or a preset."""
    directory = hub.download(handle, patterns=[CONFIG_FILE])
    if _holds_hugging_face_checkpoint(directory):
        directory = hub.download(handle)
        return _load_hugging_face(directory, preprocessor, check_memory, overrides)
    # A keras-hub preset uploaded to the Hub: fetch all of it.
    directory = hub.download(handle, patterns=["*"])
    return _load_directory(directory, preprocessor, check_memory, overrides)


def _read_directory_config(directory):
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"The preset directory {str(directory)!r} is missing "
            f"{_quoted([CONFIG_FILE])}. A preset directory "
            "is written by `model.save_to_preset(directory)`. Found: "
            f"{_listing(directory)}."
        )
    with open(config_path, encoding="utf-8") as file:
        try:
            saved_config = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}")
    if not (
        isinstance(saved_config, dict)
        and isinstance(saved_config.get("config"), dict)
        and "class_name" in saved_config
    ):
        raise ValueError(
            f"{config_path} is not a keras-hub preset config (a serialized "
            "`MoEBackbone` with `class_name` and `config`). A preset directory "
            "is written by `model.save_to_preset(directory)`."
        )
    missing = _missing_weight_files(directory)
    if missing:
        raise FileNotFoundError(
            f"The preset directory {str(directory)!r} is missing "
            f"{_quoted(missing)}: the backbone weights that "
            f"{CONFIG_FILE} describes. Found: {_listing(directory)}."
        )
    return saved_config


def _missing_weight_files(directory):
    if (directory / WEIGHTS_FILE).is_file():
        return []
    index_path = directory / SHARDED_WEIGHTS_FILE
    if not index_path.is_file():
        return [WEIGHTS_FILE]
    # Sharded weights: every shard the index maps a weight to must exist.
    with open(index_path, encoding="utf-8") as file:
        index = json.load(file)
    shards = sorted(set((index.get("weight_map") or {}).values()))
    return [shard for shard in shards if not (directory / shard).is_file()]


def _quoted(files):
    return ", ".join(f"`{name}`" for name in files)


def _listing(directory):
    entries = sorted(path.name for path in directory.iterdir())
    return ", ".join(entries) if entries else "nothing (the directory is empty)"
