import keras
from keras import ops

from keras_moe.utils.argument_validation import check_float


@keras.saving.register_keras_serializable(package="keras_moe")
class RMSNormalization(keras.layers.Layer):
    """Root-mean-square normalization over the last axis, with a learned scale.

    `y = x / sqrt(mean(x^2, axis=-1) + epsilon) * scale`, computed in float32
    whatever the layer's compute dtype (as Llama, Mixtral, Qwen and DeepSeek
    do), then cast back. There is no bias and no centring: the only weight is
    `scale`, of shape `[dim]`, initialised to ones.

    Args:
        epsilon: positive float added to the mean square. Defaults to 1e-6.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., dim]`.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> norm = RMSNormalization()
    >>> outputs = ops.convert_to_numpy(norm(np.array([[3.0, 4.0]], "float32")))
    >>> np.round(outputs.astype("float64"), 3).tolist()
    [[0.849, 1.131]]
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = check_float("epsilon", epsilon, positive=True)
        self.supports_masking = True

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                f"The last dimension of the `{type(self).__name__}` input must "
                f"be known. Received: input_shape={tuple(input_shape)}"
            )
        self.scale = self.add_weight(
            name="scale", shape=(int(input_shape[-1]),), initializer="ones"
        )

    def call(self, inputs):
        inputs = ops.cast(inputs, "float32")
        mean_square = ops.mean(ops.square(inputs), axis=-1, keepdims=True)
        outputs = inputs * ops.rsqrt(mean_square + self.epsilon)
        outputs = outputs * ops.cast(self.scale, "float32")
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
