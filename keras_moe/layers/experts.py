import gc

import keras
import ml_dtypes
import numpy as np
from keras import ops
from keras import quantizers

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


# The float8 training state of one projection, as in `keras.layers.Dense`:
# delayed scaling of its inputs, its kernel and its outputs' gradient.
_FLOAT8_VARIABLES = (
    "inputs_scale",
    "inputs_amax_history",
    "kernel_scale",
    "kernel_amax_history",
    "outputs_grad_scale",
    "outputs_grad_amax_history",
)
_QUANTIZATION_MODES = ("int8", "float8")
# Saved after the int8 variables: whether the inputs are quantized too.
_INPUTS_QUANTIZED = "inputs_quantized"


def _float8_max(dtype):
    return float(ml_dtypes.finfo(dtype).max)


class FeedForwardWeights(keras.layers.Layer):
    """The weights and arithmetic shared by `Experts` and `FeedForward`.

    A feed-forward block of two or three projections (`gate`, `up`,
    `down`), each a kernel `[..., fan_in, fan_out]` contracted with the last
    axis of its input: `[E, d, f]` for a bank of experts (inputs
    `[..., E, C, d]`), `[d, f]` for a dense block (inputs `[..., d]`).

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
      accurate). Which of the two a layer uses is saved with its weights,
      so a model reloads to the same outputs even when the layer sits
      inside a MoE layer, whose config does not carry the quantization
      config (a custom activation quantizer comes back as the default
      `AbsMaxQuantizer`).
    - `quantize("float8")` keeps float kernels and runs each projection in
      float8 with delayed scaling (Keras' float8 training recipe).
    - `enable_lora(rank)` freezes the kernels (and biases) and adds trainable
      low-rank factors `up_kernel_lora_a [..., d, r]` and
      `up_kernel_lora_b [..., r, f]` per kernel, one pair per expert for
      stacked kernels; saving merges them into the kernels, as Keras does.

    Subclasses set `_contract(inputs, kernel)` and the einsum equations.
    """

    # `inputs [..., fan_in]` x `kernel [fan_in, fan_out]`; subclasses with
    # stacked kernels override both.
    _EQUATION = "...i,io->...o"
    _INPUT_GRADIENT_EQUATION = "...o,io->...i"

    def _init_lora(self, lora_rank, lora_alpha):
        if lora_rank is not None:
            lora_rank = check_int("lora_rank", lora_rank, min_value=1)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else lora_rank
        self.lora_enabled = False
        self.quantization_config = None

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

    def _build_projections(self, kernel_initializer):
        """Create every kernel and bias, quantized if the policy says so."""
        mode = self.quantization_mode
        if mode is not None and mode not in _QUANTIZATION_MODES:
            raise self._quantization_mode_error(mode)
        shapes = self._kernel_shapes()
        for variable_name in self._float_variable_names():
            name, kind = variable_name.rsplit("_", 1)
            shape = shapes[name]
            if kind == "kernel" and mode == "int8":
                continue  # `quantized_build` makes the int8 kernels.
            if kind == "kernel":
                shape, initializer = shape, kernel_initializer
            else:
                shape, initializer = shape[:-2] + shape[-1:], self.bias_initializer
            setattr(
                self,
                variable_name,
                self.add_weight(
                    name=variable_name, shape=shape, initializer=initializer
                ),
            )
        if mode is not None:
            self.quantized_build(None, mode, self.quantization_config)

    def _post_build_lora(self):
        if self.lora_rank:
            self.built = True  # as `keras.layers.EinsumDense.build` does
            self.enable_lora(self.lora_rank, lora_alpha=self.lora_alpha)

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
            inputs,
            lambda x, name: self._float8_project(x, name, training),
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

    def _int8_project(self, inputs, name):
        compute_dtype = self.compute_dtype
        inputs_quantizer = self.inputs_quantizer

        @ops.custom_gradient
        def project(inputs, kernel, kernel_scale):
            # The per-output-channel scale broadcasts over the slot axis.
            kernel_scale = ops.expand_dims(kernel_scale, -2)

            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                float_kernel = ops.divide(
                    ops.cast(kernel, compute_dtype), kernel_scale
                )
                inputs_grad = ops.einsum(
                    self._INPUT_GRADIENT_EQUATION, upstream, float_kernel
                )
                return inputs_grad, None, None

            if inputs_quantizer is not None:
                quantized, inputs_scale = inputs_quantizer(inputs, axis=-1)
                outputs = ops.einsum(self._EQUATION, quantized, kernel)
                outputs = ops.divide(
                    ops.cast(outputs, compute_dtype),
                    ops.multiply(inputs_scale, kernel_scale),
                )
            else:
                outputs = ops.einsum(
                    self._EQUATION, inputs, ops.cast(kernel, compute_dtype)
                )
                outputs = ops.divide(outputs, kernel_scale)
            return outputs, grad_fn

        outputs = project(
            inputs,
            ops.convert_to_tensor(getattr(self, f"{name}_kernel")),
            ops.convert_to_tensor(getattr(self, f"{name}_kernel_scale")),
        )
        return self._add_lora_and_bias(inputs, outputs, name)

    def _float8_project(self, inputs, name, training):
        # Keras' float8 recipe (`keras.layers.EinsumDense._float8_call`):
        # inputs and kernel are quantized to e4m3 and the outputs' gradient
        # to e5m2, each with a scale from the history of its absolute
        # maximum; the "gradients" of the scale and history variables are
        # their new values (`overwrite_with_gradient`).
        compute_dtype = self.compute_dtype
        state = {
            suffix: ops.convert_to_tensor(getattr(self, f"{name}_{suffix}"))
            for suffix in _FLOAT8_VARIABLES
        }

        @ops.custom_gradient
        def quantize_dequantize_inputs(inputs, scale, amax_history):
            if training:
                new_scale = quantizers.compute_float8_scale(
                    ops.max(amax_history, axis=0),
                    scale,
                    ops.cast(_float8_max("float8_e4m3fn"), "float32"),
                )
                new_amax_history = quantizers.compute_float8_amax_history(
                    inputs, amax_history
                )
            else:
                new_scale = None
                new_amax_history = None
            qdq_inputs = quantizers.quantize_and_dequantize(
                inputs, scale, "float8_e4m3fn", compute_dtype
            )

            def grad(*args, upstream=None, variables=None):
                if upstream is None:
                    (upstream,) = args
                return upstream, new_scale, new_amax_history

            return qdq_inputs, grad

        @ops.custom_gradient
        def quantize_dequantize_outputs_grad(outputs, scale, amax_history):
            def grad(*args, upstream=None, variables=None):
                if upstream is None:
                    (upstream,) = args
                new_scale = quantizers.compute_float8_scale(
                    ops.max(amax_history, axis=0),
                    scale,
                    ops.cast(_float8_max("float8_e5m2"), "float32"),
                )
                qdq_upstream = quantizers.quantize_and_dequantize(
                    upstream, scale, "float8_e5m2", compute_dtype
                )
                new_amax_history = quantizers.compute_float8_amax_history(
                    upstream, amax_history
                )
                return qdq_upstream, new_scale, new_amax_history

            return outputs, grad

        outputs = ops.einsum(
            self._EQUATION,
            quantize_dequantize_inputs(
                inputs, state["inputs_scale"], state["inputs_amax_history"]
            ),
            quantize_dequantize_inputs(
                ops.convert_to_tensor(getattr(self, f"{name}_kernel")),
                state["kernel_scale"],
                state["kernel_amax_history"],
            ),
        )
        outputs = quantize_dequantize_outputs_grad(
            outputs,
            state["outputs_grad_scale"],
            state["outputs_grad_amax_history"],
        )
        return self._add_lora_and_bias(inputs, outputs, name)

    # Quantization ----------------------------------------------------------

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantize the kernels in place: `"int8"` or `"float8"`.

        `keras.Model.quantize` calls it on every layer; the routers of the
        MoE layers do not implement it and stay float. See the class
        docstring for what each mode stores.

        Args:
            mode: `"int8"` or `"float8"`. Other Keras modes raise
                `NotImplementedError` (which `Model.quantize` turns into a
                warning).
            type_check: bool, refuse subclasses that change the forward
                pass, as Keras' own layers do.
            config: optional `keras.quantizers.QuantizationConfig`; for int8,
                its `weight_quantizer` must reduce over the kernel's input
                axis (-2), and `activation_quantizer=None` keeps the inputs
                in the compute dtype (weight-only int8).
        """
        if type_check and type(self).call is not FeedForwardWeights.call:
            raise self._not_implemented_error(self.quantize)
        if mode not in _QUANTIZATION_MODES:
            raise self._not_implemented_error(
                self.quantize,
                f"Supported modes: {', '.join(_QUANTIZATION_MODES)}. "
                f"Received: mode={mode!r}",
            )
        self.quantization_config = config
        if mode == "int8":
            quantized = {}
            for name in self.projections:
                kernel = getattr(self, f"{name}_kernel")
                if self.lora_enabled:
                    kernel = self._merged_kernel(name)
                quantized[name] = self._quantize_kernel(kernel, config)
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

    def _quantize_kernel(self, kernel, config):
        """int8 kernel and float `[..., fan_out]` scales, per output channel."""
        default = quantizers.AbsMaxQuantizer(axis=-2)
        weight_quantizer = quantizers.QuantizationConfig.weight_quantizer_or_default(
            config, default
        )
        kernel_int8, kernel_scale = weight_quantizer(kernel, to_numpy=True)
        expected = tuple(kernel.shape[:-2]) + (1, kernel.shape[-1])
        if tuple(kernel_scale.shape) != expected:
            raise ValueError(
                f"`{type(self).__name__}` quantizes each output channel of "
                "its kernels over their input axis (-2), so the weight "
                f"quantizer must give scales of shape {expected} for a kernel "
                f"of shape {tuple(kernel.shape)}. Received: scales of shape "
                f"{tuple(kernel_scale.shape)} from {weight_quantizer!r}"
            )
        return kernel_int8, ops.squeeze(kernel_scale, -2)

    def quantized_build(self, input_shape, mode, config=None):
        """Create the variables of quantization `mode` (kernels built)."""
        if mode == "int8":
            self.inputs_quantizer = (
                quantizers.QuantizationConfig.activation_quantizer_or_default(
                    config, quantizers.AbsMaxQuantizer()
                )
            )
            for name, shape in self._kernel_shapes().items():
                setattr(
                    self,
                    f"{name}_kernel",
                    self.add_weight(
                        name=f"{name}_kernel",
                        shape=shape,
                        initializer="zeros",
                        dtype="int8",
                        trainable=False,
                    ),
                )
                setattr(
                    self,
                    f"{name}_kernel_scale",
                    self.add_weight(
                        name=f"{name}_kernel_scale",
                        shape=shape[:-2] + shape[-1:],
                        initializer="ones",
                        trainable=False,
                    ),
                )
        elif mode == "float8":
            history_length = getattr(
                self.dtype_policy,
                "amax_history_length",
                keras.dtype_policies.QuantizedFloat8DTypePolicy.default_amax_history_length,
            )
            for name in self.projections:
                for suffix in _FLOAT8_VARIABLES:
                    is_history = suffix.endswith("amax_history")
                    setattr(
                        self,
                        f"{name}_{suffix}",
                        self.add_weight(
                            name=f"{name}_{suffix}",
                            shape=(history_length,) if is_history else (),
                            initializer="zeros" if is_history else "ones",
                            dtype="float32",
                            trainable=True,
                            autocast=False,
                            overwrite_with_gradient=True,
                        ),
                    )
        else:
            raise self._quantization_mode_error(mode)
        self._is_quantized = True

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
                for suffix in _FLOAT8_VARIABLES
            ],
        }

    def save_own_variables(self, store):
        if not self.built:
            return
        mode = self.quantization_mode
        if mode not in self.variable_serialization_spec:
            raise self._quantization_mode_error(mode)
        merged = {}
        if self.lora_enabled:
            for name in self.projections:
                kernel = self._merged_kernel(name)
                if mode == "int8":
                    kernel, merged[f"{name}_kernel_scale"] = (
                        self._quantize_kernel(kernel, None)
                    )
                merged[f"{name}_kernel"] = kernel
        for index, name in enumerate(self.variable_serialization_spec[mode]):
            if name == _INPUTS_QUANTIZED:
                store[str(index)] = np.array(
                    [self.inputs_quantizer is not None], "int8"
                )
            else:
                store[str(index)] = merged.get(name, getattr(self, name))

    def load_own_variables(self, store):
        names = self.variable_serialization_spec[self.quantization_mode]
        if len(store.keys()) != len(names):
            saved_mode = self._mode_of_store(store)
            if saved_mode is not None and self.quantization_mode is None:
                # A model whose quantized layer sits inside another layer
                # comes back with that layer's float policy: quantize to the
                # saved mode, then load.
                self.quantize(saved_mode)
                names = self.variable_serialization_spec[saved_mode]
            else:
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

    def _mode_of_store(self, store):
        sizes = {
            len(names): mode
            for mode, names in self.variable_serialization_spec.items()
        }
        mode = sizes.get(len(store.keys()))
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
                setattr(
                    self,
                    f"{name}_kernel_lora_a",
                    self.add_weight(
                        name=f"{name}_kernel_lora_a",
                        shape=shape[:-1] + (rank,),
                        initializer=keras.initializers.get(a_initializer),
                        dtype="float32",
                    ),
                )
                setattr(
                    self,
                    f"{name}_kernel_lora_b",
                    self.add_weight(
                        name=f"{name}_kernel_lora_b",
                        shape=shape[:-2] + (rank, shape[-1]),
                        initializer=keras.initializers.get(b_initializer),
                        dtype="float32",
                    ),
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
        kernel = ops.convert_to_tensor(getattr(self, f"{name}_kernel"))
        if self.quantization_mode == "int8":
            scale = ops.convert_to_tensor(getattr(self, f"{name}_kernel_scale"))
            kernel = ops.divide(
                ops.cast(kernel, "float32"), ops.expand_dims(scale, -2)
            )
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

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("quantization_config") is not None:
            config["quantization_config"] = keras.saving.deserialize_keras_object(
                config["quantization_config"]
            )
        return super().from_config(config)

    def _lora_and_quantization_config(self):
        config = {}
        if self.lora_rank:
            config["lora_rank"] = self.lora_rank
            config["lora_alpha"] = self.lora_alpha
        if self.quantization_config is not None:
            config["quantization_config"] = keras.saving.serialize_keras_object(
                self.quantization_config
            )
        return config


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
    channel (`up_kernel_scale [E, f]`), a quarter of the float32 memory.
    `"float8"` runs the projections in float8 with delayed scaling, and
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

    def __init__(
        self,
        num_experts,
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
        self._build_projections(
            per_expert_initializer(self.kernel_initializer, self.num_experts)
        )
        self._post_build_lora()

    def _kernel_shapes(self):
        up_shape = (self.num_experts, self.hidden_dim, self.intermediate_dim)
        shapes = {"gate": up_shape} if self.gated else {}
        shapes["up"] = up_shape
        shapes["down"] = (self.num_experts, self.intermediate_dim, self.hidden_dim)
        return shapes

    def _float_variable_names(self):
        # The order the float layer has always built (and saved) them in.
        names = [f"{name}_kernel" for name in self.projections]
        if self.use_bias:
            names += [f"{name}_bias" for name in self.projections]
        return names

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
                **self._lora_and_quantization_config(),
            }
        )
        return config
