"""keras_moe's decoder equals keras-hub's Mixtral given the same weights.

The weights of a keras-hub `MixtralCausalLM` are copied into a
`MoECausalLM` by variable path (the mapping the model benchmark uses); with
dropless routing both models must give the same logits for real tokens.
"""

import pathlib
import sys

import numpy as np
from keras import ops

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

import mixtral_model_benchmark  # noqa: E402


def test_logits_match_keras_hub_mixtral_with_the_same_weights():
    sizes = mixtral_model_benchmark.shapes(quick=True)
    reference, ours = mixtral_model_benchmark.build_models(
        num_experts=4, sizes=sizes, capacity_factors=(None,)
    )
    inputs, _ = mixtral_model_benchmark.make_batch(sizes, np.random.default_rng(0))
    expected = ops.convert_to_numpy(reference(inputs, training=False))
    logits = ops.convert_to_numpy(ours[None](inputs, training=False))
    real = inputs["padding_mask"]
    assert np.abs(expected).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(logits[real], expected[real], rtol=1e-4, atol=1e-4)
