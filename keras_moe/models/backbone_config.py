"""`MoEBackbone` configuration: argument checks and the MoE layer pattern.

Kept apart from the backbone class so that code which reads a backbone
config without building one (the weight structure, the parameter counter,
checkpoint conversion) shares one set of rules with the backbone. The
attention arguments are checked in `attention_config`.
"""

import difflib
import inspect

import keras

from keras_moe.models.attention_config import attention_layer_types  # noqa: F401 (re-exported)
from keras_moe.models.attention_config import check_attention
from keras_moe.models.layer_normalization import NORM_TYPES
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_choice
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_optional_int
from keras_moe.utils.argument_validation import check_rate

# Arguments the backbone sets on its MoE layers; `moe_options` cannot.
RESERVED_MOE_OPTIONS = (
    "num_experts",
    "intermediate_dim",
    "top_k",
    "activation",
    "gated",
    "causal",
    "num_shared_experts",
    "shared_intermediate_dim",
    "shared_expert_gate",
    "name",
    "dtype",
)
# The `MoEBackbone` constructor arguments, in signature order: what
# `get_config()` returns besides keras-hub's own entries.
CONFIG_KEYS = (
    "vocabulary_size",
    "num_layers",
    "hidden_dim",
    "num_query_heads",
    "num_key_value_heads",
    "head_dim",
    "attention_type",
    "attention_bias",
    "use_qk_norm",
    "qk_norm_per_head",
    "clip_qkv",
    "partial_rotary_factor",
    "sliding_window",
    "attention_layer_types",
    "attention_sinks",
    "attention_output_bias",
    "attention_chunk_size",
    "nope_layers",
    "use_qk_l2_norm",
    "attention_temperature_floor_scale",
    "attention_temperature_scale",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "rope_interleave",
    "rope_scaling",
    "rope_max_wavelength",
    "intermediate_dim",
    "num_experts",
    "top_k",
    "moe_intermediate_dim",
    "num_shared_experts",
    "shared_intermediate_dim",
    "shared_expert_gate",
    "first_k_dense",
    "moe_layer_frequency",
    "moe_layers",
    "ffn_activation",
    "ffn_gated",
    "swiglu_alpha",
    "swiglu_limit",
    "moe_options",
    "layer_norm_epsilon",
    "norm_type",
    "tie_word_embeddings",
    "dropout",
    "num_mtp_layers",
    "mtp_loss_weight",
)


def is_moe_layer(layer_index, first_k_dense=0, moe_layer_frequency=1):
    """Whether decoder layer `layer_index` (0-based) is a MoE layer.

    The first `first_k_dense` layers are dense (DeepSeek's
    `first_k_dense_replace`); after them, layer `i` is MoE iff
    `(i + 1) % moe_layer_frequency == 0` (Qwen-MoE's `decoder_sparse_step`).

    Args:
        layer_index: int, the 0-based index of the decoder layer.
        first_k_dense: int, the number of leading dense layers.
        moe_layer_frequency: int >= 1, the period of MoE layers after them.

    Returns:
        A bool.

    Example:

    >>> [is_moe_layer(i, first_k_dense=1, moe_layer_frequency=2) for i in range(5)]
    [False, True, False, True, False]
    """
    return (
        layer_index >= first_k_dense
        and (layer_index + 1) % moe_layer_frequency == 0
    )


def moe_layer_flags(
    num_layers, first_k_dense=0, moe_layer_frequency=1, moe_layers=None
):
    """Whether each decoder layer is a MoE layer, as a list of bools.

    With `moe_layers` (a list of 0-based layer indices) exactly those layers
    are MoE; without it, `is_moe_layer` decides from `first_k_dense` and
    `moe_layer_frequency`.

    Args:
        num_layers: int, the number of decoder layers.
        first_k_dense: int, the number of leading dense layers.
        moe_layer_frequency: int >= 1, the period of MoE layers after them.
        moe_layers: list of int or None, the MoE layer indices.

    Returns:
        A list of `num_layers` bools.

    Example:

    >>> moe_layer_flags(4, first_k_dense=1)
    [False, True, True, True]
    >>> moe_layer_flags(4, moe_layers=[0, 3])
    [True, False, False, True]
    """
    if moe_layers is not None:
        chosen = set(moe_layers)
        return [i in chosen for i in range(num_layers)]
    return [
        is_moe_layer(i, first_k_dense, moe_layer_frequency)
        for i in range(num_layers)
    ]


