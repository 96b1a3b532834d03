"""The RoPE scalings of grouped-query attention: YaRN and Llama 3's.

Llama 3.1 and Llama 4 Scout stretch RoPE to long contexts by dividing the
low frequencies by `factor` and blending the middle ones (`rope_type`
`"llama3"`, transformers' `_compute_llama3_parameters`): a frequency whose
wavelength is shorter than `original_max_position_embeddings /
high_freq_factor` is kept, one longer than `original_max_position_embeddings
/ low_freq_factor` is divided by `factor`, and those between are
interpolated. Only the frequencies change (no factor on cos and sin or on
the softmax). YaRN (`rope_type` `"yarn"`) lives in `keras_moe.models.yarn`;
this module routes a `rope_scaling` dict to the one it names.
"""

import math

import numpy as np

from keras_moe.models.yarn import normalize_rope_scaling
from keras_moe.models.yarn import yarn_parameters

LLAMA3_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def _llama3_scaling(rope_scaling):
    unknown = sorted(
        set(rope_scaling) - set(LLAMA3_KEYS) - {"rope_type", "type", "rope_theta"}
    )
    if unknown:
        raise ValueError(
            f"Unknown llama3 `rope_scaling` keys {unknown}. "
            f"Accepted: {', '.join(LLAMA3_KEYS)}."
        )
    for key in LLAMA3_KEYS:
        value = rope_scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"llama3 `rope_scaling` needs a positive `{key}`. "
                f"Received: rope_scaling={rope_scaling!r}"
            )
    if rope_scaling["high_freq_factor"] < rope_scaling["low_freq_factor"]:
        raise ValueError(
            "llama3 `rope_scaling` needs `high_freq_factor >= low_freq_factor`. "
            f"Received: rope_scaling={rope_scaling!r}"
        )
    return {
        "rope_type": "llama3",
        "factor": float(rope_scaling["factor"]),
        "low_freq_factor": float(rope_scaling["low_freq_factor"]),
        "high_freq_factor": float(rope_scaling["high_freq_factor"]),
        "original_max_position_embeddings": int(
            rope_scaling["original_max_position_embeddings"]
        ),
    }


def normalize_gqa_rope_scaling(rope_scaling):
    """Check a grouped-query attention `rope_scaling`; fill its defaults.

    Args:
        rope_scaling: `None`, a YaRN dict (see
            `keras_moe.models.yarn.normalize_rope_scaling`) or a llama3 dict:
            `rope_type` `"llama3"`, `factor`, `low_freq_factor`,
            `high_freq_factor` and `original_max_position_embeddings`.

    Returns:
        `None` or a normalized dict with its `rope_type`.

    Raises:
        ValueError: naming the key that is missing, unknown or wrong.

    Example:

    >>> normalize_gqa_rope_scaling({"rope_type": "llama3", "factor": 16,
    ...     "low_freq_factor": 1, "high_freq_factor": 1,
    ...     "original_max_position_embeddings": 8192})["factor"]
    16.0
    """
    if isinstance(rope_scaling, dict) and (
        rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3"
    ):
        return _llama3_scaling(rope_scaling)
    try:
        return normalize_rope_scaling(rope_scaling)
    except ValueError as error:
        if "Only YaRN" not in str(error):
            raise
        raise ValueError(
            "`rope_scaling` must be None or a dict with rope_type 'yarn' or "
            f"'llama3'. Received: rope_scaling={rope_scaling!r}"
        ) from None


def llama3_inverse_frequencies(rope_scaling, rotary_dim, base):
    """The inverse RoPE frequencies of a llama3 `rope_scaling`.

    Args:
        rope_scaling: a llama3 dict from `normalize_gqa_rope_scaling`.
        rotary_dim: int, the (even) number of rotated features.
        base: float, the RoPE base (`rope_theta`).

    Returns:
        A float32 array `[rotary_dim // 2]`.

    Example:

    >>> scaling = normalize_gqa_rope_scaling({"rope_type": "llama3",
    ...     "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
    ...     "original_max_position_embeddings": 8192})
    >>> frequencies = llama3_inverse_frequencies(scaling, 128, 500000.0)
    >>> float(frequencies[0]), round(float(frequencies[-1]) * 8 / 2.5e-6, 2)
    (1.0, 0.98)
    """
    exponents = np.arange(0, rotary_dim, 2, dtype="float32") / np.float32(rotary_dim)
    inverse = (1.0 / np.float32(base) ** exponents).astype("float32")
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    context = rope_scaling["original_max_position_embeddings"]
    wavelengths = 2 * math.pi / inverse
    scaled = np.where(wavelengths > context / low, inverse / factor, inverse)
    medium = (wavelengths >= context / high) & (wavelengths <= context / low)
    if high > low:
        smooth = (context / wavelengths - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        scaled = np.where(medium, smoothed, scaled)
    return scaled.astype("float32")


def rope_parameters(rope_scaling, rotary_dim, base):
    """Inverse frequencies and scales of a (YaRN or llama3) RoPE scaling.

    Args:
        rope_scaling: a dict from `normalize_gqa_rope_scaling`.
        rotary_dim: int, the (even) number of rotated features.
        base: float, the RoPE base.

    Returns:
        `(inverse_frequencies, attention_factor, softmax_scale_factor)`,
        as `keras_moe.models.yarn.yarn_parameters` returns them.

    Example:

    >>> scaling = normalize_gqa_rope_scaling({"rope_type": "llama3",
    ...     "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
    ...     "original_max_position_embeddings": 8192})
    >>> frequencies, attention_factor, softmax_factor = rope_parameters(
    ...     scaling, 64, 10000.0)
    >>> frequencies.shape, attention_factor, softmax_factor
    ((32,), 1.0, 1.0)
    """
    if rope_scaling["rope_type"] == "llama3":
        return llama3_inverse_frequencies(rope_scaling, rotary_dim, base), 1.0, 1.0
    return yarn_parameters(rope_scaling, rotary_dim, base)
