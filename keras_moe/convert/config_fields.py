"""Reading the fields of a transformers `config.json`, naming what is wrong.

Helpers every family uses to read a config: a field with its default, an
integer field, the RoPE settings, the activation and the number of experts.
Each error names the field.
"""

import warnings

from keras_moe.convert.checkpoint import ConversionError
from keras_moe.models.yarn import YARN_KEYS
from keras_moe.models.yarn import normalize_rope_scaling

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
# Names transformers configs give the number of routed experts.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def field(hf_config, name, default=None, required=False):
    """`hf_config[name]`, or `default` when the config leaves it out.

    Args:
        hf_config: dict, a transformers `config.json`.
        name: str, the field.
        default: the value transformers assumes when the field is absent.
        required: bool, refuse a missing (or null) field.

    Returns:
        The value.

    Raises:
        ConversionError: for a required field that is missing.

    Example:

    >>> field({"rms_norm_eps": 1e-5}, "rms_norm_eps")
    1e-05
    >>> field({}, "rms_norm_eps", 1e-6)
    1e-06
    """
    value = hf_config.get(name, default)
    if required and value is None:
        raise ConversionError(
            f"config.json has no `{name}`, which model_type="
            f"{hf_config.get('model_type')!r} needs."
        )
    return value


def int_field(hf_config, name, default=None):
    """A required integer field.

    Args:
        hf_config: dict, a transformers `config.json`.
        name: str, the field.
        default: int used when the field is absent, or None (required).

    Returns:
        An int.

    Raises:
        ConversionError: for a missing or non-integer field.

    Example:

    >>> int_field({"hidden_size": 4096}, "hidden_size")
    4096
    """
    value = field(hf_config, name, default, required=True)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConversionError(
            f"config.json field `{name}` must be an integer. "
            f"Received: {name}={value!r}"
        )
    return value


def num_experts(hf_config):
    """The number of routed experts, under any of its transformers names.

    Args:
        hf_config: dict, a transformers `config.json`.

    Returns:
        An int.

    Raises:
        ConversionError: if no field gives it.

    Example:

    >>> num_experts({"num_local_experts": 8})
    8
    """
    for name in EXPERT_COUNT_FIELDS:
        if hf_config.get(name) is not None:
            return int_field(hf_config, name)
    raise ConversionError(
        "config.json gives no number of experts (`num_experts`, "
        "`num_local_experts` or `n_routed_experts`)."
    )


def activation(hf_config):
    """The Keras name of the `hidden_act` field (default `"silu"`).

    Args:
        hf_config: dict, a transformers `config.json`.

    Returns:
        A Keras activation name.

    Raises:
        ConversionError: for an activation keras-moe does not reproduce.

    Example:

    >>> activation({"hidden_act": "swish"})
    'silu'
    """
    name = field(hf_config, "hidden_act", "silu")
    if name not in ACTIVATIONS:
        raise ConversionError(
            f"config.json field `hidden_act`={name!r} is not supported; "
            f"supported: {', '.join(sorted(ACTIVATIONS))}."
        )
    return ACTIVATIONS[name]


def rope_theta(hf_config, default):
    """The RoPE base: `rope_theta`, or transformers 5's `rope_parameters`.

    Args:
        hf_config: dict, a transformers `config.json`.
        default: float, the family's default when the config has neither.

    Returns:
        A float.

    Example:

    >>> rope_theta({"rope_parameters": {"rope_theta": 1e6}}, 10000.0)
    1000000.0
    """
    rope_parameters = hf_config.get("rope_parameters") or {}
    theta = hf_config.get("rope_theta", rope_parameters.get("rope_theta"))
    return float(default if theta is None else theta)


def partial_rotary_factor(hf_config, default=1.0):
    """The fraction of each head RoPE rotates: `partial_rotary_factor`.

    Read from the top level of the config (transformers 4, and real
    `config.json` files) or from transformers 5's `rope_parameters`.

    Args:
        hf_config: dict, a transformers `config.json`.
        default: float, the family's default when the config has neither.

    Returns:
        A float.

    Raises:
        ConversionError: for a value outside `(0, 1]`.

    Example:

    >>> partial_rotary_factor({"rope_parameters": {"partial_rotary_factor": 0.5}})
    0.5
    """
    rope_parameters = hf_config.get("rope_parameters") or {}
    factor = hf_config.get(
        "partial_rotary_factor", rope_parameters.get("partial_rotary_factor")
    )
    factor = default if factor is None else factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
        0 < factor <= 1
    ):
        raise ConversionError(
            "config.json field `partial_rotary_factor` must be a number in "
            f"(0, 1]. Received: partial_rotary_factor={factor!r}"
        )
    return float(factor)


def rope_scaling(hf_config, yarn_allowed):
    """The YaRN `rope_scaling` of a config, or None for plain RoPE.

    Reads transformers 4's `rope_scaling` or transformers 5's
    `rope_parameters`; refuses every other scaling, and YaRN where the
    family has none.

    Args:
        hf_config: dict, a transformers `config.json`.
        yarn_allowed: bool, whether the family's models use YaRN.

    Returns:
        A normalized YaRN dict (see `MoEBackbone(rope_scaling=...)`), or
        None.

    Raises:
        ConversionError: for a scaling that would change the outputs.

    Example:

    >>> rope_scaling({"rope_scaling": {"rope_type": "default"}}, yarn_allowed=False)
    """
    scaling = hf_config.get("rope_scaling")
    name = "rope_scaling"
    if scaling is None:
        scaling = hf_config.get("rope_parameters")
        name = "rope_parameters"
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "yarn" or not yarn_allowed:
        supported = "plain RoPE and YaRN" if yarn_allowed else "plain RoPE only"
        raise ConversionError(
            f"config.json field `{name}` asks for rope_type={rope_type!r}; "
            f"keras-moe converts {supported} for model_type="
            f"{hf_config.get('model_type')!r}, so this checkpoint would not "
            "give the same outputs."
        )
    scaling = {
        key: value
        for key, value in scaling.items()
        if key in YARN_KEYS and value is not None
    }
    max_positions = hf_config.get("max_position_embeddings")
    scaling.setdefault("original_max_position_embeddings", max_positions)
    if scaling.get("factor") is None and max_positions:
        scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    try:
        return normalize_rope_scaling({"rope_type": "yarn", **scaling})
    except ValueError as error:
        raise ConversionError(f"config.json field `{name}`: {error}") from None


def sliding_window(hf_config):
    """The `sliding_window` of a config: a positive int, or None.

    Args:
        hf_config: dict, a transformers `config.json`.

    Returns:
        An int, or None when the field is absent, null or 0 (no window).

    Raises:
        ConversionError: for a value that is not a non-negative integer.

    Example:

    >>> sliding_window({"sliding_window": 4096}), sliding_window({})
    (4096, None)
    """
    window = hf_config.get("sliding_window")
    if window is None or window == 0:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ConversionError(
            "config.json field `sliding_window` must be a positive integer or "
            f"null. Received: sliding_window={window!r}"
        )
    return window


def warn_sliding_window(hf_config):
    """Warn that attention sees more tokens than the checkpoint's window.

    Args:
        hf_config: dict, a transformers `config.json` whose family uses its
            `sliding_window`.

    Example:

    >>> warn_sliding_window({"sliding_window": None})  # No window: silent.
    """
    window = hf_config.get("sliding_window")
    if window:
        warnings.warn(
            f"config.json sets `sliding_window`={window}: keras-moe attention "
            "sees the whole sequence, so outputs match the checkpoint's only "
            f"for sequences of at most {window} tokens.",
            stacklevel=4,
        )
