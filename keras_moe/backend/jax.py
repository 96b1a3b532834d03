"""JAX kernels: `jax.lax.ragged_dot` for the grouped expert matmul."""

import jax


def ragged_dot(rows, kernels, layout, transpose_kernels=False):
    """`keras_moe.ops.grouped_matmul` with `jax.lax.ragged_dot`.

    The group sizes are the experts' padded row counts, so padding rows
    (zeros) are multiplied too; rows past the last group come out as zeros.

    Example:

    >>> import numpy as np
    >>> from keras_moe.ops.grouped_matmul import TileLayout
    >>> layout = TileLayout(1, None, None, np.array([1, 2], "int32"))
    >>> kernels = np.stack([np.eye(2), 2 * np.eye(2)]).astype("float32")
    >>> outputs = ragged_dot(np.ones((3, 2), "float32"), kernels, layout)
    >>> np.asarray(outputs)[:, 0].tolist()
    [1.0, 2.0, 2.0]
    """
    if transpose_kernels:
        kernels = jax.numpy.swapaxes(kernels, -1, -2)
    return jax.lax.ragged_dot(
        rows,
        kernels,
        jax.numpy.asarray(layout.group_sizes, "int32"),
    )


def default_expert_kernel():
    """`"ragged_dot"` on GPU and TPU, where XLA has a grouped kernel for it;
    on CPU it computes every group densely, and the tile loop is faster.

    Example:

    >>> default_expert_kernel() in ("tiles", "ragged_dot")
    True
    """
    return "tiles" if jax.default_backend() == "cpu" else "ragged_dot"
