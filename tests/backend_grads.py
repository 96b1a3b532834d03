"""Gradients of a layer's scalar objective, on whichever backend is active.

Keras has no backend-agnostic gradient API, so this is the one place the
tests reach for `tf.GradientTape`, `jax.grad` and torch autograd.
"""

import keras
import numpy as np


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
        grads = [np.asarray(g) for g in grads]
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
