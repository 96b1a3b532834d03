"""YaRN RoPE scaling (Peng et al. 2023), as DeepSeek-V2/V3 checkpoints use it.

YaRN stretches RoPE to longer contexts: each rotary frequency is blended
between its original value (high frequencies, "extrapolation") and the value
divided by `factor` ("interpolation"), with a linear ramp between the
dimensions set by `beta_fast` and `beta_slow`; cos and sin are scaled by an
attention factor. DeepSeek also multiplies the softmax scale by
`mscale(factor, mscale_all_dim) ** 2`. The formulas are those of
transformers' `_compute_yarn_parameters` and DeepSeek's own code.
"""

import math

import numpy as np
from keras import ops

YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
)


def normalize_rope_scaling(rope_scaling):
    """Check a YaRN `rope_scaling` dict; return it with defaults filled in.

    Args:
        rope_scaling: `None`, or a dict with `rope_type` (or `type`)
            `"yarn"`, `factor` and `original_max_position_embeddings`, and
            optionally `beta_fast` (32), `beta_slow` (1), `mscale`,
            `mscale_all_dim`, `attention_factor` and `truncate` (True).

    Returns:
        `None` or a dict with `rope_type` and every key of `YARN_KEYS`.

    Example:

    >>> scaling = normalize_rope_scaling(
    ...     {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096})
    >>> scaling["rope_type"], scaling["beta_fast"], scaling["truncate"]
    ('yarn', 32.0, True)
    """
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(
            "`rope_scaling` must be None or a dict. "
            f"Received: rope_scaling={rope_scaling!r}"
        )
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type != "yarn":
        raise ValueError(
            "Only YaRN RoPE scaling is supported (`rope_type='yarn'`). "
            f"Received: rope_scaling={rope_scaling!r}"
        )
    unknown = sorted(
        set(rope_scaling) - set(YARN_KEYS) - {"rope_type", "type", "rope_theta"}
    )
    if unknown:
        raise ValueError(
            f"Unknown YaRN `rope_scaling` keys {unknown}. "
            f"Accepted: {', '.join(YARN_KEYS)}."
        )
    for key in ("factor", "original_max_position_embeddings"):
        value = rope_scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"YaRN `rope_scaling` needs a positive `{key}`. "
                f"Received: rope_scaling={rope_scaling!r}"
            )

    def optional_float(key, default=None):
        value = rope_scaling.get(key)
        return default if value is None else float(value)

    return {
        "rope_type": "yarn",
        "factor": float(rope_scaling["factor"]),
        "original_max_position_embeddings": int(
            rope_scaling["original_max_position_embeddings"]
        ),
        "beta_fast": optional_float("beta_fast") or 32.0,
        "beta_slow": optional_float("beta_slow") or 1.0,
        "mscale": optional_float("mscale"),
        "mscale_all_dim": optional_float("mscale_all_dim"),
        "attention_factor": optional_float("attention_factor"),
        "truncate": bool(rope_scaling.get("truncate", True)),
    }


def _mscale(scale, mscale=1.0):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(rope_scaling, rotary_dim, base):
    """Inverse frequencies and scales of YaRN RoPE.

    Args:
        rope_scaling: a dict from `normalize_rope_scaling`.
        rotary_dim: int, the (even) number of rotated features.
        base: float, the RoPE base (`rope_theta`).

    Returns:
        `(inverse_frequencies, attention_factor, softmax_scale_factor)`: a
        float32 array `[rotary_dim // 2]`, the factor on cos and sin, and
        the factor on the attention softmax scale.

    Example:

    >>> scaling = normalize_rope_scaling({"rope_type": "yarn", "factor": 40,
    ...     "original_max_position_embeddings": 4096, "mscale": 1.0,
    ...     "mscale_all_dim": 1.0})
    >>> inverse_frequencies, attention_factor, softmax_factor = yarn_parameters(
    ...     scaling, 64, 10000.0)
    >>> inverse_frequencies.shape, attention_factor, round(softmax_factor, 4)
    ((32,), 1.0, 1.8739)
    """
    factor = rope_scaling["factor"]
    mscale, mscale_all_dim = rope_scaling["mscale"], rope_scaling["mscale_all_dim"]
    attention_factor = rope_scaling["attention_factor"]
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention_factor = _mscale(factor)
    softmax_factor = 1.0
    if mscale_all_dim:
        softmax_factor = _mscale(factor, mscale_all_dim) ** 2

    def correction_dim(rotations):
        length = rope_scaling["original_max_position_embeddings"]
        return (rotary_dim * math.log(length / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low = correction_dim(rope_scaling["beta_fast"])
    high = correction_dim(rope_scaling["beta_slow"])
    if rope_scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # Avoids a division by zero, as the reference does.
    ramp = (np.arange(rotary_dim // 2, dtype="float32") - low) / (high - low)
    extrapolation = 1.0 - np.clip(ramp, 0.0, 1.0).astype("float32")
    position_frequencies = np.float32(base) ** (
        np.arange(0, rotary_dim, 2, dtype="float32") / np.float32(rotary_dim)
    )
    inverse = 1.0 / position_frequencies
    interpolated = 1.0 / (np.float32(factor) * position_frequencies)
    inverse_frequencies = interpolated * (1 - extrapolation) + inverse * extrapolation
    return inverse_frequencies.astype("float32"), float(attention_factor), softmax_factor


def apply_rotary(inputs, inverse_frequencies, attention_factor, start_index=0):
    """Rotate-half RoPE with given frequencies over axis 1 (positions).

    Args:
        inputs: `[batch, length, ..., rotary_dim]`.
        inverse_frequencies: float32 array `[rotary_dim // 2]`.
        attention_factor: float multiplying cos and sin.
        start_index: int or scalar tensor, the position of the first token.

    Returns:
        A tensor of the shape and dtype of `inputs`.
    """
    length = ops.shape(inputs)[1]
    positions = ops.arange(length, dtype="float32") + ops.cast(start_index, "float32")
    frequencies = ops.einsum(
        "s,f->sf", positions, ops.convert_to_tensor(inverse_frequencies)
    )
    angles = ops.concatenate([frequencies, frequencies], axis=-1)
    for _ in range(len(inputs.shape) - 3):
        angles = ops.expand_dims(angles, -2)
    cos = ops.cast(ops.cos(angles) * attention_factor, inputs.dtype)
    sin = ops.cast(ops.sin(angles) * attention_factor, inputs.dtype)
    first, second = ops.split(inputs, 2, axis=-1)
    rotated = ops.concatenate([-second, first], axis=-1)
    return inputs * cos + rotated * sin
