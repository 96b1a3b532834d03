import keras
from keras import ops

from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.utils.argument_validation import check_choice
from keras_moe.utils.argument_validation import check_float

# The normalizations a `MoEBackbone` can use (`norm_type`).
NORM_TYPES = ("rms", "layer")


@keras.saving.register_keras_serializable(package="keras_moe")
class LayerNormalization(keras.layers.Layer):
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
        super().__init__(**kwargs)
        self.epsilon = check_float("epsilon", epsilon, positive=True)
        self.supports_masking = True

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                "The last dimension of the `LayerNormalization` input must be "
                f"known. Received: input_shape={tuple(input_shape)}"
            )
        self.scale = self.add_weight(
            name="scale", shape=(int(input_shape[-1]),), initializer="ones"
        )

    def call(self, inputs):
        inputs = ops.cast(inputs, "float32")
        centered = inputs - ops.mean(inputs, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(centered), axis=-1, keepdims=True)
        outputs = centered * ops.rsqrt(variance + self.epsilon)
        outputs = outputs * ops.cast(self.scale, "float32")
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


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
