"""The small array operations router statistics and losses are written with.

The portable implementation, through `keras.ops`, used on every backend
that has no faster one (see `keras_moe.backend.array_math`). Compiled steps
(XLA, `jax.jit`, `tf.function`) fuse these calls; what matters there is
what is computed, not how it is dispatched.
"""

import keras
from keras import ops


class KerasMath:
    """Small array operations, as `keras.ops` calls.

    Every backend namespace (`keras_moe.backend.torch.TorchMath`) has the
    same functions with the same arguments and results.

    Example:

    >>> float(KerasMath.sum(KerasMath.f32([1, 2, 3])))
    6.0
    """

    @staticmethod
    def f32(x):
        """`x` as a float32 tensor."""
        x = ops.convert_to_tensor(x)
        if keras.backend.standardize_dtype(x.dtype) == "float32":
            return x
        return ops.cast(x, "float32")

    sum = staticmethod(ops.sum)
    mean = staticmethod(ops.mean)
    max = staticmethod(ops.max)
    log = staticmethod(ops.log)
    logsumexp = staticmethod(ops.logsumexp)
    reshape = staticmethod(ops.reshape)
    expand_dims = staticmethod(ops.expand_dims)
    at_least = staticmethod(ops.maximum)
    stack = staticmethod(ops.stack)

    @staticmethod
    def std(x):
        """Population standard deviation of all of `x`."""
        return ops.std(x)

    @staticmethod
    def concat(tensors):
        """Concatenation along the first axis."""
        return ops.concatenate(tensors, axis=0)

    @staticmethod
    def one_like(x):
        """A float32 scalar 1 (on `x`'s device)."""
        return ops.ones((), "float32")

    @staticmethod
    def add_to(variable, value):
        """`variable += value`."""
        variable.assign_add(value)
