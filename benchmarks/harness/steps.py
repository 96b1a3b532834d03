"""Ready-to-time steps, compiled the way each backend runs best.

TensorFlow under `tf.function(jit_compile=True)`, JAX under `jax.jit` of
`stateless_call`, PyTorch in eager autograd (or `torch.compile`). Every
step waits for its results, so wall time measures the work.
"""

import dataclasses


def training_loss(outputs, losses, targets=None):
    """`mean(outputs ** 2)` (or the MSE to `targets`) plus the added losses."""
    from keras import ops

    if isinstance(outputs, (tuple, list)):  # keras-hub: (out, router_logits)
        outputs = outputs[0]
    if targets is not None:
        outputs = outputs - targets
    loss = ops.mean(ops.square(outputs))
    for added_loss in losses:
        loss = loss + added_loss
    return loss


@dataclasses.dataclass
class Step:
    """A ready-to-time step: `run()` returns once its results exist.

    Attributes:
        run: the step.
        xla_memory: JAX only: the sizes XLA's buffer assignment gives the
            compiled step (`argument_bytes`, `output_bytes`, `temp_bytes`).
        compiled: JAX only: the compiled executable.
    """

    run: object
    xla_memory: dict = None
    compiled: object = None


def gradient_step(backend, layer, inputs, torch_compile=False):
    """Forward and backward of `layer`, without an optimizer.

    The loss is `training_loss` (`mean(outputs ** 2)` plus the losses the
    layer adds, called with `training=True`); the step computes it and its
    gradients with respect to the input and every trainable weight.

    Args:
        backend: the running Keras backend.
        layer: a built layer.
        inputs: a NumPy array.
        torch_compile: on PyTorch, `torch.compile` the forward pass (its
            backward is compiled along with it).

    Returns:
        a `Step`.
    """
    if backend == "jax":
        return _jax_gradient_step(layer, inputs)
    if backend == "tensorflow":
        return _tensorflow_gradient_step(layer, inputs)
    return _torch_gradient_step(layer, inputs, torch_compile)


def _jax_gradient_step(layer, inputs):
    import jax
    import jax.numpy as jnp

    trainable = [variable.value for variable in layer.trainable_variables]
    non_trainable = [
        variable.value for variable in layer.non_trainable_variables
    ]

    def loss_fn(trainable, x):
        outputs, _, losses = layer.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        return training_loss(outputs, losses)

    x = jnp.asarray(inputs)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    compiled = grad_fn.lower(trainable, x).compile()
    analysis = compiled.memory_analysis()
    xla_memory = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
    }

    def run():
        jax.block_until_ready(compiled(trainable, x))

    return Step(run, xla_memory, compiled)


