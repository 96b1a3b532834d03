"""int8 projections: kernels stored as int8 with a scale per output channel.

The arithmetic behind `FeedForwardWeights.quantize("int8")`, for kernels
`[..., fan_in, fan_out]` (`[E, d, f]` stacked per expert, `[d, f]` dense):
each output channel is scaled by the absolute maximum over the kernel's
input axis, as `keras.layers.EinsumDense` does, and the forward pass
contracts the int8 kernel with the inputs (quantized to int8 per row, or
kept in the compute dtype for weight-only int8).
"""

from keras import ops
from keras import quantizers


def quantize_kernel(kernel, config=None, layer_name="layer"):
    """Quantize a kernel to int8 with one float scale per output channel.

    Args:
        kernel: float `[..., fan_in, fan_out]`.
        config: optional `keras.quantizers.QuantizationConfig`; its
            `weight_quantizer` must reduce over the input axis (-2).
        layer_name: the layer named in the error of a quantizer that does
            not.

    Returns:
        `(kernel_int8 [..., fan_in, fan_out], kernel_scale [..., fan_out])`,
        with `kernel ~= kernel_int8 / kernel_scale[..., None, :]`.

    Example:

    >>> import numpy as np
    >>> kernel = np.array([[1.0, -2.0], [-0.5, 0.5]], "float32")
    >>> kernel_int8, kernel_scale = quantize_kernel(kernel)
    >>> np.asarray(kernel_int8).tolist()
    [[127, -127], [-63, 32]]
    >>> np.round(np.asarray(kernel_scale), 2).tolist()  # 127 / max |column|
    [127.0, 63.5]
    """
    weight_quantizer = quantizers.QuantizationConfig.weight_quantizer_or_default(
        config, quantizers.AbsMaxQuantizer(axis=-2)
    )
    kernel_int8, kernel_scale = weight_quantizer(kernel, to_numpy=True)
    expected = tuple(kernel.shape[:-2]) + (1, kernel.shape[-1])
    if tuple(kernel_scale.shape) != expected:
        raise ValueError(
            f"`{layer_name}` quantizes each output channel of "
            "its kernels over their input axis (-2), so the weight "
            f"quantizer must give scales of shape {expected} for a kernel "
            f"of shape {tuple(kernel.shape)}. Received: scales of shape "
            f"{tuple(kernel_scale.shape)} from {weight_quantizer!r}"
        )
    return kernel_int8, ops.squeeze(kernel_scale, -2)


def dequantize_kernel(kernel_int8, kernel_scale, dtype="float32"):
    """The float kernel an int8 kernel and its scales stand for.

    Args:
        kernel_int8: int8 `[..., fan_in, fan_out]`.
        kernel_scale: float `[..., fan_out]`.
        dtype: the dtype of the result.

    Returns:
        `[..., fan_in, fan_out]` in `dtype`.

    Example:

    >>> import numpy as np
    >>> kernel = dequantize_kernel(
    ...     np.array([[64, -127]], "int8"), np.array([128.0, 127.0]))
    >>> np.asarray(kernel).tolist()
    [[0.5, -1.0]]
    """
    scale = ops.expand_dims(ops.cast(kernel_scale, dtype), -2)
    return ops.divide(ops.cast(kernel_int8, dtype), scale)


def int8_project(
    inputs,
    kernel_int8,
    kernel_scale,
    equation,
    input_gradient_equation,
    inputs_quantizer=None,
    compute_dtype="float32",
):
    """Contract inputs with an int8 kernel; the gradient flows to the inputs.

    The kernel is frozen: its gradient is `None`, as for Keras' int8 layers.

    Args:
        inputs: `[..., fan_in]` in `compute_dtype` (with the batch axes
            `equation` expects).
        kernel_int8: int8 `[..., fan_in, fan_out]`.
        kernel_scale: float `[..., fan_out]`.
        equation: the einsum of `inputs` and the kernel.
        input_gradient_equation: the einsum of the outputs' gradient and the
            kernel that gives the inputs' gradient.
        inputs_quantizer: optional `keras.quantizers.AbsMaxQuantizer`
            quantizing each input row to int8; `None` keeps the inputs in
            the compute dtype (weight-only int8).
        compute_dtype: the dtype of the outputs.

    Returns:
        `[..., fan_out]` in `compute_dtype`.

    Example:

    >>> import numpy as np
    >>> kernel = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    >>> kernel_int8, kernel_scale = quantize_kernel(kernel)
    >>> inputs = np.ones((2, 8), "float32")
    >>> outputs = int8_project(
    ...     inputs, kernel_int8, kernel_scale, "...i,io->...o", "...o,io->...i")
    >>> bool(np.allclose(outputs, inputs @ kernel, atol=0.05))
    True
    """
    # The per-output-channel scale broadcasts over the slot axis.
    kernel_scale = ops.expand_dims(kernel_scale, -2)

    @ops.custom_gradient
    def project(inputs, kernel_int8, kernel_scale):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            float_kernel = ops.divide(
                ops.cast(kernel_int8, compute_dtype), kernel_scale
            )
            inputs_grad = ops.einsum(input_gradient_equation, upstream, float_kernel)
            return inputs_grad, None, None

        if inputs_quantizer is not None:
            quantized, inputs_scale = inputs_quantizer(inputs, axis=-1)
            outputs = ops.einsum(equation, quantized, kernel_int8)
            outputs = ops.divide(
                ops.cast(outputs, compute_dtype),
                ops.multiply(inputs_scale, kernel_scale),
            )
        else:
            outputs = ops.einsum(
                equation, inputs, ops.cast(kernel_int8, compute_dtype)
            )
            outputs = ops.divide(outputs, kernel_scale)
        return outputs, grad_fn

    return project(
        inputs,
        ops.convert_to_tensor(kernel_int8),
        ops.convert_to_tensor(kernel_scale),
    )
