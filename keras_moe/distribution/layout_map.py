"""`get_layout_map`: where every keras_moe weight lives on a device mesh."""

import re

import keras

# Variable paths, matched with `re.fullmatch` (Keras >= 3.14). `(?:.*/)?`
# lets a key match the layer alone (`experts/up_kernel`) or inside a model
# (`decoder_block_0/moe/experts/up_kernel`).
_ANY = r"(?:.*/)?"
# A feed-forward block that is not the routed expert bank (`FeedForward`:
# dense decoder layers, `shared_experts`), so that the two never both match.
_DENSE_FFN = _ANY + r"(?!experts/)[^/]+/"
_EXPERT_WEIGHT = _ANY + r"experts/[^/]+"

# (key, axes) with the placeholders "expert" and "model" standing for the
# axes given to `get_layout_map`. Unlisted weights (routers, norms, the
# low-rank MLA down-projections) are replicated.
_LAYOUTS = (
    # Routed experts, `Experts`: kernels [E, d, f] and [E, f, d], biases
    # [E, f] and [E, d]. Experts split on the expert axis; inside each
    # expert, the hidden width `f` splits on the model axis.
    (_ANY + r"experts/(?:gate|up)_kernel", ("expert", None, "model")),
    (_ANY + r"experts/down_kernel", ("expert", "model", None)),
    (_ANY + r"experts/(?:gate|up)_bias", ("expert", "model")),
    (_ANY + r"experts/down_bias", ("expert", None)),
    # Dense feed-forward blocks: [d, f], [f, d] (Megatron-style column then
    # row split on the model axis).
    (_DENSE_FFN + r"(?:gate|up)_kernel", (None, "model")),
    (_DENSE_FFN + r"down_kernel", ("model", None)),
    (_DENSE_FFN + r"(?:gate|up)_bias", ("model",)),
    # Grouped-query attention: heads split on the model axis,
    # [d, heads, head_dim] and [heads, head_dim, d].
    (_ANY + r"attention/(?:query|key|value)/kernel", (None, "model", None)),
    (_ANY + r"attention/(?:query|key|value)/bias", ("model", None)),
    (_ANY + r"attention/attention_output/kernel", ("model", None, None)),
    # Multi-head latent attention: the up-projections and the output
    # projection split on heads.
    (
        _ANY + r"attention/(?:q_proj|q_b_proj|kv_b_proj)/kernel",
        (None, "model", None),
    ),
    (_ANY + r"attention/o_proj/kernel", ("model", None, None)),
    # Embeddings [V, d] and the untied head [d, V] split on the hidden
    # axis: `d` divides by the usual model axis sizes, byte vocabularies
    # (259) do not.
    (_ANY + r"token_embedding/embeddings", (None, "model")),
    (_ANY + r"token_embedding/reverse_embeddings", ("model", None)),
)


def _check_axis(device_mesh, argument, axis, allow_none):
    if axis is None and allow_none:
        return
    if axis not in device_mesh.axis_names:
        raise ValueError(
            f"`{argument}` must be the name of an axis of the device mesh "
            f"{tuple(device_mesh.axis_names)}"
            f"{' (or None)' if allow_none else ''}. "
            f"Received: {argument}={axis!r}"
        )


