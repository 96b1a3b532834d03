import keras
from keras import ops

from keras_moe.layers.experts import get_activation
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int


@keras.saving.register_keras_serializable(package="keras_moe")
class FeedForward(keras.layers.Layer):
    """A dense (every-token) feed-forward block, gated or plain.

    The same block an expert is, for a single always-on network: the dense
    layers of a MoE transformer (DeepSeek's first layers) and the shared
    experts of `SharedExpertMoE`. Gated blocks (SwiGLU with `"silu"`, GeGLU
    with `"gelu"`) compute `down(activation(x @ gate) * (x @ up))`, plain ones
    `down(activation(x @ up))`.

    Args:
        intermediate_dim: int, the hidden width `f`.
        activation: activation name or callable. Defaults to `"silu"`.
        gated: bool, whether the block is a GLU. Defaults to True.
        use_bias: bool, whether the projections have biases.
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., d]`.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    >>> import numpy as np
    >>> ffn = FeedForward(intermediate_dim=64)
    >>> tuple(ffn(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        intermediate_dim,
        activation="silu",
        gated=True,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, min_value=1
        )
        self.activation = activation
        self._activation_fn = get_activation(activation)
        self.gated = check_bool("gated", gated)
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                "The last dimension of the `FeedForward` input must be known. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.hidden_dim = int(input_shape[-1])
        projections = [
            ("up", self.hidden_dim, self.intermediate_dim),
            ("down", self.intermediate_dim, self.hidden_dim),
        ]
        if self.gated:
            projections.insert(0, ("gate", self.hidden_dim, self.intermediate_dim))
        for name, fan_in, fan_out in projections:
            setattr(
                self,
                f"{name}_kernel",
                self.add_weight(
                    name=f"{name}_kernel",
                    shape=(fan_in, fan_out),
                    initializer=self.kernel_initializer,
                ),
            )
            if self.use_bias:
                setattr(
                    self,
                    f"{name}_bias",
                    self.add_weight(
                        name=f"{name}_bias",
                        shape=(fan_out,),
                        initializer=self.bias_initializer,
                    ),
                )

    def _project(self, inputs, name):
        outputs = ops.matmul(inputs, getattr(self, f"{name}_kernel"))
        if self.use_bias:
            outputs = outputs + getattr(self, f"{name}_bias")
        return outputs

    def call(self, inputs):
        up = self._project(inputs, "up")
        if self.gated:
            hidden = self._activation_fn(self._project(inputs, "gate")) * up
        else:
            hidden = self._activation_fn(up)
        return self._project(hidden, "down")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": (
                    self.activation
                    if isinstance(self.activation, str)
                    else keras.activations.serialize(self.activation)
                ),
                "gated": self.gated,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config
