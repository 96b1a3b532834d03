"""`FeedForward`: a dense (every-token) feed-forward block."""

import keras
from keras import ops

from keras_moe.layers.feed_forward_weights import FeedForwardWeights


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each token is projected on its own: a padding mask passes through.
        self.supports_masking = True

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
