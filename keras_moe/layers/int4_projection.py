"""int4 projections: kernels packed two 4-bit values per byte, with scales.

The arithmetic behind `FeedForwardWeights.quantize("int4")`, for kernels
`[..., fan_in, fan_out]` (`[E, d, f]` stacked per expert, `[d, f]` dense).
Each kernel is quantized symmetrically to the signed 4-bit range
`[-8, 7]` (absolute maximum mapped to 7) and stored as int8
`[..., ceil(fan_in / 2), fan_out]`: rows `2i` and `2i + 1` of the input
axis share a byte, row `2i` in the low nibble (Keras' `pack_int4` layout,
along the input axis). The float scales are either

- per output channel, `[..., fan_out]` (`block_size=None`), as Keras'
  per-channel int4 and this package's int8; or
- group-wise, `[..., ceil(fan_in / block_size), fan_out]`: one scale per
  output channel for each group of `block_size` consecutive input rows (the
  last group may be shorter), what `Int4QuantizationConfig(block_size=128)`,
  and so `model.quantize("int4")`, asks for.

As for int8, `kernel ~= q / scale` (the scale of a group or channel is
`7 / max |w|`). Stacked kernels get their own scales per expert.
"""

import math

import numpy as np
from keras import ops
from keras import quantizers

from keras_moe.layers.int8_projection import int8_project

# The signed 4-bit range; the absolute maximum maps to 7, as in Keras.
INT4_RANGE = (-8, 7)
_EPSILON = 1e-7


def pack_int4(values):
    """Pack int4 values `[..., fan_in, fan_out]` two per byte along `fan_in`.

    Args:
        values: int8 array of values in `[-8, 7]`, `[..., fan_in, fan_out]`.

    Returns:
        int8 `[..., ceil(fan_in / 2), fan_out]`: byte `i` holds row `2i` in
        its low nibble and row `2i + 1` in its high nibble (an odd last
        row is paired with zero).

    Example:

    >>> import numpy as np
    >>> packed = pack_int4(np.array([[-3, 7], [2, -8], [1, 0]], "int8"))
    >>> np.asarray(packed).tolist()  # 0x2D = 2 << 4 | (-3 & 0xF), ...
    [[45, -121], [1, 0]]
    """
    values = np.asarray(ops.convert_to_numpy(values)).astype("int8")
    if values.ndim < 2:
        raise ValueError(
            "`pack_int4` packs kernels of rank >= 2 along their input axis "
            f"(-2). Received: shape {values.shape}"
        )
    packed, _, _ = quantizers.pack_int4(values, axis=values.ndim - 2)
    return packed


def unpack_int4(packed, fan_in):
    """The int4 values `pack_int4` packed, as int8 `[..., fan_in, fan_out]`.

    Args:
        packed: int8 `[..., ceil(fan_in / 2), fan_out]`.
        fan_in: int, the unpacked length of the input axis.

    Returns:
        int8 `[..., fan_in, fan_out]`, values in `[-8, 7]`.

    Example:

    >>> import numpy as np
    >>> unpacked = unpack_int4(np.array([[45, -121], [1, 0]], "int8"), 3)
    >>> np.asarray(unpacked).tolist()
    [[-3, 7], [2, -8], [1, 0]]
    """
    packed = ops.convert_to_tensor(packed)
    rank = len(packed.shape)
    return quantizers.unpack_int4(packed, fan_in, axis=rank - 2)