def get_layout_map(
    device_mesh,
    batch_axis="batch",
    expert_axis="expert",
    model_axis=None,
    *,
    model=None,
):
    """A `keras.distribution.LayoutMap` for keras_moe models and layers.

    Data, expert and model parallelism on one `DeviceMesh`:

    - **Experts**: the stacked expert kernels `[E, d, f]` / `[E, f, d]` of
      every MoE layer (`SparseMoE`, `SharedExpertMoE`, `HierarchicalMoE`,
      `SoftMoE`) split their expert axis on `expert_axis`, so each device
      holds `E / n` experts. The MoE layers then route the tokens of each
      data shard locally and send them to their experts with all-to-alls
      (see `keras_moe.distribution.expert_parallel`): tokens move, expert
      weights never do.
    - **Model** (optional): attention heads, dense feed-forward and shared
      expert kernels, the hidden width of each expert, and the embeddings'
      hidden axis split on `model_axis` (Megatron-style).
    - **Data**: the batch splits on `batch_axis`: give the same name as
      `batch_dim_name` to `keras.distribution.ModelParallel`.

    Routers, norms and biases on the hidden axis are replicated. The expert
    axis may be the batch axis (GShard's layout: experts spread over the
    data-parallel devices).

    Keys are regular expressions matched against variable paths with
    `re.fullmatch`; an expert bank is recognised by the name `experts`,
    which every keras_moe MoE layer gives it.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        batch_axis: str, the mesh axis the batch is split on.
        expert_axis: str, the mesh axis the experts are split on, or None to
            replicate them. May equal `batch_axis`.
        model_axis: str, the mesh axis for tensor (model) parallelism, or
            None (the default) for none.
        model: optional built model or layer. When given, every weight the
            map splits is checked to divide evenly now, instead of failing
            when the weights are created.

    Returns:
        A `keras.distribution.LayoutMap`.

    Raises:
        ValueError: for an axis name the mesh does not have, a model axis
            that is also the batch or expert axis, or (with `model`) a
            `num_experts` or other split dimension that the mesh axis does
            not divide.

    Example:

    The layouts depend only on the mesh's axis names and sizes, so device
    names are enough to show them (leave `devices` out to use
    `keras.distribution.list_devices()`).

    >>> import keras
    >>> from keras_moe.distribution import get_layout_map
    >>> devices = [f"cpu:{i}" for i in range(8)]
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 4), ("batch", "expert"), devices)
    >>> layout_map = get_layout_map(mesh)
    >>> layout_map["decoder_block_0/moe/experts/up_kernel"].axes
    ('expert', None, None)
    >>> layout_map["decoder_block_0/moe/router/kernel"] is None  # replicated
    True
    >>> distribution = keras.distribution.ModelParallel(
    ...     layout_map=layout_map, batch_dim_name="batch")

    With a model axis as well, the attention heads split on it too:

    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 2, 2), ("batch", "expert", "model"), devices)
    >>> layout_map = get_layout_map(mesh, model_axis="model")
    >>> layout_map["decoder_block_0/moe/experts/down_kernel"].axes
    ('expert', 'model', None)
    >>> layout_map["decoder_block_0/attention/query/kernel"].axes
    (None, 'model', None)
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh`. "
            f"Received: device_mesh={device_mesh!r}"
        )
    _check_axis(device_mesh, "batch_axis", batch_axis, allow_none=False)
    _check_axis(device_mesh, "expert_axis", expert_axis, allow_none=True)
    _check_axis(device_mesh, "model_axis", model_axis, allow_none=True)
    if model_axis is not None and model_axis in (batch_axis, expert_axis):
        raise ValueError(
            "`model_axis` must differ from `batch_axis` and `expert_axis`: a "
            "mesh axis can split a weight along one dimension only. "
            f"Received: batch_axis={batch_axis!r}, expert_axis="
            f"{expert_axis!r}, model_axis={model_axis!r}"
        )
    axis_names = {"expert": expert_axis, "model": model_axis}
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for key, placeholders in _LAYOUTS:
        axes = tuple(axis_names.get(name) for name in placeholders)
        if any(axis is not None for axis in axes):
            layout_map[key] = axes
    if model is not None:
        _check_divisible(layout_map, model)
    return layout_map


def _check_divisible(layout_map, model):
    """Raise a ValueError naming the first weight the mesh cannot split."""
    device_mesh = layout_map.device_mesh
    sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    for variable in model.weights:
        layout = layout_map[variable.path]
        if layout is None:
            continue
        for dim, (size, axis) in enumerate(zip(variable.shape, layout.axes)):
            if axis is None or size % sizes[axis] == 0:
                continue
            if dim == 0 and re.fullmatch(_EXPERT_WEIGHT, variable.path):
                raise ValueError(
                    f"`num_experts`={size} of `{variable.path}` is not "
                    f"divisible by the size {sizes[axis]} of the mesh axis "
                    f"{axis!r} the experts are split on. Use a number of "
                    "experts that is a multiple of the expert axis size, or "
                    "a smaller expert axis."
                )
            raise ValueError(
                f"Dimension {dim} (size {size}) of `{variable.path}` "
                f"{tuple(variable.shape)} is not divisible by the size "
                f"{sizes[axis]} of the mesh axis {axis!r} the layout map "
                "splits it on."
            )
