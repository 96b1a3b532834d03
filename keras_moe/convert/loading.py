"""`from_transformers`: a `MoECausalLM` from a Hugging Face checkpoint."""

import gc
import re
import warnings
from pathlib import Path

import keras
import ml_dtypes
import numpy as np

from keras_moe import models
from keras_moe.backend import keras_internals
from keras_moe.convert import hub
from keras_moe.convert import registry
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import read_config
from keras_moe.convert.tokenizer import HuggingFaceTokenizer
from keras_moe.convert.weight_mapping import weight_mappings
from keras_moe.models.memory import check_fits_in_memory

# Tensors a checkpoint may hold that the model does not use: rotary
# frequency buffers (recomputed) and multi-token prediction layers after
# the last decoder layer (DeepSeek-V3 has one).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
# Overrides that change neither the architecture nor the weights.
CHECKPOINT_OVERRIDES = ("dtype", "dropout", "moe_options", "mtp_loss_weight")
DEFAULT_SEQUENCE_LENGTH = 1024


def from_transformers(
    path, preprocessor="default", *, check_memory=True, **overrides
):
    """Load a Hugging Face checkpoint as a `MoECausalLM`, ready to fit.

    `path` is a directory holding `config.json` and safetensors weights
    (`model.safetensors`, or shards listed in `model.safetensors.index.json`),
    or an `hf://org/name` handle, which is downloaded through
    `huggingface_hub` and then read the same way. The `model_type` in
    `config.json` picks the family that converts it (see
    `keras_moe.convert.registry`; `SUPPORTED_MODEL_TYPES`: `dbrx`,
    `deepseek_v2`, `deepseek_v3`, `glm4_moe`, `gpt_oss`, `llama4`,
    `llama4_text`, `mixtral`, `olmoe`, `qwen2_moe`, `qwen3_moe`,
    `switch_transformers`), and
    `backbone_config_from_transformers` says how each maps onto
    `MoEBackbone`.

    Every file's header is checked first (a truncated file is refused before
    the model is built); then weights are read one tensor at a time, staged
    in the dtype of the variable they go to (a bfloat16 checkpoint loaded
    with `dtype="bfloat16"` is never widened to float32) and assigned
    (stacked expert kernels are filled expert by expert), so the checkpoint
    is never held in memory beside the model: loading needs the model's
    weights plus about two copies of its largest variable (see
    `keras_moe.models.memory.loading_memory_bytes`). Only safetensors are
    read: pickled `.bin` checkpoints are refused.

    Args:
        path: a checkpoint directory (str or path) or `hf://org/name`.
        preprocessor: `"default"` attaches a `MoECausalLMPreprocessor` with
            a `HuggingFaceTokenizer` when the checkpoint has a
            `tokenizer.json` (none otherwise); `None` gives a model that
            takes token ids; a preprocessor instance is attached as is.
        check_memory: bool, refuse (`PresetTooLargeError`) a checkpoint whose
            weights do not fit in the available memory, before building.
        **overrides: `dtype` (the model's dtype policy, e.g. `"bfloat16"`;
            default: the Keras default), `dropout`, and `moe_options`
            (merged into the converted options, e.g.
            `{"capacity_factor": 1.25}` to train with capacity limits; the
            default is dropless routing, as in transformers), and
            `mtp_loss_weight` (the loss weight of DeepSeek-V3's multi-token
            prediction layer, when the checkpoint holds it).

    Returns:
        A `keras_moe.models.MoECausalLM`, not compiled; for a
        `switch_transformers` (encoder-decoder) checkpoint, a
        `keras_moe.models.SwitchSeq2SeqLM` (see
        `keras_moe.convert.families.switch_transformers`).

    Raises:
        ConversionError: for an unsupported `model_type`, a config field
            keras-moe cannot reproduce, a missing tensor or one of the wrong
            shape (each named), or a checkpoint with pickled weights only.
        FileNotFoundError: for a directory without `config.json`.
        PresetTooLargeError: if the weights cannot fit in memory.

    Example:

    >>> import tempfile
    >>> from keras_moe import convert, presets
    >>> model = presets.load("mixtral_small", preprocessor=None, num_layers=1)
    >>> directory = tempfile.mkdtemp()
    >>> convert.to_transformers(model, directory)
    >>> loaded = convert.from_transformers(directory, preprocessor=None)
    >>> loaded.backbone.num_experts == model.backbone.num_experts
    True
    """
    _check_overrides(overrides)
    directory = _local_directory(path)
    hf_config = read_config(directory)
    family = registry.lookup(hf_config.get("model_type"))
    _check_unquantized(hf_config, family)
    if hasattr(family, "load_model"):
        # Encoder-decoder families (Switch Transformer) build their own
        # task model; the rest of this function is for `MoEBackbone`s.
        return family.load_model(
            directory, hf_config, preprocessor, check_memory=check_memory, **overrides
        )
    backbone_config = backbone_config_from_transformers(hf_config)
    _apply_overrides(backbone_config, overrides)

    checkpoint = family.open_checkpoint(directory)
    if backbone_config.get("num_mtp_layers"):
        backbone_config["num_mtp_layers"] = _stored_mtp_layers(
            backbone_config, checkpoint
        )
    try:
        if check_memory:
            check_fits_in_memory(
                f"The checkpoint in {str(path)!r}",
                checkpoint.num_elements(),
                backbone_config.get("dtype"),
                largest_params=checkpoint.largest_variable_size(),
            )
        with _values_from_checkpoint() as deferred:
            backbone = deferred.build(backbone_config)
            load_weights(backbone, checkpoint, family)
    finally:
        checkpoint.close()

    if isinstance(preprocessor, str):
        if preprocessor != "default":
            raise ValueError(
                "`preprocessor` must be 'default', None or a preprocessor. "
                f"Received: preprocessor={preprocessor!r}"
            )
        preprocessor = None
        tokenizer = HuggingFaceTokenizer.from_checkpoint(directory, hf_config)
        if tokenizer is not None:
            preprocessor = models.MoECausalLMPreprocessor(
                tokenizer, sequence_length=DEFAULT_SEQUENCE_LENGTH
            )
    return models.MoECausalLM(backbone=backbone, preprocessor=preprocessor)