def quantize_int4_kernel(kernel, block_size=None, config=None, layer_name="layer"):
    """Quantize a float kernel to packed int4 with per-channel or group scales.

    Computed in NumPy on the host, as Keras quantizes (no device memory
    beyond the result).

    Args:
        kernel: float `[..., fan_in, fan_out]`.
        block_size: `None` (or -1) for one scale per output channel; a
            positive int for one scale per output channel and group of
            `block_size` input rows.
        config: optional `keras.quantizers.QuantizationConfig`; a per-channel
            `weight_quantizer` it holds must reduce over the input axis (-2).
        layer_name: the layer named in errors.

    Returns:
        `(packed, scale)`: `packed` int8 `[..., ceil(fan_in / 2), fan_out]`
        (see `pack_int4`), `scale` float32 `[..., fan_out]` per channel or
        `[..., ceil(fan_in / block_size), fan_out]` per group.

    Example:

    >>> import numpy as np
    >>> kernel = np.array([[0.3, -1.0], [-0.6, 0.4], [1.0, 0.2]], "float32")
    >>> packed, scale = quantize_int4_kernel(kernel)
    >>> np.asarray(packed).shape, np.round(np.asarray(scale), 3).tolist()
    ((2, 2), [7.0, 7.0])
    >>> np.asarray(unpack_int4(packed, 3)).tolist()  # round(w * 7)
    [[2, -7], [-4, 3], [7, 1]]
    >>> _, group_scale = quantize_int4_kernel(kernel, block_size=2)
    >>> np.round(np.asarray(group_scale, "float64"), 3).tolist()  # 7 / max |w|
    [[11.667, 7.0], [7.0, 35.0]]
    """
    block_size = check_block_size(block_size, layer_name)
    if len(kernel.shape) < 2:
        raise ValueError(
            f"`{layer_name}` quantizes kernels of rank >= 2 to int4. "
            f"Received: shape {tuple(kernel.shape)}"
        )
    fan_in, fan_out = int(kernel.shape[-2]), int(kernel.shape[-1])
    if block_size is None:
        weight_quantizer = quantizers.QuantizationConfig.weight_quantizer_or_default(
            config,
            quantizers.AbsMaxQuantizer(
                axis=-2, value_range=INT4_RANGE, output_dtype="int8"
            ),
        )
        values, scale = weight_quantizer(kernel, to_numpy=True)
        expected = tuple(kernel.shape[:-2]) + (1, fan_out)
        if tuple(scale.shape) != expected:
            raise ValueError(
                f"`{layer_name}` quantizes each output channel of its kernels "
                "over their input axis (-2), so the int4 weight quantizer "
                f"must give scales of shape {expected} for a kernel of shape "
                f"{tuple(kernel.shape)}. Received: scales of shape "
                f"{tuple(scale.shape)} from {weight_quantizer!r}"
            )
        values = np.asarray(ops.convert_to_numpy(values))
        scale = np.asarray(ops.convert_to_numpy(scale))[..., 0, :]
    else:
        float_kernel = np.asarray(ops.convert_to_numpy(kernel)).astype("float32")
        groups = math.ceil(fan_in / block_size)
        padding = [(0, 0)] * (float_kernel.ndim - 2)
        padding += [(0, groups * block_size - fan_in), (0, 0)]
        grouped = np.pad(float_kernel, padding).reshape(
            float_kernel.shape[:-2] + (groups, block_size, fan_out)
        )
        scale = INT4_RANGE[1] / (np.abs(grouped).max(axis=-2) + _EPSILON)
        values = np.round(grouped * scale[..., None, :])
        values = values.reshape(float_kernel.shape[:-2] + (-1, fan_out))
        values = values[..., :fan_in, :]
    values = np.clip(values, *INT4_RANGE).astype("int8")
    return pack_int4(values), ops.convert_to_tensor(scale.astype("float32"))


def check_block_size(block_size, layer_name="layer"):
    """`block_size` as `None` (per channel) or a positive int, or a ValueError."""
    if block_size is None or (
        isinstance(block_size, (int, np.integer)) and block_size == -1
    ):
        return None
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 1
    ):
        raise ValueError(
            f"`{layer_name}` int4 `block_size` must be None or -1 (one scale "
            "per output channel) or a positive int (one scale per group of "
            f"that many input rows). Received: block_size={block_size!r}"
        )
    return int(block_size)


def _row_scales(kernel_scale, fan_in, block_size):
    """Group scales `[..., G, fan_out]` repeated to `[..., fan_in, fan_out]`."""
    return ops.repeat(kernel_scale, block_size, axis=-2)[..., :fan_in, :]


