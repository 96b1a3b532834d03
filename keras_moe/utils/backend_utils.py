"""The few facts about the running backend that the common path needs."""

import keras
from keras import ops


def data_dependent_shapes_allowed():
    """Whether a tensor's shape may depend on computed values right now.

    True in eager PyTorch and eager TensorFlow, where e.g. a dropless MoE can
    size its buffers by the busiest expert instead of by the worst case.
    False under `jax.jit`, XLA, `tf.function` and `torch.compile`, which need
    shapes known at trace time.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
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
    """
    if keras.backend.backend() == "torch":
        indices = ops.argsort(ops.negative(values), axis=-1)[..., :k]
        return ops.take_along_axis(values, indices, axis=-1), indices
    top_values, indices = ops.top_k(values, k)
    return top_values, ops.cast(indices, "int32")
