"""`run_layer_test`: the checks every layer of the package passes."""

import json

import keras
import numpy as np

from .arrays import assert_same_weights
from .arrays import to_numpy
from .gradients import check_gradients
from .saving import reload_keras_file


def _floating(tensors):
    return [
        t for t in tensors
        if t is not None and "float" in keras.backend.standardize_dtype(t.dtype)
    ]


def run_layer_test(
    layer_class,
    init_kwargs,
    input_data,
    *,
    expected_output_shape=None,
    expected_config_keys=None,
    select_outputs=None,
    before_saving=None,
    mask=None,
    mixed_precision_dtype="bfloat16",
    reference_weights=None,
    reference_objective=None,
    gradient_rng=None,
    tmp_path=None,
):
    """Build, call, serialise, save and reload a layer; optionally check its
    masking, mixed precision and gradients.

    1. Config: `from_config(get_config())` gives the same config, which is
       JSON; with `expected_config_keys`, the config holds exactly those
       keys beside the base layer's.
    2. Call: the outputs have `expected_output_shape` (default: the input
       shape), eagerly and symbolically.
    3. `.keras` file: a model holding the layer, after one training call
       (which moves balancing biases) and `before_saving(layer)`, is saved
       and loaded in safe mode: same weights, same configs, the same outputs
       bit for bit; router statistics record from the first training step.
    4. Masking (with `mask`): padded positions come out zero, and whatever
       they hold changes nothing for the real tokens.
    5. Mixed precision (unless `mixed_precision_dtype` is None), built
       symbolically: under `mixed_<dtype>` the weights stay float32 and the
       floating outputs have that dtype (or float32, for layers that compute
       in float32).
    6. Gradients (with `reference_objective`): `check_gradients` of the
       built layer against the float64 reference.

    Args:
        layer_class: the layer class.
        init_kwargs: constructor arguments.
        input_data: float32 numpy input, batch first.
        expected_output_shape: shape (or structure of shapes) of the selected
            outputs.
        expected_config_keys: the config keys beyond `keras.layers.Layer`'s.
        select_outputs: `outputs -> tensor or list of tensors` to check and
            save (e.g. the fields of a routing result); default: all.
        before_saving: `layer -> None`, run before saving (e.g. to set a
            weight away from its initial value).
        mask: boolean `[batch, tokens]` padding mask, or None.
        mixed_precision_dtype: compute dtype of the mixed policy to test.
        reference_weights, reference_objective, gradient_rng: see
            `check_gradients`. The layer's trainable weights are first set
            from `reference_weights` (keyed by variable path, so give the
            layer a `name`); other state (a balancing bias moved by the
            training call) is the reference's to model.
        tmp_path: directory for the `.keras` file (default: a temporary one).

    Returns:
        The layer, built and called.
    """
    select_outputs = select_outputs or (lambda outputs: outputs)
    layer = layer_class(**init_kwargs)
    config = layer.get_config()
    assert layer_class.from_config(config).get_config() == config
    json.dumps(config)
    if expected_config_keys is not None:
        base_keys = set(keras.layers.Layer(name="base").get_config())
        assert set(config) - base_keys == set(expected_config_keys)

    # Symbolic and eager calls agree on the output shape.
    expected = expected_output_shape or tuple(input_data.shape)
    batch = input_data.shape[0]
    symbolic = select_outputs(layer(keras.Input(input_data.shape[1:], batch_size=batch)))
    outputs = select_outputs(layer(input_data))
    for result in (symbolic, outputs):
        shapes = keras.tree.map_structure(lambda t: tuple(t.shape), result)
        assert shapes == expected, f"output shapes {shapes}, expected {expected}"
    # Built, the layer still gives a config that rebuilds it.
    assert layer_class.from_config(layer.get_config()).get_config() == layer.get_config()

    _check_keras_file(layer, input_data, select_outputs, before_saving, tmp_path)
    if mask is not None:
        _check_padding_changes_nothing(layer, input_data, mask, select_outputs)
    if mixed_precision_dtype is not None:
        _check_mixed_precision(
            layer_class, init_kwargs, input_data, select_outputs, mixed_precision_dtype
        )
    if reference_objective is not None:
        for variable in layer.trainable_variables:
            variable.assign(reference_weights[variable.path].astype(variable.dtype))
        call_kwargs = {"training": True} if mask is None else {"training": True, "mask": mask}
        check_gradients(
            layer, input_data, reference_weights, reference_objective, gradient_rng,
            **call_kwargs,
        )
    return layer


def _check_keras_file(layer, x, select_outputs, before_saving, tmp_path):
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, select_outputs(layer(inputs)))
    model(x, training=True)  # moves the balancing biases
    if before_saving is not None:
        before_saving(layer)
    expected = [to_numpy(y) for y in keras.tree.flatten(model(x))]
    restored = reload_keras_file(model, tmp_path, layer.name)
    assert_same_weights(model, restored)
    for original, loaded in zip(model.layers, restored.layers):
        assert loaded.get_config() == original.get_config()
    for value, loaded in zip(expected, keras.tree.flatten(restored(x))):
        np.testing.assert_array_equal(to_numpy(loaded), value)
    # Router statistics: the setting survives and the restored layer
    # records from its first training step (the accumulators themselves
    # are per-run state, not weights).
    for loaded in restored.layers:
        if getattr(loaded, "router_stats", None) is not None:
            assert loaded.track_router_stats
            loaded(x, training=True)
            assert loaded.router_stats.values()["steps"] == 1


def _check_padding_changes_nothing(layer, x, mask, select_outputs):
    clean = [to_numpy(y) for y in keras.tree.flatten(select_outputs(layer(x, mask=mask)))]
    hostile = x.copy()
    hostile[~mask] = np.random.default_rng(0).normal(scale=1e4, size=hostile[~mask].shape)
    scrambled = keras.tree.flatten(select_outputs(layer(hostile, mask=mask)))
    for value, again in zip(clean, scrambled):
        np.testing.assert_array_equal(to_numpy(again)[mask], value[mask])
        assert np.all(value[~mask] == 0.0)


def _check_mixed_precision(layer_class, init_kwargs, x, select_outputs, dtype):
    # Symbolic: the dtypes are fixed when the layer is built, and an eager
    # call would compile every op again for the new dtype (seconds on JAX).
    layer = layer_class(**init_kwargs, dtype=f"mixed_{dtype}")
    outputs = keras.tree.flatten(select_outputs(layer(keras.Input(x.shape[1:]))))
    for weight in layer.weights:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32", weight.path
    assert _floating(outputs)
    for output in _floating(outputs):
        assert keras.backend.standardize_dtype(output.dtype) in (dtype, "float32")
