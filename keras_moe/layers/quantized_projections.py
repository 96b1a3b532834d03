"""Keras' quantization protocol for the projections of `FeedForwardWeights`.

`QuantizedProjections` is the base of `FeedForwardWeights` (and so of
`Experts` and `FeedForward`) that makes `model.quantize(mode)` reach their
kernels, whatever their rank (`[E, d, f]` stacked per expert, `[d, f]`
dense):

- `"int8"`: int8 kernels, one float scale per (expert and) output channel
  (`int8_projection`);
- `"int4"`: two 4-bit values packed per int8 byte along the input axis,
  with float scales per (expert and) output channel or per group of
  `block_size` input rows (`int4_projection`);
- `"float8"`: float kernels, each projection computed in float8 with
  delayed scaling (`float8_projection`).

It also saves and loads the quantized variables (with the mode, and what
the config of a layer built by another layer does not carry) and gives the
float kernel of any mode (`_dequantized_kernel`, `_merged_kernel`). The
subclass provides `projections`, `_kernel_shapes()`,
`_float_variable_names()`, `_feed_forward`, `_add_lora_and_bias`,
`_reset_lora` and the einsum equations.
"""

import gc

import keras
import numpy as np
from keras import ops
from keras import quantizers

from keras_moe.backend.keras_internals import get_block_size_for_layer
from keras_moe.layers.float8_projection import FLOAT8_VARIABLES
from keras_moe.layers.float8_projection import float8_project
from keras_moe.layers.int4_projection import check_block_size
from keras_moe.layers.int4_projection import dequantize_int4_kernel
from keras_moe.layers.int4_projection import int4_project
from keras_moe.layers.int4_projection import quantize_int4_kernel
from keras_moe.layers.int8_projection import dequantize_kernel
from keras_moe.layers.int8_projection import int8_project
from keras_moe.layers.int8_projection import quantize_kernel

# The `model.quantize` modes these kernels implement; Keras' others (gptq,
# awq) are refused, never skipped.
QUANTIZATION_MODES = ("int8", "float8", "int4")
# Saved after the int8 and int4 variables: whether the inputs are quantized.
_INPUTS_QUANTIZED = "inputs_quantized"
# Saved last for int4: the group length of the scales (-1: per channel).
_INT4_BLOCK_SIZE = "int4_block_size"
# Saved beside the variables of a quantized layer: its quantization mode,
# which the config of a layer built by another layer does not carry.
_SAVED_MODE = "quantization_mode"
# Files written before the mode was saved beside the weights hold these.
_LEGACY_MODES = (None, "int8", "float8")


def unsupported_mode_error(mode, layer=None):
    """The `ValueError` for a quantization mode the kernels cannot take.

    Args:
        mode: the mode asked for.
        layer: the layer refusing it, `None` for a whole model's check.

    Returns:
        A `ValueError` naming the supported modes and the way to quantize
        the other layers only.

    Example:

    >>> error = unsupported_mode_error("gptq")
    >>> "mode='gptq'. Supported modes: 'int8', 'float8', 'int4'" in str(error)
    True
    """
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


