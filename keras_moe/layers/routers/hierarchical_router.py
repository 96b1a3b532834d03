import keras
from keras import ops

from keras_moe.backend import stable_top_k
from keras_moe.layers.routers.token_choice_router import RouterOutput
from keras_moe.layers.routers.token_choice_router import TokenChoiceRouter
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalRouter(TokenChoiceRouter):
    """Two-level gating tree (Jordan & Jacobs 1994) over groups of experts.

    A top-level router scores `num_groups` groups (softmax of
    `x @ group_kernel`) and each token keeps its `top_groups` best groups; a
    router inside each group (softmax of `x @ expert_kernel[g]`) picks the
    `top_k` best experts of that group. A choice's weight is the product of
    its group's and its expert's weight, and experts are numbered
    `group * experts_per_group + expert`, so the output is a `RouterOutput`
    with `top_groups * top_k` choices over `num_groups * experts_per_group`
    experts: a token-choice router, routed (`route`) like `TopKRouter`.

    `router_probs` is the joint distribution `p(group) * p(expert | group)`
    (the load-balancing loss uses it); `router_logits` is the sum of the two
    levels' logits, which is what the z-loss keeps small.

    Args:
        num_groups: int, the number of groups `G`.
        experts_per_group: int, experts in each group.
        top_groups: int in `[1, num_groups]`, groups per token.
        top_k: int in `[1, experts_per_group]`, experts per chosen group.
        normalize_top_k: bool, renormalise the chosen weights at each level
            to sum to 1.
        kernel_initializer: initializer of both levels' kernels.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[..., d]` tokens.

    Returns:
        A `RouterOutput` with `top_groups * top_k` choices per token.

    Example:

    >>> import numpy as np
    >>> router = HierarchicalRouter(
    ...     num_groups=4, experts_per_group=8, top_groups=2, top_k=1,
    ...     dtype="float32")
    >>> routing = router(np.random.normal(size=(5, 16)).astype("float32"))
    >>> tuple(routing.expert_ids.shape), tuple(routing.router_probs.shape)
    ((5, 2), (5, 32))
    """

    def __init__(
        self,
        num_groups,
        experts_per_group,
        top_groups=1,
        top_k=1,
        normalize_top_k=False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        num_groups = check_int("num_groups", num_groups, min_value=1)
        experts_per_group = check_int(
            "experts_per_group", experts_per_group, min_value=1
        )
        super().__init__(num_groups * experts_per_group, **kwargs)
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.top_groups = check_int(
            "top_groups", top_groups, min_value=1, max_value=self.num_groups
        )
        self.top_k = check_int(
            "top_k", top_k, min_value=1, max_value=self.experts_per_group
        )
        self.normalize_top_k = check_bool("normalize_top_k", normalize_top_k)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    @property
    def choices_per_token(self):
        return self.top_groups * self.top_k

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.group_kernel = self.add_weight(
            name="group_kernel",
            shape=(hidden_dim, self.num_groups),
            initializer=self.kernel_initializer,
        )
        self.expert_kernel = self.add_weight(
            name="expert_kernel",
            shape=(self.num_groups, hidden_dim, self.experts_per_group),
            initializer=self.kernel_initializer,
        )

    def _top_k(self, probs, k):
        weights, ids = stable_top_k(probs, k)
        if self.normalize_top_k:
            weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        return weights, ids

    def call(self, inputs):
        group_logits = ops.matmul(inputs, self.group_kernel)  # [..., G]
        group_probs = ops.softmax(group_logits, axis=-1)
        group_weights, group_ids = self._top_k(group_probs, self.top_groups)
        # Every group's expert logits cost what one flat [d, E] router costs.
        expert_logits = ops.einsum("...d,gde->...ge", inputs, self.expert_kernel)
        expert_probs = ops.softmax(expert_logits, axis=-1)  # [..., G, E/G]
        chosen = ops.one_hot(group_ids, self.num_groups, dtype=expert_probs.dtype)
        chosen_probs = ops.einsum("...mg,...ge->...me", chosen, expert_probs)
        inner_weights, inner_ids = self._top_k(chosen_probs, self.top_k)

        leading_shape = tuple(ops.shape(inputs)[:-1])
        choice_shape = leading_shape + (self.choices_per_token,)
        expert_ids = ops.expand_dims(group_ids, -1) * self.experts_per_group
        expert_ids = ops.reshape(expert_ids + inner_ids, choice_shape)
        expert_weights = ops.reshape(
            ops.expand_dims(group_weights, -1) * inner_weights, choice_shape
        )
        expert_shape = leading_shape + (self.num_experts,)
        router_probs = ops.reshape(
            ops.expand_dims(group_probs, -1) * expert_probs, expert_shape
        )
        router_logits = ops.reshape(
            ops.expand_dims(group_logits, -1) + expert_logits, expert_shape
        )
        return RouterOutput(
            expert_ids=expert_ids,
            expert_weights=expert_weights,
            router_logits=router_logits,
            router_probs=router_probs,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_groups": self.num_groups,
                "experts_per_group": self.experts_per_group,
                "top_groups": self.top_groups,
                "top_k": self.top_k,
                "normalize_top_k": self.normalize_top_k,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