def backbone_config_from_transformers(hf_config):
    """The `MoEBackbone` arguments equivalent to a transformers config.

    The config's `model_type` picks the family (`registry.lookup`). Routing
    is dropless (`capacity_factor=None`, as in transformers) with the
    family's scoring: softmax then renormalised top-k (Mixtral), softmax
    top-k renormalised only with `norm_topk_prob` (Qwen-MoE), greedy or
    group-limited greedy softmax top-k times `routed_scaling_factor`
    (DeepSeek-V2; a group scores its best expert), sigmoid scores with
    group-limited selection over scores plus `e_score_correction_bias`
    (DeepSeek-V3, whose bias is the router's non-trainable `expert_bias`,
    and GLM-4.5); softmax top-k not renormalised (OLMoE) or renormalised
    (DBRX's `moe_normalize_expert_weights=1`).
    DeepSeek's YaRN `rope_scaling` is kept (`MoEBackbone(rope_scaling=...)`);
    any other RoPE scaling is refused.
    Fine-tuning options are set from the config where it has them
    (`router_aux_loss_coef` -> `aux_loss_weight`); DeepSeek-V3 gets
    aux-loss-free bias balancing (`bias_update_rate=0.001`) and a 1e-4
    sequence-wise balance loss, as in its paper.

    Args:
        hf_config: dict, the contents of a transformers `config.json`.

    Returns:
        A dict of `MoEBackbone` keyword arguments.

    Raises:
        ConversionError: for an unsupported `model_type`, a missing field or
            a setting keras-moe models cannot reproduce (the message names
            the field).

    Example:

    >>> config = backbone_config_from_transformers({
    ...     "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    ...     "intermediate_size": 14336, "num_hidden_layers": 32,
    ...     "num_attention_heads": 32, "num_key_value_heads": 8,
    ...     "num_local_experts": 8, "num_experts_per_tok": 2,
    ...     "rope_theta": 1e6, "rms_norm_eps": 1e-5})
    >>> config["num_experts"], config["moe_intermediate_dim"], config["moe_options"]["capacity_factor"]
    (8, 14336, None)
    """
    return registry.lookup(hf_config.get("model_type")).backbone_config(hf_config)


def _check_overrides(overrides):
    unknown = [key for key in overrides if key not in CHECKPOINT_OVERRIDES]
    if unknown:
        raise ValueError(
            f"Overrides {', '.join(map(repr, unknown))} cannot be applied to "
            "a Hugging Face checkpoint: its config and weights fix the "
            f"architecture. Accepted: {', '.join(CHECKPOINT_OVERRIDES)}."
        )


def _apply_overrides(backbone_config, overrides):
    for key, value in overrides.items():
        if key == "moe_options":
            if not isinstance(value, dict):
                raise ValueError(
                    f"`moe_options` must be a dict. Received: moe_options={value!r}"
                )
            value = {**backbone_config["moe_options"], **value}
        backbone_config[key] = value


