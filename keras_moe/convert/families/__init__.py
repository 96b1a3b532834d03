"""The Hugging Face model families keras-moe converts: one module each.

Every public module of this package defines `FAMILIES`, a tuple of
`keras_moe.convert.family.Family` instances (one per `model_type` it
converts); `keras_moe.convert.registry` registers them all. Adding a family
is adding a module here. A private module (`_name.py`) holds what one
family's module needs beside it (how its checkpoints store tensors).
"""

import importlib
import pkgutil

MODULES = tuple(
    importlib.import_module(f"{__name__}.{module.name}")
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    if not module.name.startswith("_")
)
