"""The weights of a feed-forward block, shared by `Experts` and `FeedForward`.

`FeedForwardWeights` holds what both layers are made of: the `gate`, `up`
and `down` projections, their activation, biases, and Keras' LoRA protocol;
Keras' quantization protocol (int8, int4, float8) comes from its base,
`QuantizedProjections`. A subclass says only what differs: the shape of its
kernels, how they contract with its inputs, and its own arguments.
"""

import keras
from keras import ops

from keras_moe.layers.clamped_swiglu import ClampedSwiGLU
from keras_moe.layers.projection_arguments import get_activation
from keras_moe.layers.quantized_projections import QUANTIZATION_MODES
from keras_moe.layers.quantized_projections import QuantizedProjections
from keras_moe.layers.quantized_projections import unsupported_mode_error
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_rate

# Re-exported: `keras_moe.models.moe_backbone` checks a model's mode with them.
__all__ = ["FeedForwardWeights", "QUANTIZATION_MODES", "unsupported_mode_error"]


class FeedForwardWeights(QuantizedProjections):
    """The weights and arithmetic shared by `Experts` and `FeedForward`.

    A feed-forward block of two or three projections (`gate`, `up`,
    `down`), each a kernel `[..., fan_in, fan_out]` contracted with the last
    axis of its input: `[E, d, f]` for a bank of experts (inputs
    `[..., E, C, d]`), `[d, f]` for a dense block (inputs `[..., d]`). Gated
    blocks compute `down(activation(x @ gate) * (x @ up))`, plain ones
    `down(activation(x @ up))`. A `ClampedSwiGLU` activation (GPT-OSS)
    combines the gate and up projections itself, clamped and with `up + 1`.
    With `dropout > 0`, training calls drop units of the hidden activation
    (what `down` receives), as T5 and Switch Transformer do inside their
    feed-forward blocks and experts ("expert dropout").

    On top of the float block it implements Keras' quantization and LoRA
    protocol of `keras.layers.EinsumDense`, so that `model.quantize(...)`
    and `backbone.enable_lora(...)` reach these kernels:

    - `quantize("int8")` stores each kernel as int8 with one float scale per
      output channel (per expert and output channel for stacked kernels:
      `up_kernel` int8 `[E, d, f]`, `up_kernel_scale` `[E, f]`), by absolute
      maximum over the kernel's input axis. As for `keras.layers.Dense`,
      the default `Int8QuantizationConfig` also quantizes each input row to
      int8 on the fly; `Int8QuantizationConfig(activation_quantizer=None)`
      keeps the inputs in the compute dtype (weight-only int8, more
      accurate).
    - `quantize("int4")` packs two 4-bit values (`[-8, 7]`, absolute
      maximum mapped to 7) per int8 byte along the input axis (`up_kernel`
      int8 `[E, ceil(d / 2), f]`) with float scales per expert and output
      channel for each group of `block_size` input rows
      (`up_kernel_scale [E, ceil(d / block_size), f]`; Keras' default
      `Int4QuantizationConfig` has `block_size=128`), or per expert and
      output channel only (`block_size=None`: `[E, f]`). The inputs stay
      in the compute dtype (see `keras_moe.layers.int4_projection`).
    - `quantize("float8")` keeps float kernels and runs each projection in
      float8 with delayed scaling (Keras' float8 training recipe).
    - `enable_lora(rank)` freezes the kernels (and biases) and adds trainable
      low-rank factors `up_kernel_lora_a [..., d, r]` and
      `up_kernel_lora_b [..., r, f]` per kernel, one pair per expert for
      stacked kernels; saving merges them into the kernels, as Keras does.

    The quantization mode is saved as Keras saves it, in the dtype policy
    of the layer's config (`"int8_from_float32"`, `"int4/128_from_float32"`),
    and also beside the weights of a quantized layer, with whether its
    inputs are quantized (and the int4 block size):
    a layer built by a MoE layer, whose config carries neither, quantizes
    itself to the saved mode when it loads (a custom activation quantizer
    comes back as the default `AbsMaxQuantizer`).

    A subclass sets `_EQUATION` and `_INPUT_GRADIENT_EQUATION` (or
    `_contract`), `_kernel_shapes()` and `_float_variable_names()`; a
    `build` of its own checks its input shape, then calls
    `_build_projections`.

    Args:
        intermediate_dim: int, the hidden width `f`.
        activation: activation name or callable, or a `ClampedSwiGLU`
            (gated blocks only). Defaults to `"silu"`.
        gated: bool, whether the block is a GLU. Defaults to True.
        use_bias: bool, whether the projections have biases.
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        dropout: float in `[0, 1)`, the rate of dropout on the hidden
            activation in training. Defaults to 0 (no dropout layer, no
            random state).
        lora_rank: optional int, enable LoRA of this rank when built.
        lora_alpha: optional float, the LoRA scale numerator (defaults to
            `lora_rank`).
        quantization_config: optional `keras.quantizers.QuantizationConfig`
            used when the layer is built with a quantized dtype policy.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import FeedForward
    >>> ffn = FeedForward(intermediate_dim=8)
    >>> isinstance(ffn, FeedForwardWeights)
    True
    >>> _ = ffn(np.ones((2, 4), "float32"))
    >>> ffn.projections
    ('gate', 'up', 'down')
    """

    # `inputs [..., fan_in]` x `kernel [fan_in, fan_out]`; subclasses with
    # stacked kernels override both.
    _EQUATION = "...i,io->...o"
    _INPUT_GRADIENT_EQUATION = "...o,io->...i"

    def __init__(
        self,
        intermediate_dim,
        activation="silu",
        gated=True,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        dropout=0.0,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if lora_rank is not None:
            lora_rank = check_int("lora_rank", lora_rank, min_value=1)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else lora_rank
        self.lora_enabled = False
        self.quantization_config = quantization_config
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, min_value=1
        )
        self.activation = activation
        self._activation_fn = get_activation(activation)
        self.gated = check_bool("gated", gated)
        if isinstance(self._activation_fn, ClampedSwiGLU) and not self.gated:
            raise ValueError(
                "A `ClampedSwiGLU` activation combines a gate and an up "
                "projection: it needs `gated=True`. Received: gated=False, "
                f"activation={self._activation_fn!r}"
            )
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.dropout = check_rate("dropout", dropout)
        # Made only when used: a rate of 0 adds no random state to save,
        # thread through compiled steps or shard.
        self.dropout_layer = None
        if self.dropout > 0:
            self.dropout_layer = keras.layers.Dropout(
                self.dropout, dtype=self.dtype_policy, name="dropout"
            )

    @property
    def projections(self):
        """The projection names, in the order their kernels are built."""
        return ("gate", "up", "down") if self.gated else ("up", "down")

    def _kernel_shapes(self):
        """`{projection: kernel shape}`; needs `hidden_dim`."""
        raise NotImplementedError

    def _float_variable_names(self):
        """The float block's variables, in the order they are saved."""
        raise NotImplementedError

    def _contract(self, inputs, kernel):
        return ops.einsum(self._EQUATION, inputs, kernel)

    def build(self, input_shape):
        self._build_projections(input_shape, self.kernel_initializer)

    def _build_projections(self, input_shape, kernel_initializer):
        """Create every kernel and bias, quantized if the policy says so."""
        if input_shape[-1] is None:
            raise ValueError(
                f"The last dimension of the `{type(self).__name__}` input must "
                f"be known. Received: input_shape={tuple(input_shape)}"
            )
        self.hidden_dim = int(input_shape[-1])
        mode = self.quantization_mode
        if mode is not None and mode not in QUANTIZATION_MODES:
            raise unsupported_mode_error(mode, self)
        shapes = self._kernel_shapes()
        for variable_name in self._float_variable_names():
            name, kind = variable_name.rsplit("_", 1)
            if kind == "kernel" and mode in ("int8", "int4"):
                continue  # `quantized_build` makes the integer kernels.
            if kind == "kernel":
                shape, initializer = shapes[name], kernel_initializer
            else:
                shape = shapes[name][:-2] + shapes[name][-1:]
                initializer = self.bias_initializer
            self._add_projection_weight(variable_name, shape, initializer)
        if mode is not None:
            self.quantized_build(None, mode, self.quantization_config)
        if self.lora_rank:
            self.built = True  # as `keras.layers.EinsumDense.build` does
            self.enable_lora(self.lora_rank, lora_alpha=self.lora_alpha)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    # Forward pass ----------------------------------------------------------

    def call(self, inputs, training=None):
        return self._feed_forward(inputs, self._float_project, training)

    def _feed_forward(self, inputs, project, training=None):
        """The block on `inputs`, with `project(x, name)` for each projection.

        Every path (float, quantized, grouped rows) runs through here, so
        the activation and the dropout on it are written once.
        """
        up = project(inputs, "up")
        if isinstance(self._activation_fn, ClampedSwiGLU):
            hidden = self._activation_fn.gated_product(project(inputs, "gate"), up)
        elif self.gated:
            hidden = self._activation_fn(project(inputs, "gate")) * up
        else:
            hidden = self._activation_fn(up)
        if self.dropout_layer is not None:
            hidden = self.dropout_layer(hidden, training=training)
        return project(hidden, "down")

    def _float_project(self, inputs, name):
        outputs = self._contract(inputs, getattr(self, f"{name}_kernel"))
        return self._add_lora_and_bias(inputs, outputs, name)

    def _add_lora_and_bias(self, inputs, outputs, name, contract=None, expand_bias=None):
        """Add projection `name`'s LoRA term and bias to `outputs`.

        `contract(inputs, kernel)` and `expand_bias(bias)` default to this
        layer's own; the grouped expert path passes its row-wise versions.
        """
        contract = contract or self._contract
        if self.lora_enabled:
            lora_a = getattr(self, f"{name}_kernel_lora_a")
            lora_b = getattr(self, f"{name}_kernel_lora_b")
            low_rank = contract(contract(inputs, lora_a), lora_b)
            outputs = outputs + ops.cast(
                self.lora_alpha / self.lora_rank, outputs.dtype
            ) * ops.cast(low_rank, outputs.dtype)
        if self.use_bias:
            bias = getattr(self, f"{name}_bias")
            # `[..., fan_out]` biases broadcast over the slot axis.
            bias = ops.expand_dims(bias, -2) if expand_bias is None else expand_bias(bias)
            outputs = outputs + bias
        return outputs

    # LoRA ------------------------------------------------------------------

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """Freeze the kernels and train low-rank adaptations of them.

        Each kernel `W [..., fan_in, fan_out]` is used as
        `W + (lora_alpha / rank) * A @ B`, with trainable float32
        `A [..., fan_in, rank]` and `B [..., rank, fan_out]` (one pair per
        expert for stacked kernels). `B` starts at zero, so the layer
        starts as it was. The kernels and biases become non-trainable.
        Works on float, int8 and int4 layers (QLoRA-style: the integer
        kernels stay frozen and the adaptation stays float).

        Args:
            rank: int >= 1, the rank `r` of the adaptation.
            lora_alpha: float, the scale numerator. Defaults to `rank`.
            a_initializer: initializer of `A`.
            b_initializer: initializer of `B`.
        """
        if not self.built:
            raise ValueError(
                f"Cannot enable LoRA on `{type(self).__name__}` layer "
                f"{self.name!r} before it is built: call it on data (or "
                "build the model) first."
            )
        if self.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on layer {self.name!r} (with "
                f"rank={self.lora_rank}); it can be enabled once per layer."
            )
        rank = check_int("rank", rank, min_value=1)
        if self.quantization_mode not in (None, "int8", "int4"):
            raise NotImplementedError(
                f"`{type(self).__name__}` supports LoRA on float, int8 and int4 "
                f"kernels. Received: quantization mode "
                f"{self.quantization_mode!r}"
            )
        self._tracker.unlock()
        try:
            for name, shape in self._kernel_shapes().items():
                # float32 factors: a low-precision update of a low-rank
                # product underflows (the kernels keep their dtype).
                self._add_projection_weight(
                    f"{name}_kernel_lora_a",
                    shape[:-1] + (rank,),
                    keras.initializers.get(a_initializer),
                    dtype="float32",
                )
                self._add_projection_weight(
                    f"{name}_kernel_lora_b",
                    shape[:-2] + (rank, shape[-1]),
                    keras.initializers.get(b_initializer),
                    dtype="float32",
                )
                getattr(self, f"{name}_kernel").trainable = False
                if self.use_bias:
                    getattr(self, f"{name}_bias").trainable = False
        finally:
            self._tracker.lock()
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    def _reset_lora(self):
        for name in self.projections:
            lora_b = getattr(self, f"{name}_kernel_lora_b")
            lora_b.assign(ops.zeros(lora_b.shape, lora_b.dtype))

    # Config ----------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": (
                    self.activation
                    if isinstance(self.activation, str)
                    else keras.activations.serialize(self._activation_fn)
                ),
                "gated": self.gated,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "dropout": self.dropout,
            }
        )
        if self.lora_rank:
            config["lora_rank"] = self.lora_rank
            config["lora_alpha"] = self.lora_alpha
        if self.quantization_config is not None:
            config["quantization_config"] = keras.saving.serialize_keras_object(
                self.quantization_config
            )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("quantization_config") is not None:
            config["quantization_config"] = keras.saving.deserialize_keras_object(
                config["quantization_config"]
            )
        return super().from_config(config)
