"""Eager-PyTorch shortcuts.

On eager PyTorch every step runs its small ops one by one, and a `keras.ops`
call costs several times the op it wraps; the shortcuts here call PyTorch
directly where that overhead would show in a training step.
"""

import torch
from keras import ops

from keras_moe.backend.keras_internals import in_stateless_scope


def _reduce(function, x, axis=None, keepdims=False):
    if axis is None:
        return function(x)
    return function(x, dim=axis, keepdim=keepdims)


class TorchMath:
    """The operations of `keras_moe.backend.keras_math.KerasMath` as native
    PyTorch calls: same arguments, same results.

    Example:

    >>> import torch
    >>> float(TorchMath.sum(TorchMath.f32(torch.tensor([1, 2, 3]))))
    6.0
    """

    @staticmethod
    def f32(x):
        """`x` as a float32 tensor."""
        if not isinstance(x, torch.Tensor):
            x = ops.convert_to_tensor(x)
        return x if x.dtype == torch.float32 else x.float()

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return _reduce(torch.sum, x, axis, keepdims)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        return _reduce(torch.mean, x, axis, keepdims)

    @staticmethod
    def max(x, axis=None, keepdims=False):
        return _reduce(torch.amax, x, axis, keepdims)

    @staticmethod
    def log(x):
        return x.log()

    @staticmethod
    def std(x):
        """Population standard deviation of all of `x`."""
        return x.std(correction=0)

    @staticmethod
    def logsumexp(x, axis, keepdims=False):
        return torch.logsumexp(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)

    @staticmethod
    def expand_dims(x, axis):
        return x.unsqueeze(axis)

    @staticmethod
    def at_least(x, value):
        return x.clamp(min=value)

    @staticmethod
    def stack(tensors):
        return torch.stack(tensors)

    @staticmethod
    def concat(tensors):
        """Concatenation along the first axis."""
        return torch.cat(tensors)

    @staticmethod
    def one_like(x):
        """A float32 scalar 1 on `x`'s device."""
        return torch.ones((), dtype=torch.float32, device=x.device)

    @staticmethod
    def add_to(variable, value):
        """`variable += value`."""
        if in_stateless_scope():
            variable.assign_add(value)
            return
        # In place, as `Variable.assign` does on PyTorch, without the checks
        # and conversions around it.
        with torch.no_grad():
            variable.value.add_(value.detach())


def no_gradient():
    """A scope in which PyTorch records no autograd graph."""
    return torch.no_grad()


def data_dependent_shapes_allowed():
    """True unless `torch.compile` is tracing."""
    return not torch.compiler.is_compiling()


def stable_top_k(values, k):
    """The `k` largest along the last axis, ties to the lower index.

    PyTorch's `topk` does not break ties by index, a stable sort does.

    Args:
        values: float tensor `[..., n]`.
        k: int.

    Returns:
        `(top_values, indices)`, `[..., k]`, best first (indices as
        `ops.argsort` returns them).
    """
    indices = ops.argsort(ops.negative(values), axis=-1)[..., :k]
    return ops.take_along_axis(values, indices, axis=-1), indices


def expert_loop_matmul(rows, kernels, layout, transpose_kernels=False):
    """`keras_moe.ops.grouped_matmul` in eager PyTorch: one matmul per expert.

    Eager PyTorch can slice by sizes it reads from the data, so each
    expert's rows are multiplied with exactly its kernel (autograd gives the
    gradients); rows past the last expert's come out as zeros.

    Example:

    >>> import numpy as np
    >>> from keras_moe.ops.grouped_matmul import TileLayout
    >>> layout = TileLayout(1, None, None, torch.tensor([1, 2]))
    >>> kernels = torch.stack([torch.eye(2), 2 * torch.eye(2)])
    >>> expert_loop_matmul(torch.ones(3, 2), kernels, layout)[:, 0].tolist()
    [1.0, 2.0, 2.0]
    """
    if transpose_kernels:
        kernels = kernels.transpose(-1, -2)
    sizes = torch.as_tensor(layout.group_sizes).tolist()
    unused = rows.shape[0] - sum(sizes)
    # `split` and `unbind` (not indexing) so that the backward pass stacks
    # the pieces' gradients instead of adding one full-sized tensor per
    # expert (at 64 experts that was 18x the step).
    pieces = torch.split(rows, sizes + [unused], dim=0)
    outputs = [
        piece @ kernel
        for piece, kernel in zip(pieces[:-1], torch.unbind(kernels, 0))
        if piece.shape[0]
    ]
    outputs.append(rows.new_zeros((unused, kernels.shape[-1])))
    return torch.cat(outputs, dim=0)


def grouped_mm(rows, kernels, layout, transpose_kernels=False):
    """`keras_moe.ops.grouped_matmul` with `torch.nn.functional.grouped_mm`.

    Example:

    >>> import numpy as np
    >>> from keras_moe.ops.grouped_matmul import TileLayout
    >>> layout = TileLayout(1, None, None, torch.tensor([1, 2]))
    >>> kernels = torch.stack([torch.eye(4), 2 * torch.eye(4)])
    >>> grouped_mm(torch.ones(3, 4), kernels, layout)[:, 0].tolist()
    [1.0, 2.0, 2.0]
    """
    if transpose_kernels:
        kernels = kernels.transpose(-1, -2)
    for name, size in (("input", rows.shape[-1]), ("output", kernels.shape[-1])):
        if size * rows.element_size() % 16:
            raise ValueError(
                "expert_kernel='grouped_mm' needs rows of a multiple of 16 "
                f"bytes; the {name} dimension is {size} in {rows.dtype}. "
                "Use expert_kernel='auto' or 'tiles'."
            )
    offsets = torch.cumsum(torch.as_tensor(layout.group_sizes), 0).to(torch.int32)
    used = int(offsets[-1]) if offsets.numel() else 0
    products = torch.nn.functional.grouped_mm(
        rows[:used], kernels, offs=offsets
    )
    unused = rows.new_zeros((rows.shape[0] - used, kernels.shape[-1]))
    return torch.cat([products, unused], dim=0)