def config_moe_layer_flags(config):
    """`moe_layer_flags` of a (checked) backbone config dict.

    Args:
        config: a dict of `MoEBackbone` arguments, as `validated_config`
            returns.

    Returns:
        A list of `num_layers` bools.

    Example:

    >>> config_moe_layer_flags({"num_layers": 3, "first_k_dense": 1,
    ...     "moe_layer_frequency": 1, "moe_layers": None})
    [False, True, True]
    """
    return moe_layer_flags(
        config["num_layers"],
        config["first_k_dense"],
        config["moe_layer_frequency"],
        config["moe_layers"],
    )


def validated_config(**config):
    """Check every `MoEBackbone` argument; return them normalized.

    Args:
        **config: every argument of `CONFIG_KEYS`.

    Returns:
        A new dict with ints, floats, bools and dicts in canonical form.

    Raises:
        ValueError: naming the argument that is wrong and why.

    Example:

    >>> from keras_moe.models.moe_backbone import MoEBackbone
    >>> import inspect
    >>> defaults = {name: parameter.default for name, parameter in
    ...     inspect.signature(MoEBackbone.__init__).parameters.items()
    ...     if name in CONFIG_KEYS}
    >>> config = validated_config(**dict(defaults, vocabulary_size=32,
    ...     num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     moe_intermediate_dim=4))
    >>> config["num_experts"], config["moe_options"]
    (8, None)
    """
    c = dict(config)
    for name in ("vocabulary_size", "num_layers", "hidden_dim", "num_query_heads"):
        c[name] = check_int(name, c[name], min_value=1)
    check_attention(c)
    c["rope_max_wavelength"] = check_float(
        "rope_max_wavelength", c["rope_max_wavelength"], positive=True
    )
    _check_experts(c)
    _check_feedforward_widths(c)
    c["ffn_gated"] = check_bool("ffn_gated", c["ffn_gated"])
    if not isinstance(c["ffn_activation"], str):
        raise ValueError(
            "`ffn_activation` must be an activation name. "
            f"Received: ffn_activation={c['ffn_activation']!r}"
        )
    keras.activations.get(c["ffn_activation"])
    _check_clamped_swiglu(c)
    c["moe_options"] = _checked_moe_options(c["moe_options"])
    c["norm_type"] = check_choice("norm_type", c["norm_type"], NORM_TYPES)
    c["layer_norm_epsilon"] = check_float(
        "layer_norm_epsilon", c["layer_norm_epsilon"], positive=True
    )
    c["tie_word_embeddings"] = check_bool(
        "tie_word_embeddings", c["tie_word_embeddings"]
    )
    c["dropout"] = check_rate("dropout", c["dropout"])
    c["num_mtp_layers"] = check_int(
        "num_mtp_layers", c["num_mtp_layers"], min_value=0
    )
    c["mtp_loss_weight"] = check_float("mtp_loss_weight", c["mtp_loss_weight"])
    return c


def _check_experts(c):
    c["num_experts"] = check_int("num_experts", c["num_experts"], min_value=1)
    c["top_k"] = check_int(
        "top_k", c["top_k"], min_value=1, max_value=c["num_experts"]
    )
    c["num_shared_experts"] = check_int(
        "num_shared_experts", c["num_shared_experts"], min_value=0
    )
    c["shared_intermediate_dim"] = check_optional_int(
        "shared_intermediate_dim", c["shared_intermediate_dim"]
    )
    c["shared_expert_gate"] = check_bool(
        "shared_expert_gate", c["shared_expert_gate"]
    )
    if c["num_shared_experts"] == 0:
        if c["shared_intermediate_dim"] is not None or c["shared_expert_gate"]:
            raise ValueError(
                "`shared_intermediate_dim` and `shared_expert_gate` need "
                "`num_shared_experts > 0`. Received: num_shared_experts=0, "
                f"shared_intermediate_dim={c['shared_intermediate_dim']}, "
                f"shared_expert_gate={c['shared_expert_gate']}"
            )
    c["first_k_dense"] = check_int(
        "first_k_dense", c["first_k_dense"], min_value=0, max_value=c["num_layers"]
    )
    c["moe_layer_frequency"] = check_int(
        "moe_layer_frequency", c["moe_layer_frequency"], min_value=1
    )
    c["moe_layers"] = _checked_moe_layers(c)


