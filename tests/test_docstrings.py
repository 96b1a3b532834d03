"""Every docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import keras_moe


# Modules whose public classes and functions must show a runnable example.
MODULES_WITH_EXAMPLES = {
    "keras_moe.callbacks.heatmap",
    "keras_moe.callbacks.router_stats",
    "keras_moe.distribution.expert_parallel",
    "keras_moe.distribution.layout_map",
    "keras_moe.convert.checkpoint",
    "keras_moe.convert.export",
    "keras_moe.convert.families",
    "keras_moe.convert.hub",
    "keras_moe.convert.loading",
    "keras_moe.convert.tokenizer",
    "keras_moe.convert.weight_mapping",
    "keras_moe.layers.experts",
    "keras_moe.layers.soft_moe",
    "keras_moe.layers.sparse_moe",
    "keras_moe.layers.top_k_router",
    "keras_moe.models.grouped_query_attention",
    "keras_moe.models.moe_backbone",
    "keras_moe.models.moe_causal_lm",
    "keras_moe.models.moe_causal_lm_preprocessor",
    "keras_moe.models.moe_decoder_block",
    "keras_moe.models.moe_tokenizer",
    "keras_moe.models.multi_head_latent_attention",
    "keras_moe.models.rms_normalization",
    "keras_moe.models.yarn",
    "keras_moe.ops.dispatch",
    "keras_moe.ops.router_stats",
    "keras_moe.presets.loading",
    "keras_moe.presets.memory",
    "keras_moe.presets.parameter_count",
    "keras_moe.presets.preset_registry",
    "keras_moe.utils.command_line",
}


def public_modules():
    for module in pkgutil.walk_packages(keras_moe.__path__, "keras_moe."):
        yield module.name


@pytest.mark.parametrize("module_name", sorted(public_modules()))
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, module_name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed"
    if module_name in MODULES_WITH_EXAMPLES:
        assert results.attempted > 0
