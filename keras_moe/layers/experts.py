"""`Experts`: a bank of feed-forward experts with stacked kernels."""

import keras
from keras import ops

from keras_moe.layers.feed_forward_weights import FeedForwardWeights
from keras_moe.layers.projection_arguments import per_expert_initializer
from keras_moe.ops.grouped_matmul import grouped_matmul
from keras_moe.utils.argument_validation import check_int


@keras.saving.register_keras_serializable(package="keras_moe")
class Experts(FeedForwardWeights):
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

    `keras.Model.quantize("int8")` reaches the stacked kernels: each is
    stored as int8 `[E, d, f]` with a float scale per expert and output
    channel (`up_kernel_scale [E, f]`), a quarter of the float32 memory;
    `"int4"` packs two 4-bit values per byte (`[E, ceil(d / 2), f]`) with
    a float scale per expert, output channel and group of input rows, about
    a seventh and a half of the float32 memory. `"float8"` runs the projections in float8 with delayed scaling, and
    `enable_lora(rank)` fine-tunes a low-rank adaptation per expert while
    the kernels stay frozen (see `FeedForwardWeights`).

    Args:
        num_experts: int, the number of experts `E`.
        intermediate_dim: int, the hidden width `f` of each expert.
        activation: activation name or callable. Defaults to `"silu"`.
        gated: bool, whether experts are gated (GLU) feed-forward blocks.
        use_bias: bool, whether the expert projections have biases.
        kernel_initializer: initializer of the kernels; fan-based
            initializers are applied per expert.
        bias_initializer: initializer of the biases.
        dropout: float in `[0, 1)`, dropout on each expert's hidden
            activation in training ("expert dropout"). Defaults to 0.
        lora_rank: optional int, enable LoRA of this rank when built.
        lora_alpha: optional float, the LoRA scale numerator (defaults to
            `lora_rank`).
        quantization_config: optional `keras.quantizers.QuantizationConfig`
            used when the layer is built with a quantized dtype policy.
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

    Quantized to int8, per expert and output channel:

    >>> from keras import ops
    >>> outputs = ops.convert_to_numpy(experts(buffers))
    >>> experts.quantize("int8")
    >>> experts.up_kernel.dtype, tuple(experts.up_kernel_scale.shape)
    ('int8', (4, 32))
    >>> error = np.abs(ops.convert_to_numpy(experts(buffers)) - outputs)
    >>> bool(error.max() < 0.05 * np.abs(outputs).max())
    True

    LoRA: only the per-expert low-rank factors train.

    >>> experts = Experts(num_experts=4, intermediate_dim=32)
    >>> experts.build((4, None, 16))
    >>> experts.enable_lora(rank=2)
    >>> sorted(w.name for w in experts.trainable_weights)[:2]
    ['down_kernel_lora_a', 'down_kernel_lora_b']
    >>> tuple(experts.up_kernel_lora_a.shape), len(experts.trainable_weights)
    ((4, 16, 2), 6)
    """

    _EQUATION = "...eci,eio->...eco"
    _INPUT_GRADIENT_EQUATION = "...eco,eio->...eci"

    def __init__(self, num_experts, *args, **kwargs):
        num_experts = check_int("num_experts", num_experts, min_value=1)
        super().__init__(*args, **kwargs)
        self.num_experts = num_experts

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
        self._build_projections(
            input_shape,
            per_expert_initializer(self.kernel_initializer, self.num_experts),
        )

    def _kernel_shapes(self):
        up_shape = (self.num_experts, self.hidden_dim, self.intermediate_dim)
        shapes = {"gate": up_shape} if self.gated else {}
        shapes["up"] = up_shape
        shapes["down"] = (self.num_experts, self.intermediate_dim, self.hidden_dim)
        return shapes

    def _float_variable_names(self):
        # Every kernel, then every bias: the order the layer has always
        # built (and saved) them in.
        names = [f"{name}_kernel" for name in self.projections]
        if self.use_bias:
            names += [f"{name}_bias" for name in self.projections]
        return names

    def grouped_call(self, rows, layout, kernel="tiles", training=None):
        """The experts on rows in the grouped layout (dropless at sparse cost).

        Each expert's rows are multiplied by its own kernels only (see
        `keras_moe.ops.grouped_matmul`); rows outside the tiles in use come
        out as zeros. Quantized kernels are dequantized for the product
        (the grouped path computes weight-only); LoRA and biases apply per
        row's expert.

        Args:
            rows: `[M, d]`, the routed rows sorted by expert.
            layout: the `TileLayout` of the rows (ungrouped: `tile_experts`
                `[max_tiles]`, `num_tiles` scalar, `group_sizes` `[E]`).
            kernel: the grouped matmul kernel, `"tiles"`, `"ragged_dot"` or
                `"grouped_mm"`.
            training: bool, turns on the experts' dropout.

        Returns:
            `[M, d]`.

        Example:

        >>> import numpy as np
        >>> from keras_moe.ops.grouped_matmul import TileLayout
        >>> experts = Experts(num_experts=2, intermediate_dim=8)
        >>> experts.build((2, None, 4))
        >>> rows = np.random.normal(size=(4, 4)).astype("float32")
        >>> layout = TileLayout(2, np.array([0, 1]), np.array(2), np.array([2, 2]))
        >>> grouped = ops.convert_to_numpy(experts.grouped_call(rows, layout))
        >>> by_buffers = ops.convert_to_numpy(experts(rows.reshape(2, 2, 4)))
        >>> bool(np.allclose(grouped, by_buffers.reshape(4, 4), atol=1e-5))
        True
        """

        def contract(inputs, kernels):
            return grouped_matmul(inputs, kernels, layout, kernel)

        def row_bias(bias):
            row_experts = ops.repeat(layout.tile_experts, layout.tile_size, axis=0)
            return ops.take(bias, row_experts, axis=0)

        def project(inputs, name):
            outputs = contract(inputs, self._dequantized_kernel(name))
            return self._add_lora_and_bias(
                inputs, outputs, name, contract=contract, expand_bias=row_bias
            )

        return self._feed_forward(
            ops.cast(rows, self.compute_dtype), project, training
        )

    def get_config(self):
        config = super().get_config()
        config["num_experts"] = self.num_experts
        return config
