"""`MoEBackbone` attention arguments: their checks and the per-layer pattern.

Grouped-query attention (GQA) takes the options of the decoder families
(q/k norm scope, q/k/v clipping, partial RoPE, sliding windows and
attention sinks, Llama 4's chunks, NoPE layers and temperature tuning);
multi-head latent attention (MLA) its own low-rank widths. Kept apart from
`backbone_config` so that each argument group is read in one place.
"""

from keras_moe.models.rope_scaling import normalize_gqa_rope_scaling
from keras_moe.models.yarn import normalize_rope_scaling
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_optional_int

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
# Every GQA-only option with its default: set on MLA, each is an error.
GQA_OPTION_DEFAULTS = {
    "qk_norm_per_head": True,
    "clip_qkv": None,
    "partial_rotary_factor": 1.0,
    "sliding_window": None,
    "attention_layer_types": None,
    "attention_sinks": False,
    "attention_output_bias": False,
    **LLAMA4_ATTENTION_DEFAULTS,
}
MLA_ARGUMENTS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


def check_attention(c):
    """Check and normalize the attention arguments of a backbone config.

    Args:
        c: a dict of `MoEBackbone` arguments (`num_layers`, `hidden_dim` and
            `num_query_heads` already checked), changed in place.

    Raises:
        ValueError: naming the argument that is wrong and why.

    Example:

    >>> from keras_moe.models.moe_backbone import MoEBackbone
    >>> import inspect
    >>> c = {name: parameter.default for name, parameter in
    ...     inspect.signature(MoEBackbone.__init__).parameters.items()}
    >>> c.update(num_layers=2, hidden_dim=8, num_query_heads=2, sliding_window=4)
    >>> check_attention(c)
    >>> attention_layer_types(c)
    ['sliding_attention', 'sliding_attention']
    """
    if c["attention_type"] not in ATTENTION_TYPES:
        raise ValueError(
            f"`attention_type` must be one of {ATTENTION_TYPES}. "
            f"Received: attention_type={c['attention_type']!r}"
        )
    c["attention_bias"] = check_bool("attention_bias", c["attention_bias"])
    c["use_qk_norm"] = check_bool("use_qk_norm", c["use_qk_norm"])
    c["num_key_value_heads"] = check_optional_int(
        "num_key_value_heads", c["num_key_value_heads"]
    )
    c["head_dim"] = check_optional_int("head_dim", c["head_dim"])
    for name in MLA_ARGUMENTS:
        c[name] = check_optional_int(name, c[name])
    _check_attention_options(c)
    _check_llama4_attention(c)
    _check_sliding_window(c)
    if c["attention_type"] == "gqa":
        _check_gqa(c)
    else:
        changed = [
            name for name, default in GQA_OPTION_DEFAULTS.items() if c[name] != default
        ]
        if changed:
            raise ValueError(
                f"{changed} only apply to `attention_type='gqa'`. "
                f"Received: attention_type={c['attention_type']!r}"
            )
        _check_mla(c)


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
