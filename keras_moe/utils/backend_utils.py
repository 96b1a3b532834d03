"""The few facts about the running backend that the common path needs."""

import keras


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
