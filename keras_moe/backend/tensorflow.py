"""TensorFlow specifics."""

import tensorflow as tf


def data_dependent_shapes_allowed():
    """True in eager TensorFlow, False inside `tf.function`.

    Example:

    >>> data_dependent_shapes_allowed()
    True
    """
    return tf.executing_eagerly()
