"""`MoEBackbone` configuration: argument checks and the MoE layer pattern.

Kept apart from the backbone class so that code which reads a backbone
config without building one (the weight structure, the parameter counter,
checkpoint conversion) shares one set of rules with the backbone.
"""

import difflib
import inspect

import keras

from keras_moe.models.layer_normalization import NORM_TYPES
from keras_moe.models.rope_scaling import normalize_gqa_rope_scaling
from keras_moe.models.yarn import normalize_rope_scaling
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_choice
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int

ATTENTION_TYPES = ("gqa", "mla")
# The entries of `attention_layer_types`, named as transformers'
# `layer_types`: a layer that sees the whole prefix, the last
# `sliding_window` positions, or its own chunk of `attention_chunk_size`
# positions (Llama 4).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# Llama 4's attention options (GQA only), with their defaults.
LLAMA4_ATTENTION_DEFAULTS = {
    "attention_chunk_size": None,
    "nope_layers": None,
    "use_qk_l2_norm": False,
    "attention_temperature_floor_scale": None,
    "attention_temperature_scale": 0.1,
}
MLA_ARGUMENTS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
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


def _optional_int(name, value, min_value=1):
    return None if value is None else check_int(name, value, min_value=min_value)


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
    if c["attention_type"] not in ATTENTION_TYPES:
        raise ValueError(
            f"`attention_type` must be one of {ATTENTION_TYPES}. "
            f"Received: attention_type={c['attention_type']!r}"
        )
    c["attention_bias"] = check_bool("attention_bias", c["attention_bias"])
    c["use_qk_norm"] = check_bool("use_qk_norm", c["use_qk_norm"])
    _check_attention_options(c)
    c["num_key_value_heads"] = _optional_int(
        "num_key_value_heads", c["num_key_value_heads"]
    )
    c["head_dim"] = _optional_int("head_dim", c["head_dim"])
    for name in MLA_ARGUMENTS:
        c[name] = _optional_int(name, c[name])
    if c["attention_type"] == "gqa":
        _check_gqa(c)
    else:
        _check_mla(c)
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
    _check_llama4_attention(c)
    _check_sliding_window(c)
    c["moe_options"] = _checked_moe_options(c["moe_options"])
    c["norm_type"] = check_choice("norm_type", c["norm_type"], NORM_TYPES)
    c["layer_norm_epsilon"] = check_float(
        "layer_norm_epsilon", c["layer_norm_epsilon"], positive=True
    )
    c["tie_word_embeddings"] = check_bool(
        "tie_word_embeddings", c["tie_word_embeddings"]
    )
    c["dropout"] = check_float("dropout", c["dropout"])
    if c["dropout"] >= 1:
        raise ValueError(
            f"`dropout` must be in [0, 1). Received: dropout={c['dropout']}"
        )
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
    c["shared_intermediate_dim"] = _optional_int(
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
    c["intermediate_dim"] = _optional_int("intermediate_dim", c["intermediate_dim"])
    c["moe_intermediate_dim"] = _optional_int(
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


def _check_gqa(c):
    given = [name for name in MLA_ARGUMENTS if c[name] is not None]
    if c["rope_interleave"] is not None:
        given.append("rope_interleave")
    if given:
        raise ValueError(
            f"{given} only apply to `attention_type='mla'`. "
            "Received: attention_type='gqa'"
        )
    # YaRN (GPT-OSS) or llama3 (Llama 4); the layers always use rotate-half
    # RoPE.
    c["rope_scaling"] = normalize_gqa_rope_scaling(c["rope_scaling"])
    num_heads, num_kv_heads = c["num_query_heads"], c["num_key_value_heads"]
    if num_kv_heads is not None and num_heads % num_kv_heads:
        raise ValueError(
            f"`num_query_heads` ({num_heads}) must be divisible by "
            f"`num_key_value_heads`. Received: num_key_value_heads={num_kv_heads}"
        )
    head_dim = c["head_dim"]
    if head_dim is None:
        if c["hidden_dim"] % num_heads:
            raise ValueError(
                f"`hidden_dim` ({c['hidden_dim']}) must be divisible by "
                f"`num_query_heads` ({num_heads}) when `head_dim` is None. "
                f"Received: hidden_dim={c['hidden_dim']}"
            )
        head_dim = c["hidden_dim"] // num_heads
    if head_dim % 2:
        raise ValueError(
            f"The head width must be even for RoPE; got {head_dim} "
            f"(hidden_dim={c['hidden_dim']}, num_query_heads={num_heads}). "
            f"Received: head_dim={c['head_dim']}"
        )
    rotary_dim = int(head_dim * c["partial_rotary_factor"])
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(
            "`partial_rotary_factor` must leave an even number of rotated "
            f"features per head; int({head_dim} * "
            f"{c['partial_rotary_factor']}) = {rotary_dim}. "
            f"Received: partial_rotary_factor={c['partial_rotary_factor']}"
        )


def attention_layer_types(config):
    """The attention type of each layer of a (checked) backbone config.

    Args:
        config: a dict of `MoEBackbone` arguments, as `validated_config`
            returns.

    Returns:
        A list of `num_layers` entries of `ATTENTION_LAYER_TYPES`: the
        config's `attention_layer_types`, or else every layer
        `"sliding_attention"` with a `sliding_window`; with an
        `attention_chunk_size`, `"chunked_attention"` on the layers with
        RoPE and `"full_attention"` on the `nope_layers` (Llama 4's
        default); `"full_attention"` otherwise.

    Example:

    >>> attention_layer_types({"num_layers": 2, "sliding_window": 4,
    ...     "attention_layer_types": None})
    ['sliding_attention', 'sliding_attention']
    """
    if config.get("attention_layer_types") is not None:
        return list(config["attention_layer_types"])
    if config.get("attention_chunk_size") and not config.get("sliding_window"):
        nope = set(config.get("nope_layers") or ())
        return [
            "full_attention" if i in nope else "chunked_attention"
            for i in range(config["num_layers"])
        ]
    kind = "sliding_attention" if config.get("sliding_window") else "full_attention"
    return [kind] * config["num_layers"]


def _check_sliding_window(c):
    if c["sliding_window"] is not None:
        c["sliding_window"] = check_int(
            "sliding_window", c["sliding_window"], min_value=1
        )
    layer_types = c["attention_layer_types"]
    if layer_types is not None:
        if (
            isinstance(layer_types, (list, tuple))
            and layer_types
            and c["num_layers"] % len(layer_types) == 0
        ):
            # A shorter pattern repeats: ["sliding_attention",
            # "full_attention"] alternates over any even number of layers.
            layer_types = list(layer_types) * (c["num_layers"] // len(layer_types))
        if (
            not isinstance(layer_types, (list, tuple))
            or len(layer_types) != c["num_layers"]
            or not all(kind in ATTENTION_LAYER_TYPES for kind in layer_types)
        ):
            raise ValueError(
                "`attention_layer_types` must be None or a list of "
                f"num_layers={c['num_layers']} entries (or a shorter pattern "
                "whose length divides num_layers, repeated), each one of "
                f"{ATTENTION_LAYER_TYPES}. "
                f"Received: attention_layer_types={layer_types!r}"
            )
        if "sliding_attention" in layer_types and c["sliding_window"] is None:
            raise ValueError(
                "`attention_layer_types` has 'sliding_attention' layers, which "
                "need a `sliding_window` (the number of positions they see). "
                "Received: sliding_window=None"
            )
        if "chunked_attention" in layer_types and c["attention_chunk_size"] is None:
            raise ValueError(
                "`attention_layer_types` has 'chunked_attention' layers, which "
                "need an `attention_chunk_size` (the length of their chunks). "
                "Received: attention_chunk_size=None"
            )
        c["attention_layer_types"] = list(layer_types)
    elif c["sliding_window"] is not None and c["attention_chunk_size"] is not None:
        raise ValueError(
            "With both `sliding_window` and `attention_chunk_size`, "
            "`attention_layer_types` must say which layers slide and which "
            "are chunked. Received: attention_layer_types=None"
        )
    c["attention_sinks"] = check_bool("attention_sinks", c["attention_sinks"])
    c["attention_output_bias"] = check_bool(
        "attention_output_bias", c["attention_output_bias"]
    )
    changed = [
        name
        for name in (
            "sliding_window",
            "attention_layer_types",
            "attention_sinks",
            "attention_output_bias",
        )
        if c[name] not in (None, False)
    ]
    if changed and c["attention_type"] != "gqa":
        raise ValueError(
            f"{changed} only apply to `attention_type='gqa'`. "
            f"Received: attention_type={c['attention_type']!r}"
        )


def _check_llama4_attention(c):
    """Chunked attention, NoPE layers, weightless q/k norm, temperature."""
    if c["attention_chunk_size"] is not None:
        c["attention_chunk_size"] = check_int(
            "attention_chunk_size", c["attention_chunk_size"], min_value=1
        )
    nope_layers = c["nope_layers"]
    if nope_layers is not None:
        num_layers = c["num_layers"]
        if not isinstance(nope_layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers
            for i in nope_layers
        ):
            raise ValueError(
                "`nope_layers` must be None or a list of layer indices in "
                f"[0, num_layers={num_layers}). "
                f"Received: nope_layers={nope_layers!r}"
            )
        c["nope_layers"] = sorted(set(nope_layers))
    c["use_qk_l2_norm"] = check_bool("use_qk_l2_norm", c["use_qk_l2_norm"])
    if c["attention_temperature_floor_scale"] is not None:
        c["attention_temperature_floor_scale"] = check_int(
            "attention_temperature_floor_scale",
            c["attention_temperature_floor_scale"],
            min_value=1,
        )
    c["attention_temperature_scale"] = check_float(
        "attention_temperature_scale", c["attention_temperature_scale"]
    )
    changed = [
        name
        for name, default in LLAMA4_ATTENTION_DEFAULTS.items()
        if c[name] != default
    ]
    if changed and c["attention_type"] != "gqa":
        raise ValueError(
            f"{changed} only apply to `attention_type='gqa'`. "
            f"Received: attention_type={c['attention_type']!r}"
        )


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


def _check_attention_options(c):
    """q/k norm scope, q/k/v clipping and partial RoPE (GQA options)."""
    c["qk_norm_per_head"] = check_bool("qk_norm_per_head", c["qk_norm_per_head"])
    if c["clip_qkv"] is not None:
        c["clip_qkv"] = check_float("clip_qkv", c["clip_qkv"], positive=True)
    c["partial_rotary_factor"] = check_float(
        "partial_rotary_factor", c["partial_rotary_factor"], positive=True
    )
    if c["partial_rotary_factor"] > 1:
        raise ValueError(
            "`partial_rotary_factor` must be in (0, 1]. "
            f"Received: partial_rotary_factor={c['partial_rotary_factor']}"
        )
    changed = [
        name
        for name, default in (
            ("qk_norm_per_head", True),
            ("clip_qkv", None),
            ("partial_rotary_factor", 1.0),
        )
        if c[name] != default
    ]
    if changed and c["attention_type"] != "gqa":
        raise ValueError(
            f"{changed} only apply to `attention_type='gqa'`. "
            f"Received: attention_type={c['attention_type']!r}"
        )


def _check_mla(c):
    missing = [name for name in MLA_ARGUMENTS[1:] if c[name] is None]
    if missing:
        raise ValueError(
            f"`attention_type='mla'` requires {missing}. Received: "
            + ", ".join(f"{name}=None" for name in missing)
        )
    if c["qk_rope_head_dim"] % 2:
        raise ValueError(
            "`qk_rope_head_dim` must be even (RoPE rotates pairs of features). "
            f"Received: qk_rope_head_dim={c['qk_rope_head_dim']}"
        )
    num_kv_heads = c["num_key_value_heads"]
    if num_kv_heads is not None and num_kv_heads != c["num_query_heads"]:
        raise ValueError(
            "Multi-head latent attention has one key/value per query head: "
            "`num_key_value_heads` must be None or equal to `num_query_heads` "
            f"({c['num_query_heads']}). Received: num_key_value_heads={num_kv_heads}"
        )
    if c["rope_interleave"] is not None:
        c["rope_interleave"] = check_bool("rope_interleave", c["rope_interleave"])
    c["rope_scaling"] = normalize_rope_scaling(c["rope_scaling"])
    for name in ("head_dim", "attention_bias", "use_qk_norm"):
        if c[name]:
            raise ValueError(
                f"`{name}` only applies to `attention_type='gqa'` (MLA sets its "
                "head widths with qk_nope_head_dim, qk_rope_head_dim and "
                f"v_head_dim, and has no q/k/v biases or q/k norm). "
                f"Received: {name}={c[name]!r}"
            )
