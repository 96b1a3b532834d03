"""Loading weights into a model all at once, or not at all."""

import os
import warnings

import keras
from keras import ops


class _VerifyingScope(keras.StatelessScope):
    """A stateless scope that checks assignments and keeps none of them.

    Inside it, `variable.assign(value)` still reads and converts `value`
    and checks its shape (raising as a real assignment would), but the
    value is dropped instead of being recorded: one variable's value is
    alive at a time, and no variable changes.
    """

    def add_update(self, update):
        # Converted and shape-checked by `assign`; not kept. JAX copies
        # asynchronously: wait, so that copies do not pile up in flight.
        _, value = update
        if hasattr(value, "block_until_ready"):
            value.block_until_ready()


# Kinds of objects Keras' saving walks. For each, Keras makes a reference
# object to know which attributes to skip, meant to be made once: Keras
# 3.15 stores the result under `saving_attr_skipset_*` but looks it up under
# `saving_attr_skiplist_*`, so it makes one on every walk, and a reference
# optimizer creates variables. Made inside the verification scope, that
# would fail where the real load succeeds.
_SAVEABLE_TYPES = (
    "Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss"
)


def _prepare_saving():
    """Make Keras' reference objects before the verification pass."""
    try:
        from keras_moe.backend.keras_internals import global_state
        from keras_moe.backend.keras_internals import saving_lib

        for obj_type in _SAVEABLE_TYPES:
            skipset = saving_lib.get_attr_skipset(obj_type)
            for key in ("skiplist", "skipset"):
                name = f"saving_attr_{key}_{obj_type}"
                if global_state.get_global_attribute(name) is None:
                    global_state.set_global_attribute(name, skipset)
    except Exception:  # Another Keras: if the verification then fails,
        pass  # the load falls back on a copy; never worse than before.


def _model_variables(model):
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    return variables


def _error(filepath, error, left_as_they_were=True):
    state = (
        "The model's weights were left as they were."
        if left_as_they_were
        else "The file changed or failed to read after it was checked: the "
        "model's weights may be partly loaded; load them again."
    )
    message = (
        f"Could not load weights from {os.fspath(filepath)!r}: "
        f"{type(error).__name__}: {error}. The file may be truncated "
        "(for example by a crash while it was written) or corrupted, or "
        f"written by a different model. {state}"
    )
    # An `OSError` stays one: `BackupAndRestore` falls back to its
    # previous checkpoint on it.
    if isinstance(error, OSError):
        return OSError(message)
    return ValueError(message)


def load_weights_or_restore(model, load, filepath, *args, **kwargs):
    """Run `load(filepath, ...)` so that it loads every weight or none.

    Keras reads a weights file layer by layer, so a file truncated by a
    crash, or corrupted on disk, can fail halfway and leave a model with
    some layers loaded and others not, behind an `OSError` or `KeyError`
    from h5py that does not say which file was bad. This runs `load` twice,
    without a copy of the model:

    1. a verification pass, inside a `keras.StatelessScope` whose updates
       are dropped: every tensor of the file is read, converted and
       checked against its variable exactly as loading does (so a
       truncated, corrupted or mismatched file fails here), one variable at
       a time, and no variable changes;
    2. the real load, which then meets the same file.

    Memory beyond the model is one variable's value at a time (a host copy
    of every variable, as a plain restore-on-failure needs, would double
    the model's memory). If the verification fails, the model is untouched:
    the real load runs once more behind a host copy of the variables,
    which are restored if it fails too (so a failure the verification pass
    alone would meet cannot lose a load). Only a file that changes, or a
    disk that fails, between the two passes can still interrupt the real
    load; the error then says so.

    Args:
        model: the Keras model being loaded into.
        load: the loading function, e.g. the `keras.Model.load_weights`
            bound to `model`.
        filepath: the weights file (or sharded index) being read.
        *args: passed to `load`.
        **kwargs: passed to `load`.

    Returns:
        What `load` returns.

    Raises:
        OSError: if the file cannot be opened or read (missing, truncated,
            not HDF5), naming it; the model is left as it was.
        ValueError: if the file opens but its content does not load
            (corrupted objects, or weights of another model), naming it;
            the model is left as it was.

    Example:

    >>> import os, tempfile
    >>> import keras
    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> path = os.path.join(tempfile.mkdtemp(), "bad.weights.h5")
    >>> _ = open(path, "wb").write(b"not an HDF5 file")
    >>> before = model.get_weights()
    >>> try:
    ...     load_weights_or_restore(model, model.load_weights, path)
    ... except OSError as error:
    ...     print("bad.weights.h5" in str(error))
    True
    >>> all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    True
    """
    variables = _model_variables(model)
    _prepare_saving()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # The real load warns once.
            with _VerifyingScope():
                load(filepath, *args, **kwargs)
        verified = True
    except Exception:
        verified = False
    if verified:
        try:
            return load(filepath, *args, **kwargs)
        except Exception as error:
            raise _error(filepath, error, left_as_they_were=False) from error
    # The verification failed: load behind a copy, which restores the
    # model if the file is at fault (the real load fails too).
    snapshot = [(variable, ops.convert_to_numpy(variable)) for variable in variables]
    try:
        return load(filepath, *args, **kwargs)
    except Exception as error:
        for variable, value in snapshot:
            variable.assign(value)
        raise _error(filepath, error) from error
