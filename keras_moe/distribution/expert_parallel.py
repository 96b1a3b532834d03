"""Expert parallelism inside the MoE layers: routing groups and buffer layouts.

Under a `keras.distribution` (JAX), a MoE layer whose expert kernels are
split on a mesh axis moves tokens to the experts instead of weights to the
tokens:

```
tokens [G, T, d]                      groups sharded on the data axes
  --route, dispatch (local)--> buffers [G, E, C, d]   (G sharded)
  --all-to-all--> buffers [G, E, C, d]                (E sharded on the expert axis)
  --experts (local einsums on each device's E / n experts)-->
  --all-to-all--> [G, E, C, d]                        (G sharded)
  --combine (local)--> outputs [G, T, d]
```

The tokens are split into `G` routing groups, one per data shard: the size
of the distribution's batch axis times the size of the expert axis (when
that is another axis), so every device routes its own slice of the batch and
the expert axis spreads the routing work instead of repeating it. Sorting,
capacity and the gathers stay inside a group and need no communication; two
`keras.distribution.distribute_tensor` constraints on the buffers (groups
sharded, then experts sharded) are where XLA/GSPMD puts the two all-to-alls.

Capacity is per group: `C = ceil(capacity_factor * T * k / E)` with `T` the
tokens of one group, so an expert that is busy in one shard can drop tokens
there while it has room in another (GShard's local group dispatch). Dropless
routing (`capacity_factor=None`) gives the same result whatever the groups.

Without a distribution, or when the tokens of a call do not split evenly into
the groups (single-token decoding steps, say), the layer keeps one group and
computes exactly what it does on one device.
"""

import math
from typing import NamedTuple

import keras
from keras import ops


class RoutingGroups(NamedTuple):
    """How a MoE layer splits its tokens into groups on the device mesh.

    Attributes:
        group_shape: tuple of ints, the size of each group axis; `G` is their
            product. The groups of a `[G, ...]` tensor are laid out as
            `[*group_shape, ...]`, group axis `i` split on `group_axes[i]`.
        group_axes: tuple of mesh axis names, one per group axis.
        expert_axis: the mesh axis the experts are split on, or None.
        device_mesh: the `keras.distribution.DeviceMesh`.
    """

    group_shape: tuple
    group_axes: tuple
    expert_axis: object
    device_mesh: object

    @property
    def num_groups(self):
        return math.prod(self.group_shape)


def _mesh_sizes(device_mesh):
    return dict(zip(device_mesh.axis_names, device_mesh.shape))


def _expert_kernel_layout(distribution, path):
    """The layout `distribution` gives the expert kernel at `path`, or None."""
    try:
        layout = distribution.get_tensor_layout(path)
    except NotImplementedError:
        return None
    if layout is None or not tuple(layout.axes):
        return None
    return layout


def check_expert_layout(experts_path, num_experts):
    """Refuse an expert count that the expert axis cannot split evenly.

    Called when a MoE layer builds, before its expert kernels exist, so that
    the error names `num_experts` rather than a sharding.

    Args:
        experts_path: str, the variable path prefix of the expert bank
            (e.g. `"decoder_block_0/moe/experts"`).
        num_experts: int, `E`.

    Raises:
        ValueError: if the current distribution splits the expert kernels on
            a mesh axis whose size does not divide `num_experts`.

    Example:

    >>> import keras
    >>> from keras_moe.distribution import get_layout_map
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 4), ("batch", "expert"), [f"cpu:{i}" for i in range(8)])
    >>> distribution = keras.distribution.ModelParallel(
    ...     layout_map=get_layout_map(mesh), batch_dim_name="batch")
    >>> with distribution.scope():
    ...     check_expert_layout("moe/experts", num_experts=8)  # 2 per device
    ...     check_expert_layout("moe/experts", num_experts=6)
    Traceback (most recent call last):
    ...
    ValueError: `num_experts`=6 of `moe/experts` is not divisible by the size 4 of the mesh axis 'expert' ...
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    layout = _expert_kernel_layout(distribution, f"{experts_path}/down_kernel")
    if layout is None:
        return
    axis = layout.axes[0]
    sizes = _mesh_sizes(distribution.device_mesh)
    if axis in sizes and num_experts % sizes[axis]:
        raise ValueError(
            f"`num_experts`={num_experts} of `{experts_path}` is not "
            f"divisible by the size {sizes[axis]} of the mesh axis {axis!r} "
            "that the layout map splits the experts on. Use a number of "
            "experts that is a multiple of the expert axis size, or a "
            "smaller expert axis."
        )


def _expert_axis(distribution, experts):
    """The mesh axis the expert kernels' leading (expert) axis is split on."""
    kernel = getattr(experts, "down_kernel", None)
    if kernel is None:
        return None
    layout = distribution.get_variable_layout(kernel)
    if layout is None or not tuple(layout.axes):
        return None
    axis = layout.axes[0]
    return axis if axis in _mesh_sizes(distribution.device_mesh) else None