class QuantizedProjections(keras.layers.Layer):
    """Keras' quantization protocol for a block of named projections.

    The base of `FeedForwardWeights`, which documents what each mode stores;
    see the module docstring for what a subclass provides.

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import Experts
    >>> experts = Experts(num_experts=2, intermediate_dim=8)
    >>> experts.build((2, None, 16))
    >>> isinstance(experts, QuantizedProjections)
    True
    >>> experts.quantize("int4")  # groups of 128 input rows: Keras' default
    >>> experts.up_kernel.dtype, tuple(experts.up_kernel.shape)
    ('int8', (2, 8, 8))
    >>> tuple(experts.up_kernel_scale.shape)  # [E, groups, f]
    (2, 1, 8)
    >>> tuple(experts._dequantized_kernel("up").shape)
    (2, 16, 8)
    """

    # Forward pass ----------------------------------------------------------

    def _int8_call(self, inputs, training=None):
        return self._feed_forward(inputs, self._int8_project, training)

    def _int4_call(self, inputs, training=None):
        return self._feed_forward(inputs, self._int4_project, training)

    def _float8_call(self, inputs, training=None):
        if self.lora_enabled:
            raise NotImplementedError(
                f"`{type(self).__name__}` does not support LoRA in float8 "
                "mode (neither does `keras.layers.Dense`)."
            )
        return self._feed_forward(
            inputs, lambda x, name: self._float8_project(x, name, training), training
        )

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

    def _int4_project(self, inputs, name):
        outputs = int4_project(
            inputs,
            getattr(self, f"{name}_kernel"),
            getattr(self, f"{name}_kernel_scale"),
            self._kernel_shapes()[name][-2],
            self._EQUATION,
            self._INPUT_GRADIENT_EQUATION,
            block_size=self._int4_block_size,
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

    def _float_kernel(self, name, dtype):
        """Projection `name`'s stored kernel as float `dtype`, any mode."""
        kernel = getattr(self, f"{name}_kernel")
        scale_name = f"{name}_kernel_scale"
        if self.quantization_mode == "int8":
            return dequantize_kernel(kernel, getattr(self, scale_name), dtype)
        if self.quantization_mode == "int4":
            return dequantize_int4_kernel(
                kernel,
                getattr(self, scale_name),
                self._kernel_shapes()[name][-2],
                self._int4_block_size,
                dtype,
            )
        return ops.cast(kernel, dtype)

    def _dequantized_kernel(self, name):
        """Projection `name`'s kernel as a float tensor, whatever the mode.

        What the grouped expert path multiplies with: int8 and int4 kernels
        are dequantized (unpacked first for int4; the path then computes
        weight-only), float8 kernels are stored in float already. In the
        compute dtype.
        """
        return self._float_kernel(name, self.compute_dtype)

    def _merged_kernel(self, name):
        """The float kernel with its LoRA adaptation added in."""
        kernel = self._float_kernel(name, "float32")
        delta = ops.matmul(
            getattr(self, f"{name}_kernel_lora_a"),
            getattr(self, f"{name}_kernel_lora_b"),
        )
        return ops.cast(
            kernel + (self.lora_alpha / self.lora_rank) * delta,
            self.variable_dtype,
        )

    # Quantization ----------------------------------------------------------

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantize the kernels in place: `"int8"`, `"int4"` or `"float8"`.

        `keras.Model.quantize` calls it on every layer; the routers of the
        MoE layers do not implement it and stay float. See
        `FeedForwardWeights` for what each mode stores.

        Args:
            mode: `"int8"`, `"int4"` or `"float8"`. Other Keras modes
                (`"gptq"`, `"awq"`) raise a `ValueError` and leave the layer
                float: `Model.quantize` would turn a `NotImplementedError`
                into a warning and leave the experts, most of a MoE model's
                memory, unquantized without a word.
            type_check: bool, refuse subclasses that change the forward
                pass, as Keras' own layers do.
            config: optional `keras.quantizers.QuantizationConfig`. For
                int8, its `weight_quantizer` must reduce over the kernel's
                input axis (-2), and `activation_quantizer=None` keeps the
                inputs in the compute dtype (weight-only int8). For int4,
                `Int4QuantizationConfig(block_size=...)` picks group-wise
                scales (Keras' default, 128) or per-channel ones (`None`
                or -1; only these take an `activation_quantizer` or a
                custom `weight_quantizer`).
        """
        from keras_moe.layers.feed_forward_weights import FeedForwardWeights

        if type_check and type(self).call is not FeedForwardWeights.call:
            raise self._not_implemented_error(self.quantize)
        if mode not in QUANTIZATION_MODES:
            raise unsupported_mode_error(mode, self)
        layer_name = type(self).__name__
        if mode == "int4":
            block_size = check_block_size(
                get_block_size_for_layer(self, config), layer_name
            )
            self._check_int4_inputs_quantizer(config, block_size)
        if mode in ("int8", "int4"):
            quantized = {}
            for name in self.projections:
                kernel = (
                    self._merged_kernel(name)
                    if self.lora_enabled
                    else getattr(self, f"{name}_kernel")
                )
                quantized[name] = (
                    quantize_kernel(kernel, config, layer_name=layer_name)
                    if mode == "int8"
                    else quantize_int4_kernel(
                        kernel, block_size, config, layer_name=layer_name
                    )
                )
            self.quantization_config = config
            self._delete_variables([f"{name}_kernel" for name in self.projections])
            self.quantized_build(None, mode, config)
            for name, (kernel, kernel_scale) in quantized.items():
                getattr(self, f"{name}_kernel").assign(kernel)
                getattr(self, f"{name}_kernel_scale").assign(kernel_scale)
            if self.lora_enabled:
                self._reset_lora()
        else:
            self.quantization_config = config
            self.quantized_build(None, mode, config)
        if self.dtype_policy.quantization_mode is None:
            policy_mode = mode
            if mode == "int4":
                policy_mode = f"int4/{-1 if block_size is None else block_size}"
            self.dtype_policy = keras.dtype_policies.get(
                f"{policy_mode}_from_{self.dtype_policy.name}"
            )

    def _check_int4_inputs_quantizer(self, config, block_size):
        quantizer = quantizers.QuantizationConfig.activation_quantizer_or_default(
            config, None
        )
        if quantizer is not None and block_size is not None:
            raise ValueError(
                f"`{type(self).__name__}` layer {self.name!r}: group-wise int4 "
                f"(block_size={block_size}) keeps the inputs in the compute "
                "dtype; an `activation_quantizer` needs per-channel scales "
                "(`Int4QuantizationConfig(block_size=None, ...)`)."
            )
        return quantizer

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
        elif mode == "int4":
            block_size = check_block_size(
                get_block_size_for_layer(self, config), type(self).__name__
            )
            self.inputs_quantizer = self._check_int4_inputs_quantizer(
                config, block_size
            )
            self._int4_block_size = block_size
            for name, shape in self._kernel_shapes().items():
                fan_in, fan_out = shape[-2:]
                self._add_projection_weight(
                    f"{name}_kernel",
                    shape[:-2] + ((fan_in + 1) // 2, fan_out),
                    "zeros",
                    dtype="int8",
                    trainable=False,
                )
                groups = () if block_size is None else (-(-fan_in // block_size),)
                self._add_projection_weight(
                    f"{name}_kernel_scale",
                    shape[:-2] + groups + (fan_out,),
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
        scale_names = [f"{name}_kernel_scale" for name in self.projections]
        return {
            None: float_names,
            "int8": float_names + scale_names + [_INPUTS_QUANTIZED],
            "int4": float_names
            + scale_names
            + [_INPUTS_QUANTIZED, _INT4_BLOCK_SIZE],
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
                elif mode == "int4":
                    kernel, merged[f"{name}_kernel_scale"] = quantize_int4_kernel(
                        kernel, self._int4_block_size, layer_name=type(self).__name__
                    )
                merged[f"{name}_kernel"] = kernel
        for index, name in enumerate(self.variable_serialization_spec[mode]):
            if name == _INPUTS_QUANTIZED:
                store[str(index)] = np.array(
                    [self.inputs_quantizer is not None], "int8"
                )
            elif name == _INT4_BLOCK_SIZE:
                block_size = self._int4_block_size
                store[str(index)] = np.array(
                    [-1 if block_size is None else block_size], "int32"
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
            config = None
            if saved_mode == "int4":
                config = quantizers.Int4QuantizationConfig(
                    block_size=self._saved_int4_block_size(store)
                )
            self.quantize(saved_mode, config=config)
        names = self.variable_serialization_spec.get(self.quantization_mode)
        saved_count = len(store.keys()) - (_SAVED_MODE in store.keys())
        if saved_mode != self.quantization_mode or saved_count != len(names):
            self._check_load_own_variables(store)
        if not self.built:
            return
        if saved_mode == "int4":
            saved_block_size = self._saved_int4_block_size(store)
            if saved_block_size != self._int4_block_size:
                raise ValueError(
                    f"`{type(self).__name__}` layer {self.name!r} has int4 "
                    f"scales for block_size={self._int4_block_size}, but the "
                    f"saved ones are for block_size={saved_block_size} (None: "
                    "per output channel)."
                )
        for index, name in enumerate(names):
            if name == _INPUTS_QUANTIZED:
                quantized = bool(np.asarray(store[str(index)]).any())
                if not quantized:
                    self.inputs_quantizer = None
                elif self.inputs_quantizer is None:
                    self.inputs_quantizer = quantizers.AbsMaxQuantizer()
            elif name != _INT4_BLOCK_SIZE:
                getattr(self, name).assign(store[str(index)])
        if self.lora_enabled:
            # The saved kernels hold the merged adaptation.
            self._reset_lora()

    def _saved_int4_block_size(self, store):
        """The int4 group length saved in `store` (`None`: per channel)."""
        index = len(self.variable_serialization_spec["int4"]) - 1
        block_size = int(np.asarray(store[str(index)]).reshape(-1)[0])
        return None if block_size == -1 else block_size

    def _saved_mode(self, store):
        """The quantization mode `store` was saved in (`None`: float)."""
        if _SAVED_MODE in store.keys():
            return np.asarray(store[_SAVED_MODE]).astype("uint8").tobytes().decode()
        # Files written before the mode was saved beside the weights: each
        # mode saves its own number of arrays, and int8 kernels come first.
        spec = self.variable_serialization_spec
        modes_by_count = {len(spec[mode]): mode for mode in _LEGACY_MODES}
        mode = modes_by_count.get(len(store.keys()))
        if mode == "int8" and np.dtype(store["0"].dtype) != np.int8:
            return None
        return mode
