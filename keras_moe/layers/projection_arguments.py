"""Resolving the arguments of feed-forward projections.

The activation by name, with an error that names the argument, and the
kernel initializer of stacked per-expert kernels.
"""

import keras

# Activations a feed-forward block is commonly built with; any other name
# that `keras.activations.get` knows, or a callable, works too.
_COMMON_ACTIVATIONS = ("silu", "gelu", "relu", "linear")


def get_activation(activation, name="activation"):
    """`keras.activations.get`, with an error that names the argument.

    Args:
        activation: the name of a Keras activation, a callable, or `None`
            (the identity).
        name: the argument named in the error.

    Returns:
        The activation function.

    Example:

    >>> get_activation("silu").__name__
    'silu'
    >>> try:
    ...     get_activation("swishy")
    ... except ValueError as error:
    ...     print(str(error)[:51])
    `activation` must be the name of a Keras activation
    """
    try:
        resolved = keras.activations.get(activation)
    except (ValueError, TypeError):
        resolved = None
    if resolved is None or (activation is not None and not callable(resolved)):
        raise ValueError(
            f"`{name}` must be the name of a Keras activation (for example "
            f"{', '.join(repr(a) for a in _COMMON_ACTIVATIONS)}) or a "
            f"callable. Received: {name}={activation!r}"
        )
    return resolved


def per_expert_initializer(initializer, num_experts):
    """Scale a fan-based initializer for stacked `[E, fan_in, fan_out]` kernels.

    Keras treats the leading axis of a 3-D kernel as a receptive field and so
    divides the variance by `E` as well; each expert must be initialised as
    the `[fan_in, fan_out]` matrix it is. Other initializers come back as
    they are.

    Args:
        initializer: a `keras.initializers.Initializer`.
        num_experts: int, the size `E` of the leading axis.

    Returns:
        The initializer to build the stacked kernel with.

    Example:

    >>> import keras
    >>> initializer = per_expert_initializer(
    ...     keras.initializers.GlorotUniform(), num_experts=8)
    >>> initializer.scale, initializer.mode
    (8.0, 'fan_avg')
    """
    if isinstance(initializer, keras.initializers.VarianceScaling):
        return keras.initializers.VarianceScaling(
            scale=initializer.scale * num_experts,
            mode=initializer.mode,
            distribution=initializer.distribution,
            seed=initializer.seed,
        )
    return initializer
