"""What differs between backends, behind functions the rest of the package calls.

`keras_moe.ops` and the layers are written with `keras.ops`; where a backend
needs something else (eager-PyTorch shortcuts for speed, a backend's own
notion of "eager"), or where only a private Keras internal can answer, the
answer comes from here: one small module per backend (`torch`,
`tensorflow`), the portable `keras.ops` implementation (`keras_math`) and
the private-Keras accessors (`keras_internals`).
"""

import contextlib

import keras
from keras import ops

from keras_moe.backend.keras_internals import all_layers
from keras_moe.backend.keras_internals import forward_pass_value
from keras_moe.backend.keras_internals import holds_value
from keras_moe.backend.keras_internals import in_stateless_scope
from keras_moe.backend.keras_internals import in_symbolic_scope
from keras_moe.backend.keras_math import KerasMath

__all__ = [
    "all_layers",
    "array_math",
    "data_dependent_shapes_allowed",
    "forward_pass_value",
    "holds_value",
    "in_stateless_scope",
    "in_symbolic_scope",
    "no_gradient",
    "stable_top_k",
]


def data_dependent_shapes_allowed():
    """Whether a tensor's shape may depend on computed values right now.

    True in eager PyTorch and eager TensorFlow, where e.g. a dropless MoE can
    size its buffers by the busiest expert instead of by the worst case.
    False under `jax.jit`, XLA, `tf.function` and `torch.compile`, which need
    shapes known at trace time.

    Returns:
        bool.

    Example:

    >>> isinstance(data_dependent_shapes_allowed(), bool)
    True
    """
    backend = keras.backend.backend()
    if backend == "torch":
        from keras_moe.backend import torch as torch_backend

        return torch_backend.data_dependent_shapes_allowed()
    if backend == "tensorflow":
        from keras_moe.backend import tensorflow as tensorflow_backend

        return tensorflow_backend.data_dependent_shapes_allowed()
    return backend == "numpy"


def stable_top_k(values, k):
    """`ops.top_k` whose ties go to the lower index on every backend.

    Routing must not depend on the backend: TensorFlow's and JAX's `top_k`
    already prefer the lower index among equal values, PyTorch's `topk` does
    not, so there the `k` largest come from a stable sort (routers sort over
    experts or tokens, small axes next to the expert matmuls).

    Args:
        values: float tensor `[..., n]`.
        k: int, how many to take along the last axis.

    Returns:
        `(top_values, indices)`, `[..., k]`, best first; indices are int32.

    Example:

    >>> import numpy as np
    >>> _, indices = stable_top_k(np.array([[1.0, 3.0, 3.0, 2.0]]), 2)
    >>> np.asarray(indices).tolist()
    [[1, 2]]
    """
    if keras.backend.backend() == "torch":
        from keras_moe.backend import torch as torch_backend

        return torch_backend.stable_top_k(values, k)
    top_values, indices = ops.top_k(values, k)
    return top_values, ops.cast(indices, "int32")


def array_math():
    """The namespace of small array operations for the running backend.

    Native PyTorch calls on PyTorch (`keras_moe.backend.torch.TorchMath`),
    `keras.ops` elsewhere (`keras_moe.backend.keras_math.KerasMath`). Both
    have the same functions: `f32`, `sum`, `mean`, `max`, `log`, `std`,
    `logsumexp`, `reshape`, `expand_dims`, `at_least`, `stack`, `concat`,
    `one_like`, `add_to`.

    Returns:
        A class whose static methods are the operations.

    Example:

    >>> math = array_math()
    >>> float(math.mean(math.f32([1.0, 2.0, 3.0])))
    2.0
    """
    if keras.backend.backend() == "torch":
        from keras_moe.backend.torch import TorchMath

        return TorchMath
    return KerasMath


def no_gradient():
    """A scope in which no gradient is recorded where that costs anything.

    PyTorch records an autograd graph eagerly; the compiled backends only
    differentiate what reaches the loss, so elsewhere this does nothing.

    Returns:
        A context manager.

    Example:

    >>> with no_gradient():
    ...     pass
    """
    if keras.backend.backend() == "torch":
        from keras_moe.backend import torch as torch_backend

        return torch_backend.no_gradient()
    return contextlib.nullcontext()
