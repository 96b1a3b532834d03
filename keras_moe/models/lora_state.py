"""A backbone's LoRA adaptations, saved: unmerged beside its weights, and
alone in `.lora.h5` files."""

import weakref

import numpy as np

from keras_moe.backend.keras_internals import KerasSaveable
from keras_moe.backend.keras_internals import saving_lib

# The `.lora.h5` entry listing the adapted layers' names.
_LORA_TARGETS = "target_layer_names"


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


def save_lora_weights(backbone, filepath):
    """Save the LoRA factors of every adapted layer of `backbone`.

    The layout of keras-hub's `Backbone.save_lora_weights` (each adapted
    layer's factors under its index in `backbone._weighted_layers()`), with
    each layer's own variable names, so that feed-forward layers (three
    pairs of factors, one per projection) save too, and the target layer
    names, so that `load_lora_weights` on a fresh model adapts the same
    layers.

    Args:
        backbone: a `MoEBackbone` with LoRA enabled.
        filepath: str, a path ending in `.lora.h5`.

    Example:

    >>> import os, tempfile
    >>> from keras_moe import presets
    >>> def tiny_backbone():
    ...     return presets.load(
    ...         "mixtral_small", preprocessor=None, num_layers=1).backbone
    >>> backbone = tiny_backbone()
    >>> backbone.enable_lora(rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "adapter.lora.h5")
    >>> save_lora_weights(backbone, path)
    >>> fresh = tiny_backbone()  # adapts the saved layers, then loads
    >>> load_lora_weights(fresh, path)
    >>> fresh._lora_target_layer_names
    ['query', 'value']
    """
    if not getattr(backbone, "_lora_enabled_layers", []):
        raise ValueError(
            "There are no LoRA-enabled layers in this model: call "
            "`enable_lora(rank)` first."
        )
    if not str(filepath).endswith(".lora.h5"):
        raise ValueError(
            "The filename must end in `.lora.h5`. "
            f"Received: filepath={filepath}"
        )
    store = saving_lib.H5IOStore(filepath, mode="w")
    try:
        lora_store = store.make("lora")
        lora_store["rank"] = backbone._lora_rank
        targets = getattr(backbone, "_lora_target_layer_names", None)
        if targets:
            names = "\n".join(targets).encode()
            lora_store[_LORA_TARGETS] = np.frombuffer(names, "uint8")
        layers = backbone._weighted_layers()
        for index in backbone._lora_enabled_layers:
            inner_store = store.make(f"lora/{index}")
            for variable in lora_variables(layers[index]):
                inner_store[variable.name] = variable
    finally:
        store.close()


def load_lora_weights(backbone, filepath):
    """Load LoRA factors saved by `save_lora_weights` into `backbone`.

    A backbone without LoRA first enables it on the layers the file was
    saved from; one with LoRA must have the file's rank and layers.

    Args:
        backbone: a `MoEBackbone`.
        filepath: str, a `.lora.h5` file.
    """
    store = saving_lib.H5IOStore(filepath, mode="r")
    try:
        lora_store = store.get("lora")
        rank = int(lora_store["rank"][()])
        targets = None
        if _LORA_TARGETS in lora_store.keys():
            targets = bytes(np.asarray(lora_store[_LORA_TARGETS])).decode()
            targets = targets.split("\n")
        if not getattr(backbone, "_lora_enabled_layers", []):
            backbone.enable_lora(rank, target_layer_names=targets)
        elif backbone._lora_rank != rank:
            raise ValueError(
                f"The LoRA rank of file '{filepath}' is rank={rank}, but "
                f"the model was called with `enable_lora(rank="
                f"{backbone._lora_rank})`. Both ranks must match."
            )
        layers = backbone._weighted_layers()
        for index in backbone._lora_enabled_layers:
            if not store.has_path(f"lora/{index}"):
                raise ValueError(
                    f"File '{filepath}' has no LoRA weights for layer "
                    f"{layers[index].path!r}: it was saved from other "
                    f"target layers (saved: {targets})."
                )
            inner_store = store.get(f"lora/{index}")
            for variable in lora_variables(layers[index]):
                variable.assign(inner_store[variable.name])
    finally:
        store.close()
