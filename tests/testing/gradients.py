"""Gradients of a layer on whichever backend is active, and the check of
those gradients against central finite differences of a float64 reference.

Keras has no backend-agnostic gradient API, so this is the one place the
tests reach for `tf.GradientTape`, `jax.grad` and torch autograd.
"""

import keras
import numpy as np
from keras import ops


def value_and_grads(layer, inputs, objective, **call_kwargs):
    """Evaluate `objective(outputs, losses)` and its gradients.

    Args:
        layer: a built Keras layer.
        inputs: numpy array, the layer input.
        objective: `(outputs, list_of_layer_losses) -> scalar tensor`.
        **call_kwargs: passed to the layer call (e.g. `training=True`).

    Returns:
        `(value, input_grad, {variable.path: grad})`, all numpy.
    """
    backend = keras.backend.backend()
    variables = layer.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(inputs)
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, **call_kwargs)
            value = objective(outputs, layer.losses)
        grads = tape.gradient(value, [x] + [v.value for v in variables])
        # A gather (a bias picked per row) has sparse `IndexedSlices` gradients.
        grads = [np.asarray(tf.convert_to_tensor(g)) for g in grads]
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def stateless_objective(trainable, x):
            outputs, _, losses = layer.stateless_call(
                trainable, non_trainable, x, return_losses=True, **call_kwargs
            )
            return objective(outputs, losses)

        value, (weight_grads, input_grad) = jax.value_and_grad(
            stateless_objective, argnums=(0, 1)
        )([v.value for v in variables], inputs)
        grads = [np.asarray(input_grad)] + [np.asarray(g) for g in weight_grads]
    elif backend == "torch":
        import torch

        x = torch.tensor(inputs, requires_grad=True)
        for v in variables:
            v.value.grad = None
        outputs = layer(x, **call_kwargs)
        value = objective(outputs, layer.losses)
        value.backward()
        grads = [x.grad.numpy()] + [
            np.zeros(v.shape) if v.value.grad is None else v.value.grad.numpy()
            for v in variables
        ]
        value = value.detach()
    else:
        raise ValueError(f"Unsupported backend: {backend}")
    input_grad, weight_grads = grads[0], grads[1:]
    return (
        float(np.asarray(value)),
        input_grad,
        {v.path: g for v, g in zip(variables, weight_grads)},
    )


def numerical_gradient(objective, array, epsilon=1e-6):
    """Central finite differences of a scalar `objective()` w.r.t. `array`.

    `array` is perturbed in place (and restored), so `objective` reads it.
    """
    gradient = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), gradient.reshape(-1)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + epsilon
        plus = objective()
        flat[i] = original - epsilon
        minus = objective()
        flat[i] = original
        flat_grad[i] = (plus - minus) / (2 * epsilon)
    return gradient


