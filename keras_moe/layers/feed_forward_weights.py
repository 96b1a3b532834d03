"""The weights of a feed-forward block, shared by `Experts` and `FeedForward`.

`FeedForwardWeights` holds what both layers are made of: the `gate`, `up`
and `down` projections, their activation, biases, and Keras' quantization
(int8, float8) and LoRA protocol. A subclass says only what differs: the
shape of its kernels, how they contract with its inputs, and its own
arguments.
"""

import gc

import keras
import numpy as np
from keras import ops
from keras import quantizers

from keras_moe.layers.float8_projection import FLOAT8_VARIABLES
from keras_moe.layers.float8_projection import float8_project
from keras_moe.layers.int8_projection import dequantize_kernel
from keras_moe.layers.int8_projection import int8_project
from keras_moe.layers.int8_projection import quantize_kernel
from keras_moe.layers.projection_arguments import get_activation
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int

# The `model.quantize` modes these kernels implement; Keras' others (int4,
# gptq, awq) are refused, never skipped.
QUANTIZATION_MODES = ("int8", "float8")
# Saved after the int8 variables: whether the inputs are quantized too.
_INPUTS_QUANTIZED = "inputs_quantized"
# Saved beside the variables of a quantized layer: its quantization mode,
# which the config of a layer built by another layer does not carry.
_SAVED_MODE = "quantization_mode"


def unsupported_mode_error(mode, layer=None):
    """The `ValueError` for a quantization mode the kernels cannot take
    (`layer`: the layer refusing it, `None` for a whole model's check)."""
    who = (
        f"`{type(layer).__name__}` layer {layer.name!r}"
        if layer is not None
        else "The expert and feed-forward layers (`Experts`, `FeedForward`)"
    )
    return ValueError(
        f"{who} cannot be quantized to mode={mode!r}. Supported modes: "
        f"{', '.join(repr(m) for m in QUANTIZATION_MODES)}. To quantize only "
        "the other layers, pass `filters` that leave these out, e.g. "
        "`model.quantize(mode, filters=lambda layer: not isinstance(layer, "
        "(Experts, FeedForward)))`, both from `keras_moe.layers`."
    )


