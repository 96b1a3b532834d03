"""Grouped matmul: each expert's rows times that expert's kernel, nothing else.

Dropless routing cannot bound an expert's load below `T` tokens, so
per-expert buffers sized for the worst case cost `E / k` times the routed
work. The grouped layout avoids that (the block-sparse idea of MegaBlocks):
the routed rows are sorted by expert and each expert's rows are padded to a
multiple of `tile_size`, so that the rows fall into tiles that each belong
to one expert:

```
rows [M, d]:  | e0 e0 e0 . | e1 e1 e1 e1 | e1 . . . | e3 . . . | (unused) |
tiles:        |  expert 0  |  expert 1   | expert 1 | expert 3 |          |
```

`M` is a static bound (`T * k` plus at most one partly filled tile per
expert), and a loop over the `num_tiles` tiles in use multiplies each tile by
its expert's kernel: the work is the routed rows plus each expert's last
tile, whatever the routing, and unused tiles cost nothing. The gradients are
the same loop (the input gradient) and a loop that adds each tile's
`x^T @ upstream` into its expert's slice (the kernel gradient).

`grouped_matmul(..., kernel=...)` runs this portable loop (`"tiles"`,
`keras.ops` only) or a backend kernel that computes the same thing:
`"ragged_dot"` (`jax.lax.ragged_dot`, the fast one on GPU and TPU) and
`"grouped_mm"` (`torch.nn.functional.grouped_mm`), both tested against
`"tiles"`.
"""

from typing import NamedTuple

import keras
from keras import ops

# The expert kernels `SparseMoE(expert_kernel=...)` takes: "buffers" is the
# per-expert buffer einsum (capacity routing's own path), the others run the
# grouped layout of this module.
EXPERT_KERNELS = ("auto", "buffers", "tiles", "ragged_dot", "grouped_mm")
_BACKEND_OF_KERNEL = {"ragged_dot": "jax", "grouped_mm": "torch"}


class TileLayout(NamedTuple):
    """Where each expert's rows lie in a grouped layout.

    Attributes:
        tile_size: int, rows per tile.
        tile_experts: int32 `[max_tiles]`, the expert of each tile (tiles
            past `num_tiles` hold the last expert and are never computed).
        num_tiles: int32 scalar, the tiles in use.
        group_sizes: int32 `[E]`, each expert's rows, padded to a multiple
            of `tile_size`: rows `[sum(group_sizes[:e]), ...)` are expert
            `e`'s.
    """

    tile_size: int
    tile_experts: object
    num_tiles: object
    group_sizes: object


def check_expert_kernel(expert_kernel):
    """Validate `expert_kernel` against the running backend.

    Args:
        expert_kernel: one of `EXPERT_KERNELS`.

    Returns:
        `expert_kernel`.

    Raises:
        ValueError: for an unknown name, or a kernel of another backend.

    Example:

    >>> check_expert_kernel("auto")
    'auto'
    """
    if expert_kernel not in EXPERT_KERNELS:
        raise ValueError(
            f"`expert_kernel` must be one of {EXPERT_KERNELS}. "
            f"Received: expert_kernel={expert_kernel!r}"
        )
    required = _BACKEND_OF_KERNEL.get(expert_kernel)
    backend = keras.backend.backend()
    if required is not None and required != backend:
        raise ValueError(
            f"expert_kernel={expert_kernel!r} runs on the {required} backend "
            f"only; this is the {backend} backend. Use 'auto' (which picks "
            "the fastest kernel the backend and device have) or 'tiles' "
            "(the portable grouped matmul)."
        )
    if expert_kernel == "grouped_mm":
        import torch

        if not hasattr(torch.nn.functional, "grouped_mm"):
            raise ValueError(
                "expert_kernel='grouped_mm' needs "
                "`torch.nn.functional.grouped_mm` (PyTorch >= 2.9); this "
                f"PyTorch is {torch.__version__}. Use 'auto' or 'tiles'."
            )
    return expert_kernel


def grouped_matmul(rows, kernels, layout, kernel="tiles", transpose_kernels=False):
    """`rows [M, i] -> [M, o]`: the rows of each expert's tiles times its kernel.

    Args:
        rows: `[M, i]`, rows sorted by expert in the grouped layout `layout`
            (rows past the tiles in use are ignored and give zeros).
        kernels: `[E, i, o]`, one kernel per expert (`[E, o, i]` with
            `transpose_kernels=True`).
        layout: the `TileLayout` of `rows`.
        kernel: `"tiles"` (portable), `"ragged_dot"` (JAX) or
            `"grouped_mm"` (PyTorch).
        transpose_kernels: bool, multiply by each kernel's transpose.

    Returns:
        `[M, o]` in the dtype of `rows`.

    Example:

    >>> import numpy as np
    >>> rows = np.ones((6, 3), "float32")  # tiles of 2: experts 0, 1, 1
    >>> kernels = np.stack([np.eye(3), 2 * np.eye(3)]).astype("float32")
    >>> layout = TileLayout(2, np.array([0, 1, 1]), np.array(3), np.array([2, 4]))
    >>> ops.convert_to_numpy(grouped_matmul(rows, kernels, layout))[:, 0].tolist()
    [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    """
    rows = ops.convert_to_tensor(rows)
    kernels = ops.cast(kernels, rows.dtype)
    if kernel == "ragged_dot":
        from keras_moe.backend import jax as jax_backend

        return jax_backend.ragged_dot(rows, kernels, layout, transpose_kernels)
    if kernel == "grouped_mm":
        from keras_moe.backend import torch as torch_backend

        return torch_backend.grouped_mm(rows, kernels, layout, transpose_kernels)
    if keras.backend.backend() == "torch":
        # Eager PyTorch slices by data-dependent sizes: one matmul per
        # expert, no tiles to loop over.
        from keras_moe.backend import torch as torch_backend

        return torch_backend.expert_loop_matmul(
            rows, kernels, layout, transpose_kernels
        )
    return _tile_loop_matmul(
        rows, kernels, layout.tile_experts, layout.num_tiles, layout.tile_size,
        transpose_kernels,
    )


