from typing import NamedTuple

import keras
from keras import ops

from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int


class RouterOutput(NamedTuple):
    """What a router decided for a batch of tokens.

    Attributes:
        expert_ids: int32 `[..., k]`, the chosen experts, best first.
        expert_weights: float `[..., k]`, the combine weight of each choice.
        router_logits: float `[..., E]`, in the router's dtype.
        router_probs: float `[..., E]`, softmax of the logits.
    """

    expert_ids: object
    expert_weights: object
    router_logits: object
    router_probs: object


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(keras.layers.Layer):
    """Token-choice router: each token picks its `top_k` best experts.

    Logits are `x @ kernel` with a `[d, E]` kernel, scores are their softmax
    and each token takes the `top_k` highest-scoring experts, weighted by
    their scores (renormalised to sum to 1 over the `k` choices when
    `normalize_top_k=True`, as in Mixtral). Router math is sensitive to
    rounding, so it runs in float32 (float64 under a float64 policy) whatever
    the enclosing dtype policy; the MoE layers build their router that way.

    Args:
        num_experts: int, the number of experts `E`.
        top_k: int in `[1, num_experts]`, experts per token.
        normalize_top_k: bool, renormalise the `k` weights to sum to 1. With
            `top_k=1` this makes every weight 1, so the router then learns
            only through auxiliary losses; Switch keeps it False.
        kernel_initializer: initializer of the `[d, E]` kernel.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[..., d]` tokens.

    Returns:
        A `RouterOutput` of tensors with the leading dimensions of `inputs`.

    Example:

    >>> import numpy as np
    >>> router = TopKRouter(num_experts=8, top_k=2, dtype="float32")
    >>> routing = router(np.random.normal(size=(5, 16)).astype("float32"))
    >>> tuple(routing.expert_ids.shape), tuple(routing.expert_weights.shape)
    ((5, 2), (5, 2))
    """

    def __init__(
        self,
        num_experts,
        top_k=2,
        normalize_top_k=True,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, min_value=1)
        self.top_k = check_int(
            "top_k", top_k, min_value=1, max_value=self.num_experts
        )
        self.normalize_top_k = check_bool("normalize_top_k", normalize_top_k)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.num_experts),
            initializer=self.kernel_initializer,
        )

    def call(self, inputs):
        router_logits = ops.matmul(inputs, self.kernel)
        router_probs = ops.softmax(router_logits, axis=-1)
        expert_weights, expert_ids = ops.top_k(router_probs, self.top_k)
        if self.normalize_top_k:
            expert_weights = expert_weights / ops.sum(
                expert_weights, axis=-1, keepdims=True
            )
        return RouterOutput(
            expert_ids=ops.cast(expert_ids, "int32"),
            expert_weights=expert_weights,
            router_logits=router_logits,
            router_probs=router_probs,
        )

    def compute_output_spec(self, inputs):
        leading = tuple(inputs.shape[:-1])
        choice_shape = leading + (self.top_k,)
        expert_shape = leading + (self.num_experts,)
        dtype = self.compute_dtype
        return RouterOutput(
            expert_ids=keras.KerasTensor(choice_shape, "int32"),
            expert_weights=keras.KerasTensor(choice_shape, dtype),
            router_logits=keras.KerasTensor(expert_shape, dtype),
            router_probs=keras.KerasTensor(expert_shape, dtype),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "normalize_top_k": self.normalize_top_k,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
