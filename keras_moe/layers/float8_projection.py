"""float8 projections: Keras' float8 training recipe with delayed scaling.

The arithmetic behind `FeedForwardWeights.quantize("float8")`, as in
`keras.layers.EinsumDense._float8_call`: the inputs and the kernel are
quantized to `float8_e4m3fn` and the outputs' gradient to `float8_e5m2`,
each with a scale computed from the history of its absolute maximum. The
"gradients" of the scale and history variables are their new values
(`overwrite_with_gradient`), so an optimizer step records them.
"""

import ml_dtypes
from keras import ops
from keras import quantizers

# The float8 state of one projection, in the order it is saved: the scale
# and absolute-maximum history of its inputs, its kernel and its outputs'
# gradient.
FLOAT8_VARIABLES = (
    "inputs_scale",
    "inputs_amax_history",
    "kernel_scale",
    "kernel_amax_history",
    "outputs_grad_scale",
    "outputs_grad_amax_history",
)


def _float8_max(dtype):
    return float(ml_dtypes.finfo(dtype).max)


def float8_project(
    inputs, kernel, state, equation, training=None, compute_dtype="float32"
):
    """Contract inputs with a kernel in float8, recording delayed scales.

    Args:
        inputs: `[..., fan_in]` in `compute_dtype`.
        kernel: float `[..., fan_in, fan_out]`.
        state: `{name: tensor}` for every name of `FLOAT8_VARIABLES`: the
            projection's scales (scalars) and histories (`[history]`).
        equation: the einsum of `inputs` and the kernel.
        training: bool, whether the inputs' and kernel's histories and
            scales are updated (the outputs' gradient's always are, in the
            backward pass).
        compute_dtype: the dtype of the outputs.

    Returns:
        `[..., fan_out]` in `compute_dtype`.

    Example:

    >>> import numpy as np
    >>> state = {name: np.ones((16,) if "history" in name else (), "float32")
    ...          for name in FLOAT8_VARIABLES}
    >>> kernel = np.full((8, 4), 0.25, "float32")
    >>> outputs = float8_project(np.ones((2, 8), "float32"), kernel, state,
    ...                          "...i,io->...o")
    >>> np.asarray(outputs).tolist()[0]
    [2.0, 2.0, 2.0, 2.0]
    """
    state = {name: ops.convert_to_tensor(value) for name, value in state.items()}

    @ops.custom_gradient
    def quantize_dequantize_inputs(inputs, scale, amax_history):
        if training:
            new_scale = quantizers.compute_float8_scale(
                ops.max(amax_history, axis=0),
                scale,
                ops.cast(_float8_max("float8_e4m3fn"), "float32"),
            )
            new_amax_history = quantizers.compute_float8_amax_history(
                inputs, amax_history
            )
        else:
            new_scale = None
            new_amax_history = None
        qdq_inputs = quantizers.quantize_and_dequantize(
            inputs, scale, "float8_e4m3fn", compute_dtype
        )

        def grad(*args, upstream=None, variables=None):
            if upstream is None:
                (upstream,) = args
            return upstream, new_scale, new_amax_history

        return qdq_inputs, grad

    @ops.custom_gradient
    def quantize_dequantize_outputs_grad(outputs, scale, amax_history):
        def grad(*args, upstream=None, variables=None):
            if upstream is None:
                (upstream,) = args
            new_scale = quantizers.compute_float8_scale(
                ops.max(amax_history, axis=0),
                scale,
                ops.cast(_float8_max("float8_e5m2"), "float32"),
            )
            qdq_upstream = quantizers.quantize_and_dequantize(
                upstream, scale, "float8_e5m2", compute_dtype
            )
            new_amax_history = quantizers.compute_float8_amax_history(
                upstream, amax_history
            )
            return qdq_upstream, new_scale, new_amax_history

        return outputs, grad

    outputs = ops.einsum(
        equation,
        quantize_dequantize_inputs(
            inputs, state["inputs_scale"], state["inputs_amax_history"]
        ),
        quantize_dequantize_inputs(
            ops.convert_to_tensor(kernel),
            state["kernel_scale"],
            state["kernel_amax_history"],
        ),
    )
    return quantize_dequantize_outputs_grad(
        outputs, state["outputs_grad_scale"], state["outputs_grad_amax_history"]
    )
