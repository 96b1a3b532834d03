"""Batches of any size under a data-parallel `keras.distribution`.

Under `DataParallel` or `ModelParallel` with a batch axis of `n` devices,
JAX splits every batch into `n` equal shards: a batch whose size is not a
multiple of `n` (a single prompt, the last batch of an epoch) fails with
JAX's `IndivisibleError`. `MoECausalLM` pads such batches instead:

- `fit`, `evaluate`, `train_on_batch`, `test_on_batch`: the batch gets
  rows of padding (`padding_mask` 0, sample weight 0), and the real rows'
  weights are scaled by `padded / real` under the default
  `"sum_over_batch_size"` loss reduction, so the loss, its gradients and
  the weighted metrics are those of the real rows alone. (Metrics passed as
  `metrics=` rather than `weighted_metrics=` see the padding rows.)
- `generate` and `predict`: the batch is padded with copies of its last
  row, and the outputs of those copies are dropped.

The multiple is `data_parallel_size()`: the size of the mesh axis the data
layout splits the batch on (per process when several processes each feed
their own share).
"""

import keras
import numpy as np

from keras_moe.utils.argument_validation import check_int

# Loss reductions that divide by the number of elements, padding included:
# the real rows' weights are scaled back up by `padded / real`.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")


def data_parallel_size(distribution=None, process_local=False):
    """The number of shards a batch splits into under `distribution`.

    Args:
        distribution: a `keras.distribution.Distribution`, or `None` for the
            one in effect (`keras.distribution.distribution()`).
        process_local: bool, the shards of one process's share of the batch
            (what `fit` feeds from each process) instead of the whole batch.

    Returns:
        int >= 1; 1 without a distribution or when batches are not split.

    Example:

    >>> data_parallel_size()
    1
    """
    if distribution is None:
        distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    layout = distribution.get_data_layout((2, 1))
    axes = getattr(layout, "axes", None)
    if not axes or axes[0] is None:
        return 1
    mesh = layout.device_mesh
    size = int(mesh.shape[list(mesh.axis_names).index(axes[0])])
    if process_local and keras.backend.backend() == "jax":
        import jax

        processes = jax.process_count()
        if processes > 1 and size % processes == 0:
            size //= processes
    return max(size, 1)


def _is_tf_tensor(value):
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - TensorFlow ships with keras-hub
        return False
    return isinstance(value, (tf.Tensor, tf.Variable))


def _any_tf(structure):
    if isinstance(structure, dict):
        structure = list(structure.values())
    if isinstance(structure, (list, tuple)):
        return any(_any_tf(value) for value in structure)
    return _is_tf_tensor(structure)


def _num_rows(structure):
    if isinstance(structure, dict):
        structure = next(iter(structure.values()))
    leaf = structure if isinstance(structure, (list, tuple)) else (
        keras.tree.flatten(structure)[0]
    )
    if isinstance(leaf, (list, tuple)):
        return len(leaf)
    if _is_tf_tensor(leaf):
        import tensorflow as tf

        return tf.shape(leaf)[0]
    return np.shape(leaf)[0]


