import keras
from keras import ops

from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int

# Activations a feed-forward expert is commonly built with; any other name
# that `keras.activations.get` knows, or a callable, works too.
_COMMON_ACTIVATIONS = ("silu", "gelu", "relu", "linear")


def get_activation(activation, name="activation"):
    """`keras.activations.get`, with an error that names the argument."""
    try:
        resolved = keras.activations.get(activation)
    except (ValueError, TypeError):
        resolved = None
    if resolved is None or (
        activation is not None and not callable(resolved)
    ):
        raise ValueError(
            f"`{name}` must be the name of a Keras activation (for example "
            f"{', '.join(repr(a) for a in _COMMON_ACTIVATIONS)}) or a "
            f"callable. Received: {name}={activation!r}"
        )
    return resolved


def per_expert_initializer(initializer, num_experts):
    """Scale a fan-based initializer for stacked `[E, fan_in, fan_out]` kernels.

    Keras treats the leading axis of a 3-D kernel as a receptive field and so
    divides the variance by `E` as well; each expert must be initialised as
    the `[fan_in, fan_out]` matrix it is.
    """
    if isinstance(initializer, keras.initializers.VarianceScaling):
        return keras.initializers.VarianceScaling(
            scale=initializer.scale * num_experts,
            mode=initializer.mode,
            distribution=initializer.distribution,
            seed=initializer.seed,
        )
    return initializer


@keras.saving.register_keras_serializable(package="keras_moe")
class Experts(keras.layers.Layer):
    """A bank of `num_experts` feed-forward experts with stacked kernels.

    Each expert is a feed-forward block. Gated experts (the default, SwiGLU
    with `activation="silu"`, GeGLU with `"gelu"`) compute
    `down(activation(x @ gate) * (x @ up))`; plain experts (`gated=False`,
    as in Switch Transformer with `"relu"`) compute `down(activation(x @ up))`.
    Kernels are stacked along a leading expert axis, `[E, d, f]` and
    `[E, f, d]`, and all experts run as one batched einsum over per-expert
    token buffers `[E, C, d]`, never a Python loop over experts.

    The MoE layers (`SparseMoE`, ...) own an `Experts` and feed it the buffers
    their dispatch produces; it can also be used alone.

    Args:
        num_experts: int, the number of experts `E`.
        intermediate_dim: int, the hidden width `f` of each expert.
        activation: activation name or callable. Defaults to `"silu"`.
        gated: bool, whether experts are gated (GLU) feed-forward blocks.
        use_bias: bool, whether the expert projections have biases.
        kernel_initializer: initializer of the kernels; fan-based
            initializers are applied per expert.
        bias_initializer: initializer of the biases.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., E, C, d]` per-expert buffers.

    Returns:
        `[..., E, C, d]`: each expert's output on its own buffer.

    Example:

    >>> import numpy as np
    >>> experts = Experts(num_experts=4, intermediate_dim=32)
    >>> buffers = np.random.normal(size=(4, 10, 16)).astype("float32")
    >>> tuple(experts(buffers).shape)
    (4, 10, 16)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        activation="silu",
        gated=True,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, min_value=1)
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, min_value=1
        )
        self.activation = activation
        self._activation_fn = get_activation(activation)
        self.gated = check_bool("gated", gated)
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        if len(input_shape) < 3 or input_shape[-3] not in (
            None,
            self.num_experts,
        ):
            raise ValueError(
                "`Experts` expects buffers of shape [..., num_experts, "
                f"capacity, hidden_dim] with num_experts={self.num_experts}. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        hidden_dim = input_shape[-1]
        if hidden_dim is None:
            raise ValueError(
                "The last dimension of the `Experts` input must be known. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.hidden_dim = int(hidden_dim)
        num_experts, intermediate_dim = self.num_experts, self.intermediate_dim
        kernel_initializer = per_expert_initializer(
            self.kernel_initializer, num_experts
        )
        up_shape = (num_experts, self.hidden_dim, intermediate_dim)
        if self.gated:
            self.gate_kernel = self.add_weight(
                name="gate_kernel",
                shape=up_shape,
                initializer=kernel_initializer,
            )
        self.up_kernel = self.add_weight(
            name="up_kernel", shape=up_shape, initializer=kernel_initializer
        )
        self.down_kernel = self.add_weight(
            name="down_kernel",
            shape=(num_experts, intermediate_dim, self.hidden_dim),
            initializer=kernel_initializer,
        )
        if self.use_bias:
            if self.gated:
                self.gate_bias = self.add_weight(
                    name="gate_bias",
                    shape=(num_experts, intermediate_dim),
                    initializer=self.bias_initializer,
                )
            self.up_bias = self.add_weight(
                name="up_bias",
                shape=(num_experts, intermediate_dim),
                initializer=self.bias_initializer,
            )
            self.down_bias = self.add_weight(
                name="down_bias",
                shape=(num_experts, self.hidden_dim),
                initializer=self.bias_initializer,
            )

    def _project(self, inputs, kernel, bias, equation):
        outputs = ops.einsum(equation, inputs, kernel)
        if bias is not None:
            outputs = outputs + ops.expand_dims(bias, -2)  # broadcast over C
        return outputs

    def call(self, inputs):
        bias = lambda name: getattr(self, name) if self.use_bias else None
        up = self._project(
            inputs, self.up_kernel, bias("up_bias"), "...ecd,edf->...ecf"
        )
        if self.gated:
            gate = self._project(
                inputs, self.gate_kernel, bias("gate_bias"), "...ecd,edf->...ecf"
            )
            hidden = self._activation_fn(gate) * up
        else:
            hidden = self._activation_fn(up)
        return self._project(
            hidden, self.down_kernel, bias("down_bias"), "...ecf,efd->...ecd"
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
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