def check_gradients(
    layer,
    inputs,
    reference_weights,
    reference_objective,
    rng,
    *,
    min_gradient=1e-4,
    rtol=2e-3,
    atol=2e-4,
    **call_kwargs,
):
    """Check the layer's gradients against finite differences of a reference.

    The objective is `sum(outputs * c) + sum(layer.losses)` for a random
    cotangent `c`: the layer's gradients (input and every trainable weight)
    must match central finite differences of the same objective computed by
    a float64 NumPy reference.

    Args:
        layer: a built layer holding the weights the reference reads.
        inputs: float32 numpy input.
        reference_weights: `{variable.path: float64 array}` for every
            trainable weight of `layer`, the arrays `reference_objective`
            reads (perturbed in place).
        reference_objective: `inputs64 -> (outputs, loss_total)`, outputs of
            any shape holding `inputs.size // hidden_dim` tokens.
        rng: numpy Generator drawing the cotangent.
        min_gradient: each expected weight gradient must exceed this
            somewhere, so that a check never passes on trivial zeros.
        rtol, atol: tolerances of the comparison.
        **call_kwargs: passed to the layer call (`training`, `mask`).

    Returns:
        The layer's input gradient, numpy.
    """
    cotangent = rng.normal(size=inputs.shape)

    def objective(outputs, losses):
        total = ops.sum(outputs * ops.convert_to_tensor(cotangent, outputs.dtype))
        for loss in losses:
            total = total + loss
        return total

    _, input_grad, weight_grads = value_and_grads(layer, inputs, objective, **call_kwargs)
    inputs64 = inputs.astype("float64")

    def scalar():
        outputs, loss = reference_objective(inputs64)
        return np.sum(np.reshape(outputs, cotangent.shape) * cotangent) + loss

    np.testing.assert_allclose(
        input_grad, numerical_gradient(scalar, inputs64), rtol=rtol, atol=atol
    )
    assert sorted(weight_grads) == sorted(reference_weights)
    for path, array in reference_weights.items():
        expected = numerical_gradient(scalar, array)
        np.testing.assert_allclose(
            weight_grads[path], expected, rtol=rtol, atol=atol, err_msg=path
        )
        assert np.abs(expected).max() > min_gradient, f"{path} gradient is trivially zero"
    return input_grad


def _square_objective(outputs, losses, mask=None):
    if mask is not None:  # only the real tokens' outputs count
        outputs = ops.where(ops.expand_dims(mask, -1), outputs, 0.0)
    total = ops.sum(ops.cast(outputs, "float32") ** 2)
    for loss in losses:
        total = total + ops.cast(loss, "float32")
    return total


def training_outputs_and_grads(layer, x, mask=None):
    """`(value, outputs, losses, input_grad, {path: grad})` of a training call
    of `sum(outputs**2) + sum(losses)`, real tokens only under `mask`; all
    numpy.

    `value_and_grads`, except on JAX, where the forward and backward pass
    are compiled as one program, once per layer and input shape: eager JAX
    compiles each primitive separately for every new shape, seconds per
    layer.
    """
    if keras.backend.backend() != "jax":
        value, input_grad, weight_grads = value_and_grads(
            layer, x, lambda out, losses: _square_objective(out, losses, mask),
            mask=mask, training=True,
        )
        outputs = ops.convert_to_numpy(layer(x, mask=mask, training=True))
        losses = [ops.convert_to_numpy(loss) for loss in layer.losses]
        return value, outputs, losses, input_grad, weight_grads
    import jax

    compiled = getattr(layer, "_compiled_objective", None)
    if compiled is None:

        def stateless_objective(trainable, non_trainable, inputs, mask):
            outputs, _, losses = layer.stateless_call(
                trainable, non_trainable, inputs, mask=mask, return_losses=True,
                training=True,
            )
            return _square_objective(outputs, losses, mask), (outputs, losses)

        compiled = jax.jit(
            jax.value_and_grad(stateless_objective, argnums=(0, 2), has_aux=True)
        )
        layer._compiled_objective = compiled
    variables = layer.trainable_variables
    (value, (outputs, losses)), (weight_grads, input_grad) = compiled(
        [v.value for v in variables],
        [v.value for v in layer.non_trainable_variables],
        x,
        mask,
    )
    return (
        float(value),
        np.asarray(outputs),
        [np.asarray(loss) for loss in losses],
        np.asarray(input_grad),
        {v.path: np.asarray(g) for v, g in zip(variables, weight_grads)},
    )


def assert_finite_outputs_and_gradients(layer, x, mask=None):
    """Finite outputs, losses and gradients of a training call; returns the
    outputs."""
    value, outputs, losses, input_grad, weight_grads = training_outputs_and_grads(
        layer, x, mask=mask
    )
    assert np.isfinite(value)
    assert np.isfinite(input_grad).all()
    for path, grad in weight_grads.items():
        assert np.isfinite(grad).all(), path
    assert np.isfinite(outputs).all()
    assert all(np.isfinite(loss).all() for loss in losses)
    return outputs