def pad_training_batch(data, multiple, loss_reduction="sum_over_batch_size"):
    """Pad `(x, y, sample_weight)` to a multiple of `multiple` rows.

    The padding rows are zeros (token ids, padding mask, labels) with
    sample weight 0; the real rows keep their weights (1 if none were
    given: one per label), scaled by `padded_rows / real_rows` when `loss_reduction`
    divides by the number of elements, so that the loss is the real rows'.
    Works on NumPy arrays and on TensorFlow tensors (inside a `tf.data`
    pipeline, where the batch size is dynamic).

    Args:
        data: `x`, `(x, y)` or `(x, y, sample_weight)`, as
            `keras.utils.pack_x_y_sample_weight` makes them.
        multiple: int >= 1, see `data_parallel_size`.
        loss_reduction: the `reduction` of the model's loss.

    Returns:
        `(x, y, sample_weight)` padded (unchanged if already a multiple, or
        without labels).

    Example:

    >>> x = {"token_ids": np.ones((3, 2), "int32"),
    ...      "padding_mask": np.ones((3, 2), "int32")}
    >>> x, y, w = pad_training_batch((x, np.ones((3, 2), "int32")), 2)
    >>> x["padding_mask"].tolist()
    [[1, 1], [1, 1], [1, 1], [0, 0]]
    >>> w.astype("float64").round(4).tolist()  # 4/3: the loss is the real rows'
    [[1.3333, 1.3333], [1.3333, 1.3333], [1.3333, 1.3333], [0.0, 0.0]]
    """
    multiple = check_int("multiple", multiple, min_value=1)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if multiple == 1 or y is None:
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
    if _any_tf((x, y, sample_weight)):
        return _pad_training_batch_tf(x, y, sample_weight, multiple, loss_reduction)
    rows = int(_num_rows(x))
    pad = -rows % multiple
    if pad == 0:
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def zeros_after(value):
        value = np.asarray(value)
        return np.concatenate(
            [value, np.zeros((pad,) + value.shape[1:], value.dtype)]
        )

    if sample_weight is None:
        # One weight per label, as the preprocessor gives them.
        sample_weight = np.ones(np.shape(keras.tree.flatten(y)[0]), "float32")
    sample_weight = np.asarray(sample_weight).astype("float32")
    if loss_reduction in _MEAN_REDUCTIONS:
        sample_weight = sample_weight * np.float32((rows + pad) / rows)
    return (
        keras.tree.map_structure(zeros_after, x),
        keras.tree.map_structure(zeros_after, y),
        zeros_after(sample_weight),
    )


def _pad_training_batch_tf(x, y, sample_weight, multiple, loss_reduction):
    import tensorflow as tf

    rows = tf.shape(keras.tree.flatten(x)[0])[0]
    pad = tf.math.floormod(-rows, multiple)

    def zeros_after(value):
        value = tf.convert_to_tensor(value)
        shape = tf.concat([[pad], tf.shape(value)[1:]], axis=0)
        return tf.concat([value, tf.zeros(shape, value.dtype)], axis=0)

    if sample_weight is None:
        sample_weight = tf.ones(tf.shape(keras.tree.flatten(y)[0]), "float32")
    sample_weight = tf.cast(sample_weight, "float32")
    if loss_reduction in _MEAN_REDUCTIONS:
        sample_weight *= tf.cast(rows + pad, "float32") / tf.cast(rows, "float32")
    return (
        keras.tree.map_structure(zeros_after, x),
        keras.tree.map_structure(zeros_after, y),
        zeros_after(sample_weight),
    )


def pad_inputs(x, multiple):
    """Pad a batch of inputs with copies of its last row.

    Args:
        x: a batch: a list of strings, an array or tensor, or a dict of
            them (prompts or model inputs).
        multiple: int >= 1, see `data_parallel_size`.

    Returns:
        `(padded, rows)`: the padded batch and the number of real rows
        (the outputs to keep).

    Example:

    >>> pad_inputs(["def "], 2)
    (['def ', 'def '], 1)
    """
    multiple = check_int("multiple", multiple, min_value=1)
    if _any_tf(x if isinstance(x, dict) else [x]):
        # TensorFlow tensors, possibly inside a `tf.data` pipeline where
        # the batch size is only known when it runs.
        import tensorflow as tf

        rows = _num_rows(x)
        pad = tf.math.floormod(-rows, multiple)

        def repeat_last(value):
            return tf.concat([value, tf.repeat(value[-1:], pad, axis=0)], 0)

        if tf.executing_eagerly():
            rows = int(rows)
    else:
        rows = int(_num_rows(x))
        pad = -rows % multiple
        if pad == 0 or rows == 0:
            return x, rows

        def repeat_last(value):
            if isinstance(value, (list, tuple)):
                return list(value) + [value[-1]] * pad
            value = np.asarray(value)
            return np.concatenate([value, np.repeat(value[-1:], pad, axis=0)])

    if isinstance(x, dict):
        return {key: repeat_last(value) for key, value in x.items()}, rows
    return repeat_last(x), rows


def first_rows(outputs, rows):
    """The first `rows` rows of every output (drops padding rows).

    Args:
        outputs: a batch of outputs: an array, tensor or list, or a dict of
            them.
        rows: int, the number of rows to keep.

    Returns:
        The same structure, cut to `rows` rows.

    Example:

    >>> first_rows({"token_ids": np.arange(4)}, 3)
    {'token_ids': array([0, 1, 2])}
    """
    if isinstance(outputs, dict):
        return {key: first_rows(value, rows) for key, value in outputs.items()}
    return outputs[:rows]
