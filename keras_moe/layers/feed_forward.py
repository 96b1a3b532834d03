import keras
from keras import ops

from keras_moe.layers.experts import FeedForwardWeights
from keras_moe.layers.experts import get_activation
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int


@keras.saving.register_keras_serializable(package="keras_moe")
class FeedForward(FeedForwardWeights):
    """A dense (every-token) feed-forward block, gated or plain.

    The same block an expert is, for a single always-on network: the dense
    layers of a MoE transformer (DeepSeek's first layers) and the shared
    experts of `SharedExpertMoE`. Gated blocks (SwiGLU with `"silu"`, GeGLU
    with `"gelu"`) compute `down(activation(x @ gate) * (x @ up))`, plain ones
    `down(activation(x @ up))`.

    Like `Experts`, it follows Keras' quantization and LoRA protocol:
    `model.quantize("int8")` stores its kernels as int8 with a scale per
    output channel, `"float8"` trains them in float8, and
    `enable_lora(rank)` adds trainable low-rank factors to frozen kernels.

    Args:
        intermediate_dim: int, the hidden width `f`.
        activation: activation name or callable. Defaults to `"silu"`.
        gated: bool, whether the block is a GLU. Defaults to True.
        use_bias: bool, whether the projections have biases.
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        lora_rank: optional int, enable LoRA of this rank when built.
        lora_alpha: optional float, the LoRA scale numerator (defaults to
            `lora_rank`).
        quantization_config: optional `keras.quantizers.QuantizationConfig`
            used when the layer is built with a quantized dtype policy.
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
    >>> ffn.quantize("int8")
    >>> ffn.up_kernel.dtype, tuple(ffn.up_kernel_scale.shape)
    ('int8', (64,))
    """

    def __init__(
        self,
        intermediate_dim,
        activation="silu",
        gated=True,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._init_lora(lora_rank, lora_alpha)
        self.quantization_config = quantization_config
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
        self._build_projections(self.kernel_initializer)
        self._post_build_lora()

    def _kernel_shapes(self):
        shapes = {}
        if self.gated:
            shapes["gate"] = (self.hidden_dim, self.intermediate_dim)
        shapes["up"] = (self.hidden_dim, self.intermediate_dim)
        shapes["down"] = (self.intermediate_dim, self.hidden_dim)
        return shapes

    def _float_variable_names(self):
        # Each projection's kernel, then its bias: the order the layer has
        # always built (and saved) them in.
        names = []
        for name in self.projections:
            names.append(f"{name}_kernel")
            if self.use_bias:
                names.append(f"{name}_bias")
        return names

    def _contract(self, inputs, kernel):
        return ops.matmul(inputs, kernel)

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
                **self._lora_and_quantization_config(),
            }
        )
        return config
