"""The Hugging Face model families keras-moe converts: one module each.

Every module of this package defines `FAMILIES`, a tuple of
`keras_moe.convert.family.Family` instances (one per `model_type` it
converts); `keras_moe.convert.registry` registers them all. Adding a family
is adding a module here.
"""

import importlib
import pkgutil

MODULES = tuple(
    importlib.import_module(f"{__name__}.{module.name}")
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
)
