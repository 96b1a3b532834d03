"""Layer normalization without bias (DBRX), and the backbone's norm choice."""

import keras
from keras import ops

from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.utils.argument_validation import check_choice

# The normalizations a `MoEBackbone` can use (`norm_type`).
NORM_TYPES = ("rms", "layer")


@keras.saving.register_keras_serializable(package="keras_moe")
class LayerNormalization(RMSNormalization):
    """Layer normalization over the last axis, with a scale and no bias.

    `y = (x - mean(x)) / sqrt(var(x) + epsilon) * scale`, with the biased
    variance, computed in float32 whatever the layer's compute dtype, then
    cast back: `torch.nn.LayerNorm(dim, bias=False)`, the norm of DBRX. Its
    only weight is `scale` `[dim]` (initialised to ones), named as
    `RMSNormalization`'s, so the two are interchangeable in a backbone.

    Args:
        epsilon: positive float added to the variance. Defaults to 1e-5.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., dim]`.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    >>> import numpy as np
    >>> norm = LayerNormalization()
    >>> outputs = ops.convert_to_numpy(norm(np.array([[1.0, 3.0]], "float32")))
    >>> np.round(outputs.astype("float64"), 3).tolist()
    [[-1.0, 1.0]]
    """

    def __init__(self, epsilon=1e-5, **kwargs):
        super().__init__(epsilon, **kwargs)

    def call(self, inputs):
        # Layer norm is the RMS norm of the centred inputs: the root mean
        # square of `x - mean(x)` is the square root of the biased variance.
        inputs = ops.cast(inputs, "float32")
        return super().call(inputs - ops.mean(inputs, axis=-1, keepdims=True))


def make_normalization(norm_type, epsilon, **kwargs):
    """A `RMSNormalization` (`norm_type="rms"`) or a bias-free
    `LayerNormalization` (`"layer"`).

    Args:
        norm_type: `"rms"` or `"layer"`.
        epsilon: positive float.
        **kwargs: layer arguments (`name`, `dtype`).

    Returns:
        A Keras layer with one `scale` weight.

    Example:

    >>> type(make_normalization("layer", 1e-5, name="norm")).__name__
    'LayerNormalization'
    """
    check_choice("norm_type", norm_type, NORM_TYPES)
    if norm_type == "layer":
        return LayerNormalization(epsilon, **kwargs)
    return RMSNormalization(epsilon, **kwargs)