def dequantize_int4_kernel(packed, kernel_scale, fan_in, block_size=None, dtype="float32"):
    """The float kernel a packed int4 kernel and its scales stand for.

    Args:
        packed: int8 `[..., ceil(fan_in / 2), fan_out]`.
        kernel_scale: float `[..., fan_out]` (per channel) or
            `[..., ceil(fan_in / block_size), fan_out]` (per group).
        fan_in: int, the kernel's input length.
        block_size: `None` for per-channel scales, else the group length.
        dtype: the dtype of the result.

    Returns:
        `[..., fan_in, fan_out]` in `dtype`.

    Example:

    >>> import numpy as np
    >>> kernel = dequantize_int4_kernel(
    ...     np.array([[45, -121]], "int8"), np.array([6.0, 8.0]), 2)
    >>> np.asarray(kernel).tolist()  # [[-3, 7], [2, -8]] / scale
    [[-0.5, 0.875], [0.3333333432674408, -1.0]]
    """
    values = ops.cast(unpack_int4(packed, fan_in), dtype)
    kernel_scale = ops.cast(kernel_scale, dtype)
    if block_size is None:
        return ops.divide(values, ops.expand_dims(kernel_scale, -2))
    return ops.divide(values, _row_scales(kernel_scale, fan_in, block_size))


def int4_project(
    inputs,
    packed,
    kernel_scale,
    fan_in,
    equation,
    input_gradient_equation,
    block_size=None,
    inputs_quantizer=None,
    compute_dtype="float32",
):
    """Contract inputs with a packed int4 kernel; the gradient flows to inputs.

    The kernel is frozen (its gradient is `None`), so LoRA factors added on
    top of the projection train (QLoRA). Per-channel kernels are unpacked to
    int8 and contracted as `int8_project` does (inputs quantized per row
    when `inputs_quantizer` is given); group-wise kernels are dequantized to
    `compute_dtype` (weight-only), again in the backward pass rather than
    kept from the forward.

    Args:
        inputs: `[..., fan_in]` in `compute_dtype`.
        packed: int8 `[..., ceil(fan_in / 2), fan_out]` (see `pack_int4`).
        kernel_scale: float `[..., fan_out]` or `[..., groups, fan_out]`.
        fan_in: int, the kernel's input length.
        equation: the einsum of `inputs` and the kernel.
        input_gradient_equation: the einsum of the outputs' gradient and the
            kernel that gives the inputs' gradient.
        block_size: `None` for per-channel scales, else the group length.
        inputs_quantizer: optional `keras.quantizers.AbsMaxQuantizer` for
            per-channel kernels; `None` keeps the inputs in `compute_dtype`.
        compute_dtype: the dtype of the outputs.

    Returns:
        `[..., fan_out]` in `compute_dtype`.

    Example:

    >>> import numpy as np
    >>> kernel = np.random.default_rng(0).uniform(-1, 1, (64, 4)).astype("float32")
    >>> packed, scale = quantize_int4_kernel(kernel, block_size=32)
    >>> inputs = np.random.default_rng(1).normal(size=(2, 64)).astype("float32")
    >>> outputs = int4_project(inputs, packed, scale, 64, "...i,io->...o",
    ...                        "...o,io->...i", block_size=32)
    >>> dequantized = np.asarray(dequantize_int4_kernel(packed, scale, 64, 32))
    >>> bool(np.allclose(outputs, inputs @ dequantized, atol=1e-5))
    True
    >>> bool(np.abs(dequantized - kernel).max() <= 0.5 / 7)  # half a step
    True
    """
    if block_size is None:
        return int8_project(
            inputs,
            unpack_int4(packed, fan_in),
            kernel_scale,
            equation,
            input_gradient_equation,
            inputs_quantizer=inputs_quantizer,
            compute_dtype=compute_dtype,
        )
    if inputs_quantizer is not None:
        raise ValueError(
            "Group-wise int4 kernels (block_size > 0) keep the inputs in the "
            "compute dtype; quantizing the inputs needs per-channel scales "
            "(block_size=None)."
        )

    def float_kernel(packed, kernel_scale):
        return dequantize_int4_kernel(
            packed, kernel_scale, fan_in, block_size, compute_dtype
        )

    @ops.custom_gradient
    def project(inputs, packed, kernel_scale):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            kernel = float_kernel(packed, kernel_scale)
            return ops.einsum(input_gradient_equation, upstream, kernel), None, None

        outputs = ops.einsum(equation, inputs, float_kernel(packed, kernel_scale))
        return outputs, grad_fn

    return project(
        inputs, ops.convert_to_tensor(packed), ops.convert_to_tensor(kernel_scale)
    )
