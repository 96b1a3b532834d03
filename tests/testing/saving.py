"""Save a model and load it back, the way users do: safe mode only."""

import tempfile
from pathlib import Path

import keras

from keras_moe import presets


def reload_keras_file(model, directory=None, name="model"):
    """`model` saved to `<directory>/<name>.keras` and loaded in safe mode.

    Args:
        model: a Keras model.
        directory: where to write (default: a new temporary directory).
        name: the file name without `.keras`.
    """
    path = Path(directory or tempfile.mkdtemp()) / f"{name}.keras"
    model.save(path)
    return keras.saving.load_model(path, safe_mode=True)


def reload_preset(model, directory=None):
    """`model` saved with `save_to_preset` and loaded with `presets.load`
    (no preprocessor)."""
    path = Path(directory or tempfile.mkdtemp()) / "preset"
    model.save_to_preset(str(path))
    return presets.load(path, preprocessor=None)
