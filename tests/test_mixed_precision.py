"""Mixed precision: a model with a DeepSeek-style MoE layer trains without
NaN under bfloat16 and float16 (loss scaling); routers keep float32 weights
and math while the experts follow the policy."""

import keras
import numpy as np
import pytest
from keras import ops

from testing import to_numpy
from testing import token_batch
from testing import token_moe_model


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_without_nan(policy):
    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = token_moe_model()
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # TensorFlow spends seconds tracing and compiling a step that runs
        # twice here; eager JAX would compile every primitive separately.
        run_eagerly=keras.backend.backend() == "tensorflow",
    )
    # Keras wraps the optimizer for float16: the loss is scaled up before
    # the gradients are taken, and steps with non-finite gradients skipped.
    scaled = policy == "mixed_float16"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == scaled
    token_ids = token_batch(batch=4, seed=1)["token_ids"]
    history = model.fit(
        token_ids, np.roll(token_ids, -1, axis=1), batch_size=2, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    if scaled:
        # The scale stayed a finite power of two, and the inner optimizer
        # applied both steps (none was skipped for overflow).
        scale = float(to_numpy(model.optimizer.dynamic_scale))
        assert np.isfinite(scale) and scale >= 1.0
        assert int(to_numpy(model.optimizer.inner_optimizer.iterations)) == 2
    for weight in model.weights:
        assert np.isfinite(to_numpy(weight)).all(), weight.path
    compute_dtype = keras.dtype_policies.get(policy).compute_dtype
    moe = model.get_layer("moe")
    # The router keeps float32 weights and math; the experts run in the
    # policy's compute dtype on float32 variables.
    assert moe.router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(moe.router.kernel.dtype) == "float32"
    assert moe.experts.compute_dtype == compute_dtype
    assert moe.shared_experts.compute_dtype == compute_dtype
    assert keras.backend.standardize_dtype(moe.experts.up_kernel.dtype) == "float32"
    hidden = ops.cast(np.ones((1, 3, 16), "float32"), compute_dtype)
    routing = moe.router(hidden)
    assert keras.backend.standardize_dtype(routing.router_logits.dtype) == "float32"
    assert keras.backend.standardize_dtype(moe(hidden).dtype) == compute_dtype
