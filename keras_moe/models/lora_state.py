"""LoRA state saved unmerged beside a backbone's weights."""

import weakref

from keras_moe.backend.keras_internals import KerasSaveable


class LoRAState(KerasSaveable):
    """The adapted layers' variables, saved unmerged beside the weights.

    Keras' `EinsumDense` (and `FeedForwardWeights`, as Keras does) save a
    LoRA layer's kernel with the adaptation merged in and reset the factors
    when loading: the outputs survive, but training cannot resume where it
    stopped (the base kernel, the factors and, for int8 kernels, the
    quantization all change). `MoEBackbone.enable_lora` attaches this
    object; Keras' saving visits it after every layer of the backbone
    (attributes after layers), so loading puts back each adapted layer's
    own variables (base kernels, scales, biases and factors) exactly as
    they were saved, after the layers have loaded their merged kernels.
    Files without these entries (saved before LoRA was enabled, or by an
    older version) load as before.
    """

    def __init__(self, backbone):
        self._backbone = weakref.ref(backbone)
        self._error = None

    def _obj_type(self):
        return "Operation"

    def _variables(self):
        backbone = self._backbone()
        layers = backbone._weighted_layers()
        for index in getattr(backbone, "_lora_enabled_layers", []):
            for variable in layers[index].variables:
                yield f"{index}.{variable.name}", variable, layers[index]

    def save_own_variables(self, store):
        for key, variable, _ in self._variables():
            store[key] = variable

    def load_own_variables(self, store):
        keys = set(store.keys())
        if not keys:
            # Keras visits the backbone again by another path (`backbone`
            # after `layers/...`), with nothing stored there: a failure on
            # the first visit must not be cleared by the second.
            if self._error is not None:
                raise self._error
            return
        try:
            self._load(store, keys)
        except ValueError as error:
            self._error = error
            raise
        self._error = None

    def _load(self, store, keys):
        # Read everything first: `store` is the file's current entry.
        values = {key: store[key] for key in keys}
        expected = {}
        for key, variable, layer in self._variables():
            if key not in values:
                raise ValueError(
                    f"The saved LoRA state has no variable {variable.name!r} "
                    f"for layer {layer.path!r}: the file was saved from a "
                    "model with other LoRA targets or quantization."
                )
            if tuple(values[key].shape) != tuple(variable.shape):
                raise ValueError(
                    f"The saved LoRA state of {variable.path!r} has shape "
                    f"{tuple(values[key].shape)}; the model's is "
                    f"{tuple(variable.shape)}."
                )
            expected[key] = variable
        for key, variable in expected.items():
            variable.assign(values[key])


def lora_variables(layer):
    """The LoRA factors of a layer: `lora_kernel_a`/`_b` of an
    `EinsumDense`, `{projection}_kernel_lora_a`/`_b` of a feed-forward
    block."""
    return [variable for variable in layer.weights if "lora_" in variable.name]