def _tensorflow_gradient_step(layer, inputs):
    import tensorflow as tf

    x = tf.constant(inputs)
    variables = list(layer.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = training_loss(layer(x, training=True), layer.losses)
        return loss, tape.gradient(loss, [x] + variables)

    def run():
        loss, _ = step(x)
        loss.numpy()  # the XLA cluster computes loss and gradients together

    return Step(run)


def _torch_gradient_step(layer, inputs, torch_compile):
    import torch

    x = torch.tensor(inputs, requires_grad=True)
    weights = [variable.value for variable in layer.trainable_variables]

    def forward_loss(x):
        return training_loss(layer(x, training=True), layer.losses)

    if torch_compile:  # AOTAutograd compiles the backward along with it
        forward_loss = torch.compile(forward_loss)

    def run():
        torch.autograd.grad(forward_loss(x), [x] + weights)

    return Step(run)


def sgd_step(backend, model, inputs, targets, learning_rate=1e-4):
    """A whole training step: forward, losses, gradients, an SGD update.

    What `fit` compiles, without its Python around each step. The loss is
    the MSE to `targets` plus the model's losses; the non-trainable state
    (e.g. router statistics) comes out of the step, as in `fit`.

    Args:
        backend: the running Keras backend.
        model: a built model.
        inputs, targets: NumPy arrays of one batch.
        learning_rate: the SGD step size.

    Returns:
        a function that runs one step and waits for its result.
    """
    if backend == "jax":
        return _jax_sgd_step(model, inputs, targets, learning_rate)
    if backend == "tensorflow":
        return _tensorflow_sgd_step(model, inputs, targets, learning_rate)
    return _torch_sgd_step(model, inputs, targets, learning_rate)


def _jax_sgd_step(model, inputs, targets, learning_rate):
    import jax
    import jax.numpy as jnp

    def loss_fn(trainable, non_trainable, x, y):
        outputs, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        return training_loss(outputs, losses, y), non_trainable

    @jax.jit
    def step(trainable, non_trainable, x, y):
        (loss, non_trainable), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(trainable, non_trainable, x, y)
        trainable = [v - learning_rate * g for v, g in zip(trainable, grads)]
        return trainable, non_trainable, loss

    state = [
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
    ]
    x, y = jnp.asarray(inputs), jnp.asarray(targets)

    def run():
        state[0], state[1], loss = step(state[0], state[1], x, y)
        loss.block_until_ready()

    return run


def _tensorflow_sgd_step(model, inputs, targets, learning_rate):
    import tensorflow as tf

    x, y = tf.constant(inputs), tf.constant(targets)

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = training_loss(model(x, training=True), model.losses, y)
        variables = model.trainable_variables
        grads = tape.gradient(loss, [v.value for v in variables])
        for variable, grad in zip(variables, grads):
            variable.assign_sub(learning_rate * grad)
        return loss

    return lambda: step().numpy()


def _torch_sgd_step(model, inputs, targets, learning_rate):
    import torch

    x, y = torch.as_tensor(inputs), torch.as_tensor(targets)
    parameters = [v.value for v in model.trainable_variables]

    def run():
        loss = training_loss(model(x, training=True), model.losses, y)
        loss.backward()
        with torch.no_grad():
            for parameter in parameters:
                parameter -= learning_rate * parameter.grad
                parameter.grad = None
        return float(loss)

    return run


def block(result):
    """Wait until `result` (any nest of backend tensors) is computed."""
    import keras

    leaves = [leaf for leaf in keras.tree.flatten(result) if leaf is not None]
    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(leaves)
    elif keras.backend.backend() == "tensorflow":
        for leaf in leaves:
            leaf.numpy()
    # PyTorch on CPU returns computed tensors.


def function_steps(backend, function, num_differentiable, function_args):
    """Compiled forward and forward+backward of a function, as callables.

    `function(*function_args)` returns `(outputs, aux)`; the backward pass
    takes the gradient of `outputs` (ones as output gradient) with respect
    to the first `num_differentiable` arguments (tensors or lists of
    tensors). PyTorch runs eagerly.

    Returns:
        `(forward, forward_backward)`, each a function that runs once and
        waits for its results.
    """
    import keras

    differentiable = function_args[:num_differentiable]
    rest = function_args[num_differentiable:]

    def ones_like(nest):
        return keras.tree.map_structure(keras.ops.ones_like, nest)

    if backend == "jax":
        import jax

        def forward_backward(*differentiable):
            outputs, pullback, _ = jax.vjp(
                lambda *d: function(*d, *rest), *differentiable, has_aux=True
            )
            return outputs, pullback(ones_like(outputs))

        forward = jax.jit(lambda *d: function(*d, *rest)[0])
        forward_backward = jax.jit(forward_backward)
    elif backend == "tensorflow":
        import tensorflow as tf

        def forward_backward(*differentiable):
            with tf.GradientTape() as tape:
                tape.watch(differentiable)
                outputs = function(*differentiable, *rest)[0]
            return outputs, tape.gradient(
                outputs, differentiable, output_gradients=ones_like(outputs)
            )

        forward = tf.function(
            lambda *d: function(*d, *rest)[0], jit_compile=True
        )
        forward_backward = tf.function(forward_backward, jit_compile=True)
    else:
        import torch

        differentiable = keras.tree.map_structure(
            lambda t: t.detach().requires_grad_(), differentiable
        )

        def forward_backward(*differentiable):
            outputs = keras.tree.flatten(function(*differentiable, *rest)[0])
            return torch.autograd.grad(
                outputs, keras.tree.flatten(differentiable),
                grad_outputs=ones_like(outputs),
            )

        def forward(*differentiable):
            with torch.no_grad():
                return function(*differentiable, *rest)[0]

    return (
        lambda: block(forward(*differentiable)),
        lambda: block(forward_backward(*differentiable)),
    )