class FeedForwardWeights(keras.layers.Layer):
    """The weights and arithmetic shared by `Experts` and `FeedForward`.

    A feed-forward block of two or three projections (`gate`, `up`,
    `down`), each a kernel `[..., fan_in, fan_out]` contracted with the last
    axis of its input: `[E, d, f]` for a bank of experts (inputs
    `[..., E, C, d]`), `[d, f]` for a dense block (inputs `[..., d]`). Gated
    blocks compute `down(activation(x @ gate) * (x @ up))`, plain ones
    `down(activation(x @ up))`.

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
    - `quantize("float8")` keeps float kernels and runs each projection in
      float8 with delayed scaling (Keras' float8 training recipe).
    - `enable_lora(rank)` freezes the kernels (and biases) and adds trainable
      low-rank factors `up_kernel_lora_a [..., d, r]` and
      `up_kernel_lora_b [..., r, f]` per kernel, one pair per expert for
      stacked kernels; saving merges them into the kernels, as Keras does.

    The quantization mode is saved as Keras saves it, in the dtype policy
    of the layer's config (`"int8_from_float32"`), and also beside the
    weights of a quantized layer, with whether its inputs are quantized:
    a layer built by a MoE layer, whose config carries neither, quantizes
    itself to the saved mode when it loads (a custom activation quantizer
    comes back as the default `AbsMaxQuantizer`).

    A subclass sets `_EQUATION` and `_INPUT_GRADIENT_EQUATION` (or
    `_contract`), `_kernel_shapes()` and `_float_variable_names()`; a
    `build` of its own checks its input shape, then calls
    `_build_projections`.

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
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

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
            if kind == "kernel" and mode == "int8":
                continue  # `quantized_build` makes the int8 kernels.
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
        return self._feed_forward(inputs, self._float_project)

    def _int8_call(self, inputs, training=None):
        return self._feed_forward(inputs, self._int8_project)

    def _float8_call(self, inputs, training=None):
        if self.lora_enabled:
            raise NotImplementedError(
                f"`{type(self).__name__}` does not support LoRA in float8 "
                "mode (neither does `keras.layers.Dense`)."
            )
        return self._feed_forward(
            inputs, lambda x, name: self._float8_project(x, name, training)
        )

    def _feed_forward(self, inputs, project):
        up = project(inputs, "up")
        if self.gated:
            hidden = self._activation_fn(project(inputs, "gate")) * up
        else:
            hidden = self._activation_fn(up)
        return project(hidden, "down")

    def _float_project(self, inputs, name):
        outputs = self._contract(inputs, getattr(self, f"{name}_kernel"))
        return self._add_lora_and_bias(inputs, outputs, name)

    def _int8_project(self, inputs, name):
        outputs = int8_project(
            inputs,
            getattr(self, f"{name}_kernel"),
            getattr(self, f"{name}_kernel_scale"),
            self._EQUATION,
            self._INPUT_GRADIENT_EQUATION,
            inputs_quantizer=self.inputs_quantizer,
            compute_dtype=self.compute_dtype,
        )
        return self._add_lora_and_bias(inputs, outputs, name)

    def _float8_project(self, inputs, name, training):
        outputs = float8_project(
            inputs,
            getattr(self, f"{name}_kernel"),
            {suffix: getattr(self, f"{name}_{suffix}") for suffix in FLOAT8_VARIABLES},
            self._EQUATION,
            training=training,
            compute_dtype=self.compute_dtype,
        )
        return self._add_lora_and_bias(inputs, outputs, name)

    def _add_lora_and_bias(self, inputs, outputs, name):
        if self.lora_enabled:
            lora_a = getattr(self, f"{name}_kernel_lora_a")
            lora_b = getattr(self, f"{name}_kernel_lora_b")
            low_rank = ops.einsum(
                self._EQUATION, ops.einsum(self._EQUATION, inputs, lora_a), lora_b
            )
            outputs = outputs + ops.cast(
                self.lora_alpha / self.lora_rank, outputs.dtype
            ) * ops.cast(low_rank, outputs.dtype)
        if self.use_bias:
            # `[..., fan_out]` biases broadcast over the slot axis.
            outputs = outputs + ops.expand_dims(getattr(self, f"{name}_bias"), -2)
        return outputs

    # Quantization ----------------------------------------------------------

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantize the kernels in place: `"int8"` or `"float8"`.

        `keras.Model.quantize` calls it on every layer; the routers of the
        MoE layers do not implement it and stay float. See the class
        docstring for what each mode stores.

        Args:
            mode: `"int8"` or `"float8"`. Other Keras modes (`"int4"`,
                `"gptq"`, `"awq"`) raise a `ValueError` and leave the layer
                float: `Model.quantize` would turn a `NotImplementedError`
                into a warning and leave the experts, most of a MoE model's
                memory, unquantized without a word.
            type_check: bool, refuse subclasses that change the forward
                pass, as Keras' own layers do.
            config: optional `keras.quantizers.QuantizationConfig`; for int8,
                its `weight_quantizer` must reduce over the kernel's input
                axis (-2), and `activation_quantizer=None` keeps the inputs
                in the compute dtype (weight-only int8).
        """
        if type_check and type(self).call is not FeedForwardWeights.call:
            raise self._not_implemented_error(self.quantize)
        if mode not in QUANTIZATION_MODES:
            raise unsupported_mode_error(mode, self)
        self.quantization_config = config
        if mode == "int8":
            quantized = {
                name: quantize_kernel(
                    self._merged_kernel(name)
                    if self.lora_enabled
                    else getattr(self, f"{name}_kernel"),
                    config,
                    layer_name=type(self).__name__,
                )
                for name in self.projections
            }
            self._delete_variables([f"{name}_kernel" for name in self.projections])
            self.quantized_build(None, mode, config)
            for name, (kernel, kernel_scale) in quantized.items():
                getattr(self, f"{name}_kernel").assign(kernel)
                getattr(self, f"{name}_kernel_scale").assign(kernel_scale)
            if self.lora_enabled:
                self._reset_lora()
        else:
            self.quantized_build(None, mode, config)
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = keras.dtype_policies.get(
                f"{mode}_from_{self.dtype_policy.name}"
            )

    def _delete_variables(self, names):
        """Drop variables, then collect garbage once to free their buffers.

        `keras.layers.Layer.__delattr__` runs a full `gc.collect()` per
        variable, which takes a second or more in a process holding a large
        framework.
        """
        for name in names:
            self._untrack_variable(getattr(self, name))
            super(keras.layers.Layer, self).__delattr__(name)
        gc.collect()

    def quantized_build(self, input_shape, mode, config=None):
        """Create the variables of quantization `mode` (kernels built)."""
        if mode == "int8":
            self.inputs_quantizer = (
                quantizers.QuantizationConfig.activation_quantizer_or_default(
                    config, quantizers.AbsMaxQuantizer()
                )
            )
            for name, shape in self._kernel_shapes().items():
                self._add_projection_weight(
                    f"{name}_kernel", shape, "zeros", dtype="int8", trainable=False
                )
                self._add_projection_weight(
                    f"{name}_kernel_scale",
                    shape[:-2] + shape[-1:],
                    "ones",
                    trainable=False,
                )
        elif mode == "float8":
            history_length = getattr(
                self.dtype_policy,
                "amax_history_length",
                keras.dtype_policies.QuantizedFloat8DTypePolicy.default_amax_history_length,
            )
            for name in self.projections:
                for suffix in FLOAT8_VARIABLES:
                    is_history = suffix.endswith("amax_history")
                    self._add_projection_weight(
                        f"{name}_{suffix}",
                        (history_length,) if is_history else (),
                        "zeros" if is_history else "ones",
                        dtype="float32",
                        trainable=True,
                        autocast=False,
                        overwrite_with_gradient=True,
                    )
        else:
            raise unsupported_mode_error(mode, self)
        self._is_quantized = True

    def _add_projection_weight(self, name, shape, initializer, **kwargs):
        setattr(
            self,
            name,
            self.add_weight(name=name, shape=shape, initializer=initializer, **kwargs),
        )

    # Saving ----------------------------------------------------------------

    @property
    def variable_serialization_spec(self):
        """The variables saved for each quantization mode, in order."""
        float_names = self._float_variable_names()
        return {
            None: float_names,
            "int8": float_names
            + [f"{name}_kernel_scale" for name in self.projections]
            + [_INPUTS_QUANTIZED],
            "float8": float_names
            + [
                f"{name}_{suffix}"
                for name in self.projections
                for suffix in FLOAT8_VARIABLES
            ],
        }

    def save_own_variables(self, store):
        if not self.built:
            return
        mode = self.quantization_mode
        if mode not in self.variable_serialization_spec:
            raise unsupported_mode_error(mode, self)
        merged = {}
        if self.lora_enabled:
            for name in self.projections:
                kernel = self._merged_kernel(name)
                if mode == "int8":
                    kernel, merged[f"{name}_kernel_scale"] = quantize_kernel(
                        kernel, layer_name=type(self).__name__
                    )
                merged[f"{name}_kernel"] = kernel
        for index, name in enumerate(self.variable_serialization_spec[mode]):
            if name == _INPUTS_QUANTIZED:
                store[str(index)] = np.array(
                    [self.inputs_quantizer is not None], "int8"
                )
            else:
                store[str(index)] = merged.get(name, getattr(self, name))
        if mode is not None:
            store[_SAVED_MODE] = np.frombuffer(mode.encode(), "uint8")

    def load_own_variables(self, store):
        saved_mode = self._saved_mode(store)
        if saved_mode is not None and self.quantization_mode is None:
            # A quantized layer built by another layer comes back with that
            # layer's float policy: quantize to the saved mode, then load.
            self.quantize(saved_mode)
        names = self.variable_serialization_spec.get(self.quantization_mode)
        saved_count = len(store.keys()) - (_SAVED_MODE in store.keys())
        if saved_mode != self.quantization_mode or saved_count != len(names):
            self._check_load_own_variables(store)
        if not self.built:
            return
        for index, name in enumerate(names):
            if name == _INPUTS_QUANTIZED:
                quantized = bool(np.asarray(store[str(index)]).any())
                if not quantized:
                    self.inputs_quantizer = None
                elif self.inputs_quantizer is None:
                    self.inputs_quantizer = quantizers.AbsMaxQuantizer()
            else:
                getattr(self, name).assign(store[str(index)])
        if self.lora_enabled:
            # The saved kernels hold the merged adaptation.
            self._reset_lora()

    def _saved_mode(self, store):
        """The quantization mode `store` was saved in (`None`: float)."""
        if _SAVED_MODE in store.keys():
            return np.asarray(store[_SAVED_MODE]).astype("uint8").tobytes().decode()
        # Files written before the mode was saved beside the weights: each
        # mode saves its own number of arrays, and int8 kernels come first.
        modes_by_count = {
            len(names): mode for mode, names in self.variable_serialization_spec.items()
        }
        mode = modes_by_count.get(len(store.keys()))
        if mode == "int8" and np.dtype(store["0"].dtype) != np.int8:
            return None
        return mode

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
        Works on float and int8 layers (QLoRA-style: the int8 kernels stay
        frozen and the adaptation stays float).

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
        if self.quantization_mode not in (None, "int8"):
            raise NotImplementedError(
                f"`{type(self).__name__}` supports LoRA on float and int8 "
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

    def _merged_kernel(self, name):
        """The float kernel with its LoRA adaptation added in."""
        kernel = getattr(self, f"{name}_kernel")
        if self.quantization_mode == "int8":
            kernel = dequantize_kernel(kernel, getattr(self, f"{name}_kernel_scale"))
        delta = ops.matmul(
            getattr(self, f"{name}_kernel_lora_a"),
            getattr(self, f"{name}_kernel_lora_b"),
        )
        return ops.cast(
            ops.cast(kernel, "float32") + (self.lora_alpha / self.lora_rank) * delta,
            self.variable_dtype,
        )

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