def default_expert_kernel():
    """The grouped kernel `expert_kernel="auto"` runs on this backend and device.

    `"ragged_dot"` for JAX on GPU and TPU; `"tiles"` elsewhere (on CPU,
    `ragged_dot` computes every group densely; eager PyTorch runs `"tiles"`
    as one matmul per expert).

    Example:

    >>> default_expert_kernel() in ("tiles", "ragged_dot", "grouped_mm")
    True
    """
    if keras.backend.backend() == "jax":
        from keras_moe.backend import jax as jax_backend

        return jax_backend.default_expert_kernel()
    return "tiles"


def default_tile_size(num_choices, num_experts, kernel):
    """Rows per tile for `num_choices` routed choices over `num_experts`.

    The tile loop pays a fixed cost per tile, which on CPU outweighs the
    padding (at most one partly filled tile per expert): tiles of about an
    expert's mean load, between 16 and 256 rows, measured fastest
    (BENCHMARKS.md, "Dropless at sparse cost"). Kernels that take group
    sizes (`ragged_dot`, and eager PyTorch's per-expert matmuls) need no
    tiles: 8 (and 1 for eager PyTorch's, which the caller asks for).

    Args:
        num_choices: int, `T * k`.
        num_experts: int, `E`.
        kernel: the grouped kernel.

    Returns:
        int.

    Example:

    >>> default_tile_size(8192, 8, "tiles"), default_tile_size(8192, 64, "tiles")
    (256, 128)
    """
    if kernel == "ragged_dot":
        return 8
    mean_load = max(num_choices // num_experts, 1)
    return min(max(1 << (mean_load.bit_length() - 1), 16), 256)


def _tile_loop_matmul(
    rows, kernels, tile_experts, num_tiles, tile_size, transpose
):
    """The portable grouped matmul, with its gradient written as two more loops.

    The loops are `fori_loop`s over the tiles in use: under XLA a while
    loop whose trip count is data, so neither the forward pass nor the
    gradients touch an unused tile.
    """
    equation = "ti,oi->to" if transpose else "ti,io->to"
    input_gradient_equation = "to,oi->ti" if transpose else "to,io->ti"

    @ops.custom_gradient
    def matmul(rows, kernels, tile_experts, num_tiles):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream = ops.cast(upstream, rows.dtype)
            rows_grad = _tile_loop(
                upstream, kernels, tile_experts, num_tiles, tile_size,
                input_gradient_equation, rows.shape[-1],
            )
            kernels_grad = _tile_kernel_gradient(
                rows, upstream, kernels, tile_experts, num_tiles, tile_size,
                transpose,
            )
            return rows_grad, kernels_grad, None, None

        output_dim = kernels.shape[-2] if transpose else kernels.shape[-1]
        outputs = _tile_loop(
            rows, kernels, tile_experts, num_tiles, tile_size, equation,
            output_dim,
        )
        return outputs, grad_fn

    return matmul(
        rows,
        kernels,
        ops.convert_to_tensor(tile_experts, "int32"),
        ops.convert_to_tensor(num_tiles, "int32"),
    )


def _tile_loop(
    rows, kernels, tile_experts, num_tiles, tile_size, equation, output_dim
):
    """`out[tile] = rows[tile] (x) kernels[expert of tile]` for the tiles in use."""
    input_dim = rows.shape[-1]

    def multiply_tile(tile, outputs):
        start = tile * tile_size
        tile_rows = ops.slice(rows, (start, 0), (tile_size, input_dim))
        expert_kernel = ops.take(kernels, ops.take(tile_experts, tile), axis=0)
        products = ops.einsum(equation, tile_rows, expert_kernel)
        return ops.slice_update(outputs, (start, 0), products)

    initial = ops.zeros((rows.shape[0], output_dim), rows.dtype)
    return ops.fori_loop(0, num_tiles, multiply_tile, initial)


def _tile_kernel_gradient(
    rows, upstream, kernels, tile_experts, num_tiles, tile_size, transpose
):
    """`grad[e] = sum over e's tiles of rows[tile]^T @ upstream[tile]`."""
    equation = "ti,to->oi" if transpose else "ti,to->io"
    input_dim, output_dim = rows.shape[-1], upstream.shape[-1]
    kernel_shape = tuple(kernels.shape[1:])

    def add_tile(tile, gradient):
        start = tile * tile_size
        tile_rows = ops.slice(rows, (start, 0), (tile_size, input_dim))
        tile_upstream = ops.slice(upstream, (start, 0), (tile_size, output_dim))
        expert = ops.take(tile_experts, tile)
        expert_gradient = ops.take(gradient, expert, axis=0)
        expert_gradient = expert_gradient + ops.einsum(
            equation, tile_rows, tile_upstream
        )
        expert_gradient = ops.reshape(expert_gradient, (1,) + kernel_shape)
        return ops.slice_update(gradient, (expert, 0, 0), expert_gradient)

    initial = ops.zeros(tuple(kernels.shape), rows.dtype)
    return ops.fori_loop(0, num_tiles, add_tile, initial)
