"""Global settings of keras-moe.

- `check_numerics(enabled)`: make the MoE layers refuse NaN or Inf inputs
  with a clear error (eager calls only; off by default).
- `is_checking_numerics()`: whether that check is on.
- `check_finite(inputs, mask=None, name="inputs")`: the check itself, for
  use in other layers.
"""

import keras
import numpy as np
from keras import ops

_SETTINGS = {"check_numerics": False}


def check_numerics(enabled=True):
    """Turn the check for NaN and Inf in the MoE layers' inputs on or off.

    With the check on, `SparseMoE`, `SharedExpertMoE`, `HierarchicalMoE` and
    `SoftMoE` look at their inputs before routing them and raise a
    `ValueError` that names the layer, counts the non-finite values and
    gives the position of the first one, instead of letting a NaN spread
    through the router's softmax into every expert and every later layer.
    Padding positions (a Keras mask, or the layers' `mask` argument) may
    hold anything and are not checked.

    The check reads values back to the host, so it only runs in eager calls
    (a layer called directly, `run_eagerly=True`, or eager PyTorch); traced
    and compiled steps (`jax.jit`, `tf.function`, `torch.compile`) skip it.
    It costs one reduction over the inputs per call, which is why it is off
    by default.

    Args:
        enabled: bool, whether to check. Defaults to True.

    Returns:
        The previous setting, so that a caller can restore it.

    Example:

    >>> import numpy as np
    >>> from keras_moe import config
    >>> from keras_moe.layers import SparseMoE
    >>> moe = SparseMoE(num_experts=4, intermediate_dim=8, name="moe")
    >>> x = np.ones((2, 3, 8), "float32")
    >>> x[1, 2, 5] = np.nan
    >>> previous = config.check_numerics(True)
    >>> try:
    ...     moe(x)
    ... except ValueError as error:
    ...     message = str(error)
    >>> "layer 'moe' received 1 non-finite value (NaN or Inf)" in message
    True
    >>> "the first is nan at index (1, 2, 5)" in message
    True
    >>> _ = config.check_numerics(previous)
    """
    if not isinstance(enabled, bool):
        raise ValueError(
            f"`enabled` must be True or False. Received: enabled={enabled!r}"
        )
    previous = _SETTINGS["check_numerics"]
    _SETTINGS["check_numerics"] = enabled
    return previous


def is_checking_numerics():
    """Whether the MoE layers check their inputs for NaN and Inf.

    Returns:
        bool, the value last set with `check_numerics` (False by default).

    Example:

    >>> from keras_moe import config
    >>> config.is_checking_numerics()
    False
    """
    return _SETTINGS["check_numerics"]


def _is_concrete(tensor):
    """Whether `tensor` holds values that can be read now (not a trace)."""
    if isinstance(tensor, keras.KerasTensor):
        return False
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return not isinstance(tensor, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly() and not tf.is_symbolic_tensor(tensor)
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    return True


def check_finite(inputs, mask=None, name="inputs", layer=None):
    """Raise a `ValueError` if `inputs` hold NaN or Inf outside the padding.

    Does nothing unless `check_numerics(True)` is on, and nothing in traced
    or compiled code (see `check_numerics`).

    Args:
        inputs: float tensor `[..., d]`.
        mask: optional bool tensor of the leading dimensions of `inputs`
            (`[...]`), False for padding, whose values are not checked.
        name: str, what `inputs` are, for the message.
        layer: optional Keras layer the inputs belong to, named in the
            message.

    Example:

    >>> import numpy as np
    >>> from keras_moe import config
    >>> x = np.array([[1.0, np.inf], [2.0, 3.0]], "float32")
    >>> config.check_finite(x)  # Off by default: nothing happens.
    >>> previous = config.check_numerics(True)
    >>> config.check_finite(x, mask=np.array([False, True]))  # Padding.
    >>> try:
    ...     config.check_finite(x, name="hidden states")
    ... except ValueError as error:
    ...     print(str(error).split(";")[0])
    Received 1 non-finite value (NaN or Inf) in its hidden states of shape (2, 2)
    >>> _ = config.check_numerics(previous)
    """
    if not _SETTINGS["check_numerics"] or not _is_concrete(inputs):
        return
    inputs = ops.convert_to_tensor(inputs)
    if not keras.backend.is_float_dtype(inputs.dtype):
        return
    finite = ops.isfinite(inputs)
    if mask is not None:
        real = ops.expand_dims(ops.cast(mask, "bool"), -1)
        finite = ops.logical_or(finite, ops.logical_not(real))
    if bool(ops.convert_to_numpy(ops.all(finite))):
        return
    finite = ops.convert_to_numpy(finite)
    bad = np.argwhere(~finite)
    values = ops.convert_to_numpy(ops.cast(inputs, "float32"))
    first = tuple(int(i) for i in bad[0])
    count = len(bad)
    where = (
        f"`{type(layer).__name__}` layer {layer.name!r} received"
        if layer is not None
        else "Received"
    )
    raise ValueError(
        f"{where} {count} non-finite value{'s' if count > 1 else ''} "
        f"(NaN or Inf) in its {name} of shape {tuple(inputs.shape)}; the "
        f"first is {values[first]} at index {first}. A NaN or Inf reaching "
        "the router would spread to every expert and every later layer. "
        "Look for the step that produced it (a too-high learning rate, an "
        "overflow in float16, bad data); padding positions are allowed to "
        "hold anything when they are masked. This check runs because "
        "`keras_moe.config.check_numerics(True)` is on."
    )