def routing_groups(experts, input_shape):
    """The routing groups of a MoE call, or None for a single group.

    Groups follow the data shards: the distribution's batch axis, then the
    expert axis when it is a different axis (its devices then share the
    routing of their batch shard instead of repeating it). An axis is left
    out, last first, when the tokens do not split evenly. A MoE layer asks
    once per call and keeps the answer for its dispatch and its experts.

    Args:
        experts: the layer's `Experts` bank (built).
        input_shape: the shape `[..., d]` of the layer's inputs (tokens are
            all but the last axis; one group unless they are known).

    Returns:
        A `RoutingGroups`, or None for a single group.

    Example:

    >>> import keras
    >>> from keras_moe.distribution import get_layout_map
    >>> from keras_moe.layers import Experts
    >>> experts = Experts(num_experts=8, intermediate_dim=16, name="experts")
    >>> experts.build((8, None, 4))
    >>> routing_groups(experts, (8, 16, 4)) is None  # no distribution
    True
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 4), ("batch", "expert"), [f"cpu:{i}" for i in range(8)])
    >>> distribution = keras.distribution.ModelParallel(
    ...     layout_map=get_layout_map(mesh), batch_dim_name="batch")
    >>> with distribution.scope():
    ...     groups = routing_groups(experts, (8, 16, 4))  # 128 tokens
    ...     single_token = routing_groups(experts, (1, 1, 4))
    >>> groups.group_shape, groups.group_axes, groups.expert_axis
    ((2, 4), ('batch', 'expert'), 'expert')
    >>> single_token is None
    True
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    num_tokens = None
    if all(isinstance(size, int) for size in input_shape[:-1]):
        num_tokens = math.prod(input_shape[:-1])
    device_mesh = distribution.device_mesh
    sizes = _mesh_sizes(device_mesh)
    expert_axis = _expert_axis(distribution, experts)
    axes = [
        axis
        for axis in (distribution.batch_dim_name, expert_axis)
        if axis in sizes and sizes[axis] > 1
    ]
    axes = list(dict.fromkeys(axes))  # the expert axis may be the batch axis

    def splits(axes):
        total = math.prod(sizes[axis] for axis in axes)
        return num_tokens is not None and num_tokens % total == 0

    while axes and not splits(axes):
        axes.pop()
    if not axes:
        return None
    return RoutingGroups(
        group_shape=tuple(sizes[axis] for axis in axes),
        group_axes=tuple(axes),
        expert_axis=expert_axis,
        device_mesh=device_mesh,
    )


def _constrain(values, groups, experts_split):
    """Lay out `values [*group_shape, E?, ...]` on the mesh.

    Groups are split on their axes; with `experts_split`, the axis after the
    groups (experts) is split on the expert axis instead of the groups.
    """
    if keras.backend.backend() != "jax":
        # Only JAX lays tensors out on a mesh (`distribute_tensor`).
        return values
    group_axes = groups.group_axes
    trailing_axes = [None] * (len(values.shape) - len(group_axes))
    if experts_split:
        group_axes = tuple(
            None if axis == groups.expert_axis else axis for axis in group_axes
        )
        trailing_axes[0] = groups.expert_axis
    layout = keras.distribution.TensorLayout(
        tuple(group_axes) + tuple(trailing_axes), groups.device_mesh
    )
    return keras.distribution.distribute_tensor(values, layout)


def constrain_groups(values, groups):
    """Keep each routing group of `values [G, ...]` on its own data shard.

    Args:
        values: a tensor whose leading axis is the `G` groups.
        groups: the `RoutingGroups`, or None (then `values` is returned).

    Returns:
        `values`, constrained.

    Example:

    >>> import numpy as np
    >>> tokens = np.zeros((1, 6, 4), "float32")
    >>> constrain_groups(tokens, None) is tokens  # one group: unchanged
    True
    """
    if groups is None:
        return values
    trailing_shape = tuple(values.shape[1:])
    values = ops.reshape(values, groups.group_shape + trailing_shape)
    values = _constrain(values, groups, experts_split=False)
    return ops.reshape(values, (groups.num_groups,) + trailing_shape)


def run_experts(experts, buffers, groups, training=None):
    """Run the experts on `buffers [G, E, C, d]` where the experts live.

    The buffers go from group-sharded to expert-sharded (an all-to-all over
    the expert axis), each device runs its own experts, and the outputs go
    back (the second all-to-all).

    Args:
        experts: the `Experts` bank.
        buffers: `[G, E, C, d]`, as `dispatch` made them.
        groups: the `RoutingGroups` the buffers were made with.
        training: bool, passed to the experts (their dropout).

    Returns:
        The expert outputs, `[G, E, C, d]`, group-sharded.

    Example:

    On one device the layout constraints have nothing to split: the
    experts run on every group's buffers as they are.

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import Experts
    >>> mesh = keras.distribution.DeviceMesh((1,), ("batch",), ["cpu:0"])
    >>> groups = RoutingGroups((1,), ("batch",), "batch", mesh)
    >>> experts = Experts(num_experts=4, intermediate_dim=8)
    >>> buffers = np.ones((1, 4, 3, 2), "float32")
    >>> tuple(run_experts(experts, buffers, groups).shape)
    (1, 4, 3, 2)
    """
    buffer_shape = tuple(buffers.shape[1:])
    buffers = ops.reshape(buffers, groups.group_shape + buffer_shape)
    buffers = _constrain(buffers, groups, experts_split=False)
    if groups.expert_axis is not None:
        buffers = _constrain(buffers, groups, experts_split=True)
    outputs = experts(buffers, training=training)
    if groups.expert_axis is not None:
        outputs = _constrain(outputs, groups, experts_split=True)
    outputs = _constrain(outputs, groups, experts_split=False)
    return ops.reshape(outputs, (groups.num_groups,) + buffer_shape)
