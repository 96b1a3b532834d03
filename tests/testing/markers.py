"""Marks shared by the test files."""

import keras
import pytest

# Checks of source files, saved configs, HDF5 files and argument validation
# do not depend on the backend: they run once, under PyTorch.
backend_independent = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="does not depend on the backend; runs under PyTorch",
)