def _local_directory(path):
    if hub.is_hub_handle(path):
        return hub.download(path)
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory.")
    return directory


def _check_unquantized(hf_config, family):
    quantization = hf_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown")
        if method in family.dequantized_methods:
            return  # The family's checkpoint reader dequantizes them.
        raise ConversionError(
            "config.json has a `quantization_config` "
            f"(quant_method={method!r}): quantized weights are not converted. "
            "Use a checkpoint in bfloat16/float16/float32 (DeepSeek publishes "
            "scripts that dequantize its FP8 weights to bfloat16)."
        )


def _numpy_dtype(variable):
    """The NumPy dtype of the variable's values (`ml_dtypes` for bfloat16 and
    float8), so a tensor is staged in the dtype it will be stored in."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return np.dtype(getattr(ml_dtypes, dtype, None) or dtype)


def _copy_into(destination, source):
    """`destination[...] = source`, casting (round to nearest even) if the
    dtypes differ; same-dtype copies move raw bits, which NumPy does much
    faster than element-wise copies of `ml_dtypes` values."""
    if source.dtype == destination.dtype and source.dtype.itemsize in (1, 2, 4, 8):
        bits = np.dtype(f"u{source.dtype.itemsize}")
        np.copyto(destination.view(bits), source.view(bits))
    else:
        np.copyto(destination, source, casting="unsafe")


def _staged(array, dtype):
    """`array` as a C-contiguous array of `dtype`: itself when it is one."""
    if array.dtype == dtype and array.flags.c_contiguous:
        return array
    staged = np.empty(array.shape, dtype=dtype)
    _copy_into(staged, array)
    return staged


def _assign(variable, value):
    """Give `variable` the NumPy array `value`, staged in its dtype.

    A variable built without an initial value (see
    `_values_from_checkpoint`) is created from `value`; another one is
    assigned it. Keras' PyTorch backend converts bfloat16 NumPy arrays
    through float32 (PyTorch has no NumPy bfloat16): the same bits are
    viewed as a PyTorch bfloat16 tensor instead.
    """
    if keras.backend.backend() == "torch" and value.dtype == ml_dtypes.bfloat16:
        import torch

        value = torch.from_numpy(value.view(np.uint16)).view(torch.bfloat16)
    if _is_deferred(variable):
        variable._initialize(variable._convert_to_tensor(value, dtype=variable.dtype))
        variable._initializer = None
    else:
        variable.assign(value)
    _wait_until_ready([variable])


# Keras' list of variables created in a `StatelessScope` without a value
# (`keras.src.backend.common.variables.register_uninitialized_variable`).
_UNINITIALIZED = "uninitialized_variables"


def _is_deferred(variable):
    return getattr(variable, "_value", True) is None and (
        getattr(variable, "_initializer", None) is not None
    )


class _values_from_checkpoint:
    """Build a backbone whose weights get their first value from the checkpoint.

    A backbone built normally draws a random initial value for every
    weight, only for conversion to overwrite it: the model's memory is
    allocated (and on JAX, initializers queued with their temporaries)
    before the first tensor is read, and peak memory is the model plus
    those temporaries. Inside `keras.StatelessScope(initialize_variables=
    False)`, Keras creates variables without a value (as it does for
    variables created while tracing); `_assign` creates each from its
    tensor instead, so the model's memory grows one variable at a time as
    the checkpoint is read. Variables the checkpoint does not hold (random
    seed states) are initialized as usual at the end, and a load that fails
    leaves no variable in Keras' list of variables to initialize.

    Falls back to a normal build when a stateless scope is already active.
    """

    def __enter__(self):
        self._state = keras_internals.global_state
        self._variables = []
        return self

    def build(self, backbone_config):
        """A `MoEBackbone` of `backbone_config`, built without initial values."""
        if self._state.get_global_attribute("stateless_scope") is not None:
            return models.MoEBackbone(**backbone_config)
        before = len(self._pending())
        with keras.StatelessScope(initialize_variables=False):
            backbone = models.MoEBackbone(**backbone_config)
        self._variables = self._pending()[before:]
        return backbone

    def _pending(self):
        return list(self._state.get_global_attribute(_UNINITIALIZED) or [])

    def __exit__(self, error_type, error, traceback):
        mine = {id(variable) for variable in self._variables}
        others = [v for v in self._pending() if id(v) not in mine]
        self._state.set_global_attribute(_UNINITIALIZED, others)
        if error_type is None:
            for variable in self._variables:
                if _is_deferred(variable):  # Not in the checkpoint.
                    variable._deferred_initialize()
        return False


def _wait_until_ready(variables):
    """Wait for JAX's asynchronous work on the variables' values to finish.

    JAX returns from initializers and transfers before they run; until they
    do, their inputs and temporaries stay allocated. Waiting keeps one
    variable's staging alive at a time instead of a queue of them.
    """
    if keras.backend.backend() == "jax":
        import jax

        # (A variable without a value would draw one when read.)
        values = [v.value for v in variables if not _is_deferred(v)]
        jax.block_until_ready(values)


def check_tensors(mappings, checkpoint):
    """Every tensor the model needs is present, with the shape it needs.

    Only the file headers are read.

    Raises:
        ConversionError: naming the first missing tensors, or each tensor
            whose shape differs (with both shapes and the Keras weight).
    """
    missing, wrong = [], []
    for mapping in mappings:
        expected = mapping.checkpoint_shape()
        for name in mapping.names:
            if name not in checkpoint:
                missing.append(name)
                continue
            shape = tuple(checkpoint.shape(name))
            if shape != expected:
                wrong.append(
                    f"`{name}` has shape {list(shape)} but the config needs "
                    f"{list(expected)} (for `{mapping.variable.path}`)"
                )
    if missing:
        shown = ", ".join(f"`{name}`" for name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ConversionError(
            f"The checkpoint in {str(checkpoint.directory)!r} is missing "
            f"{len(missing)} tensor(s) that its config.json describes: "
            f"{shown}{more}."
        )
    if wrong:
        raise ConversionError(
            f"The checkpoint in {str(checkpoint.directory)!r} does not match "
            "its config.json: " + "; ".join(wrong) + "."
        )


def load_weights(backbone, checkpoint, family):
    """Assign a checkpoint's tensors to a built `MoEBackbone`, one at a time.

    Args:
        backbone: a `MoEBackbone` built from the checkpoint's config.
        checkpoint: a `SafetensorsCheckpoint`.
        family: the checkpoint's `Family` (`registry.lookup(model_type)`).

    Raises:
        ConversionError: for missing tensors and tensors of the wrong shape
            (checked before any weight is assigned).
    """
    mappings = weight_mappings(backbone, family)
    check_tensors(mappings, checkpoint)
    # The initial values' computations hold temporaries until they finish,
    # and building leaves garbage in reference cycles: free both before
    # staging any tensor.
    _wait_until_ready(backbone.weights)
    gc.collect()
    for mapping in mappings:
        variable = mapping.variable
        dtype = _numpy_dtype(variable)
        if mapping.kind == "experts":
            # One expert's tensor at a time into the stacked kernel, staged
            # in the variable's dtype.
            value = np.empty(tuple(variable.shape), dtype=dtype)
            for j, name in enumerate(mapping.names):
                _copy_into(value[j], mapping.to_keras(checkpoint.get(name)))
        else:
            (name,) = mapping.names
            value = _staged(mapping.to_keras(checkpoint.get(name)), dtype)
        _assign(variable, value)
        del value
    used = set(checkpoint.read_names)
    if backbone.tie_word_embeddings:
        used.add("lm_head.weight")  # Some tied checkpoints store it anyway.
    _warn_unused(checkpoint, used, backbone.num_layers)


def _stored_mtp_layers(backbone_config, checkpoint):
    """How many of the config's multi-token prediction layers are stored.

    They follow the decoder layers (DeepSeek-V3: `num_nextn_predict_layers`
    layers from index `num_hidden_layers`); checkpoints saved by
    transformers, whose model has none, leave them out.
    """
    num_layers = backbone_config["num_layers"]
    stored = set()
    for name in checkpoint.keys():
        layer = _LAYER_INDEX.match(name)
        if layer:
            stored.add(int(layer.group(1)))
    count = 0
    while count < backbone_config["num_mtp_layers"] and num_layers + count in stored:
        count += 1
    return count


def _warn_unused(checkpoint, used, num_layers):
    unused = []
    for name in checkpoint.keys():
        if name in used or _IGNORED.match(name):
            continue
        layer = _LAYER_INDEX.match(name)
        if layer and int(layer.group(1)) >= num_layers:
            continue  # Multi-token prediction layers.
        unused.append(name)
    if unused:
        shown = ", ".join(unused[:10])
        more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
        warnings.warn(
            f"{len(unused)} tensor(s) of the checkpoint were not used: "
            f"{shown}{more}.",
            stacklevel=3,
        )
