"""Every docstring example in the package runs and prints what it says.

The modules are found by walking `keras_moe`; a module that defines a class
or function exported by one of the public packages (`keras_moe.layers`,
`keras_moe.models`, ...) must show at least one runnable example.
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import keras_moe


def package_modules():
    return sorted(
        module.name for module in pkgutil.walk_packages(keras_moe.__path__, "keras_moe.")
    )


def modules_defining_public_names():
    """Modules that define a class or function a public package exports."""
    modules = set()
    for package in pkgutil.iter_modules(keras_moe.__path__, "keras_moe."):
        if not package.ispkg:
            continue
        for name, value in vars(importlib.import_module(package.name)).items():
            if name.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if value.__module__.startswith("keras_moe."):
                modules.add(value.__module__)
    return modules


@pytest.fixture(scope="module")
def modules_with_examples():
    return modules_defining_public_names()


def test_public_names_are_found(modules_with_examples):
    assert len(modules_with_examples) > 20  # layers, models, presets, convert, ...


@pytest.mark.parametrize("module_name", package_modules())
def test_docstring_examples(module_name, modules_with_examples):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, module_name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed"
    if module_name in modules_with_examples:
        assert results.attempted > 0, f"{module_name} exports names but shows no example"
