"""Private Keras internals, in one place.

Keras keeps out of its public API a few things this package needs:
- for the router statistics: the scope helpers (the only way to tell a
  symbolic trace, or a JAX step whose state lives outside the variables,
  from an eager call), a layer's call context (what the layers of one
  forward pass share), the recursive list of a model's layers, and whether
  a JAX variable holds a value;
- for loading and saving: Keras' global state (its list of variables
  created without a value), its saving library (`H5IOStore`, the attribute
  skip sets) and `KerasSaveable`, the base of objects saved with a model;
- for quantization: which layers a `model.quantize(...)` filter selects,
  and the int4 block size a config gives a layer.
The rest of the package reaches them through this module, so that a Keras
upgrade that moves them breaks this file only.
"""

import keras
from keras.src.backend import get_stateless_scope
from keras.src.backend import in_stateless_scope
from keras.src.backend import in_symbolic_scope
from keras.src.backend.common import global_state
from keras.src.quantizers.quantization_config import get_block_size_for_layer
from keras.src.quantizers.utils import should_quantize_layer
from keras.src.saving import saving_lib
from keras.src.saving.keras_saveable import KerasSaveable

__all__ = [
    "KerasSaveable",
    "all_layers",
    "forward_pass_value",
    "get_block_size_for_layer",
    "global_state",
    "holds_value",
    "in_stateless_scope",
    "in_symbolic_scope",
    "saving_lib",
    "should_quantize_layer",
]


def _forward_pass_of(layer):
    # The stateless scope of a JAX step (`stateless_call` runs `call`, not
    # `__call__`), or else the call context Keras opens for the outermost
    # `__call__` (the model's). Outside a call, Keras would open a call
    # context that nothing closes: callers are inside `call`.
    if in_stateless_scope():
        return get_stateless_scope()
    try:
        return layer._get_call_context()
    except AttributeError:
        return None


def forward_pass_value(layer, key, create):
    """A value shared by every layer called in the current forward pass.

    The first layer to ask for `key` in a forward pass (a model's call, or a
    JAX step's `stateless_call`) gets a new value, `create()`; every layer
    asking afterwards in the same pass gets that same value. Call it from a
    layer's `call` only.

    Args:
        layer: the Keras layer being called.
        key: str, the name the value is kept under.
        create: a function of no arguments making the value.

    Returns:
        The value.

    Example:

    >>> import keras
    >>> class Probe(keras.layers.Layer):
    ...     def call(self, x):
    ...         forward_pass_value(self, "probes", list).append(self.name)
    ...         return x
    >>> class Pair(keras.layers.Layer):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.first, self.second = Probe(name="a"), Probe(name="b")
    ...     def call(self, x):
    ...         names = forward_pass_value(self, "probes", list)
    ...         x = self.second(self.first(x))
    ...         self.seen = " then ".join(names)
    ...         return x
    >>> pair = Pair()
    >>> _ = pair(keras.ops.ones((1,)))
    >>> pair.seen
    'a then b'
    """
    forward_pass = _forward_pass_of(layer)
    attribute = f"_keras_moe_{key}"
    value = getattr(forward_pass, attribute, None)
    if value is None:
        value = create()
        if forward_pass is not None:
            setattr(forward_pass, attribute, value)
    return value


def all_layers(model):
    """`model` and every layer inside it, depth first.

    Args:
        model: a Keras layer or model.

    Returns:
        A list of layers, `model` first.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.layers.Dense(2, name="dense")])
    >>> [layer.name for layer in all_layers(model)][1:]
    ['dense']
    """
    return list(model._flatten_layers(include_self=True))


def holds_value(variable):
    """Whether `variable` can be read here (not inside a JAX step's state).

    A JAX `fit` keeps the training state outside the variables; inside its
    compiled step a variable has no value unless the step's stateless scope
    carries one.

    Args:
        variable: a `keras.Variable`.

    Returns:
        bool.

    Example:

    >>> import keras
    >>> holds_value(keras.Variable(1.0))
    True
    """
    if in_stateless_scope():
        if get_stateless_scope().get_current_value(variable) is not None:
            return True
    return keras.backend.backend() != "jax" or variable._value is not None
