"""Loading weights into a model all at once, or not at all."""

import os

from keras import ops


def load_weights_or_restore(model, load, filepath, *args, **kwargs):
    """Run `load(filepath, ...)`; if it fails, put every variable back.

    Keras reads a weights file layer by layer, so a file truncated by a
    crash, or corrupted on disk, can fail halfway and leave a model with
    some layers loaded and others not, behind an `OSError` or `KeyError`
    from h5py that does not say which file was bad. This keeps a host copy
    of the model's (and its optimizer's) variables while `load` runs,
    restores them if it raises, and raises an error that names the file.

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
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    snapshot = [(variable, ops.convert_to_numpy(variable)) for variable in variables]
    try:
        return load(filepath, *args, **kwargs)
    except Exception as error:
        for variable, value in snapshot:
            variable.assign(value)
        message = (
            f"Could not load weights from {os.fspath(filepath)!r}: "
            f"{type(error).__name__}: {error}. The file may be truncated "
            "(for example by a crash while it was written) or corrupted, or "
            "written by a different model. The model's weights were left "
            "as they were."
        )
        # An `OSError` stays one: `BackupAndRestore` falls back to its
        # previous checkpoint on it.
        if isinstance(error, OSError):
            raise OSError(message) from error
        raise ValueError(message) from error
