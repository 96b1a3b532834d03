"""Tensors as NumPy, and weight comparisons."""

import keras
import numpy as np
from keras import ops


def to_numpy(x):
    """A tensor as a NumPy array; 16-bit floats widened to float32 (NumPy's
    testing functions do not take bfloat16)."""
    array = np.asarray(ops.convert_to_numpy(x))
    if keras.backend.standardize_dtype(array.dtype) in ("bfloat16", "float16"):
        return array.astype("float32")
    return array


def assert_same_weights(expected_model, model):
    """Same weight names, in the same order, with equal values."""
    # Paths may differ in the model's own name; the order and names do not.
    assert [w.name for w in model.weights] == [w.name for w in expected_model.weights]
    for expected, actual in zip(expected_model.weights, model.weights):
        np.testing.assert_array_equal(
            to_numpy(actual), to_numpy(expected), err_msg=expected.path
        )