def _check_feedforward_widths(c):
    c["intermediate_dim"] = check_optional_int("intermediate_dim", c["intermediate_dim"])
    c["moe_intermediate_dim"] = check_optional_int(
        "moe_intermediate_dim", c["moe_intermediate_dim"]
    )
    moe_layers = config_moe_layer_flags(c)
    if not all(moe_layers) and c["intermediate_dim"] is None:
        dense = [i for i, moe in enumerate(moe_layers) if not moe]
        raise ValueError(
            f"`intermediate_dim` is required: layers {dense} are dense "
            f"(first_k_dense={c['first_k_dense']}, "
            f"moe_layer_frequency={c['moe_layer_frequency']}, "
            f"moe_layers={c['moe_layers']}). "
            "Received: intermediate_dim=None"
        )
    if any(moe_layers) and c["moe_intermediate_dim"] is None:
        raise ValueError(
            "`moe_intermediate_dim` (the width of each expert) is required "
            "when some layer is a MoE layer. Received: moe_intermediate_dim=None"
        )


def _checked_moe_options(moe_options):
    if moe_options is None:
        return None
    if not isinstance(moe_options, dict):
        raise ValueError(
            "`moe_options` must be a dict of MoE layer arguments or None. "
            f"Received: moe_options={moe_options!r}"
        )
    reserved = sorted(set(moe_options) & set(RESERVED_MOE_OPTIONS))
    if reserved:
        raise ValueError(
            f"`moe_options` cannot set {reserved}: the backbone sets them "
            "from its own arguments. "
            f"Received: moe_options={moe_options!r}"
        )
    accepted = moe_option_names()
    unknown = [key for key in moe_options if key not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), accepted, n=2)
            if close:
                hints.append(
                    f"{key!r}: did you mean {' or '.join(map(repr, close))}?"
                )
        raise ValueError(
            f"Unknown `moe_options` key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}: `moe_options` holds `SparseMoE` "
            "arguments. "
            + (" ".join(hints) + " " if hints else "")
            + f"Accepted keys: {', '.join(accepted)}. "
            f"Received: moe_options={moe_options!r}"
        )
    return dict(moe_options)


def moe_option_names():
    """The keys `moe_options` accepts, sorted.

    The keyword arguments of `SparseMoE` (which `SharedExpertMoE` passes
    on) and of the base Keras layer, less those the backbone sets itself
    (`RESERVED_MOE_OPTIONS`).

    Returns:
        A sorted list of str.

    Example:

    >>> "capacity_factor" in moe_option_names()
    True
    """
    # Imported here: the layers are not needed to read a config otherwise.
    from keras_moe.layers.sparse_moe import SparseMoE

    names = set()
    for function in (SparseMoE.__init__, keras.layers.Layer.__init__):
        names.update(
            name
            for name, parameter in inspect.signature(function).parameters.items()
            if name != "self"
            and parameter.kind
            in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        )
    return sorted(names - set(RESERVED_MOE_OPTIONS))


def _checked_moe_layers(c):
    moe_layers = c["moe_layers"]
    if moe_layers is None:
        return None
    num_layers = c["num_layers"]
    if not isinstance(moe_layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers
        for i in moe_layers
    ):
        raise ValueError(
            "`moe_layers` must be None or a list of layer indices in "
            f"[0, num_layers={num_layers}). Received: moe_layers={moe_layers!r}"
        )
    if len(set(moe_layers)) != len(moe_layers):
        raise ValueError(
            "`moe_layers` lists a layer more than once. "
            f"Received: moe_layers={moe_layers!r}"
        )
    if c["first_k_dense"] != 0 or c["moe_layer_frequency"] != 1:
        raise ValueError(
            "`moe_layers` replaces `first_k_dense` and `moe_layer_frequency`, "
            "which must keep their defaults (0 and 1) when it is given. "
            f"Received: moe_layers={moe_layers!r}, "
            f"first_k_dense={c['first_k_dense']}, "
            f"moe_layer_frequency={c['moe_layer_frequency']}"
        )
    return sorted(moe_layers)


def _check_clamped_swiglu(c):
    given = {
        name: c[name]
        for name in ("swiglu_alpha", "swiglu_limit")
        if c[name] is not None
    }
    if not given:
        return
    if len(given) != 2:
        raise ValueError(
            "`swiglu_alpha` and `swiglu_limit` (GPT-OSS's clamped SwiGLU) go "
            f"together. Received: swiglu_alpha={c['swiglu_alpha']}, "
            f"swiglu_limit={c['swiglu_limit']}"
        )
    for name in given:
        c[name] = check_float(name, c[name], positive=True)
    if c["ffn_activation"] != "silu" or not c["ffn_gated"]:
        raise ValueError(
            "The clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`) needs "
            "`ffn_activation='silu'` and `ffn_gated=True`. Received: "
            f"ffn_activation={c['ffn_activation']!r}, ffn_gated={c['ffn_gated']}"
        )
