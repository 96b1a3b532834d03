from typing import NamedTuple

import keras

from keras_moe.ops.router_losses import router_z_loss
from keras_moe.utils.argument_validation import check_int


class RoutingDecision(NamedTuple):
    """What a router decided for `G` groups of `T` tokens.

    The one thing a MoE layer receives from its router: where the tokens go,
    how the expert outputs are mixed back, and what the balance losses and
    router statistics are computed from.

    Attributes:
        plan: where the tokens go. A `keras_moe.ops.dispatch.DispatchPlan`
            when tokens choose their experts (each (token, choice) gets a
            slot or is dropped), an `ExpertChoicePlan` when experts choose
            their tokens. Both hold the slots (`slot_tokens`,
            `slot_filled`, `[G, E, C]`) that `dispatch` fills, and
            `expert_counts` `[G, E]`.
        combine_weights: the weights that mix the expert outputs back into
            the tokens, shaped like what chose: `[G, T, k]` per (token,
            choice), or `[G, E, C]` per expert slot.
        router_logits: float `[G, T, E]`, in the router's dtype.
        router_probs: float `[G, T, E]`, each token's distribution over the
            experts (what the balance losses and statistics use).
    """

    plan: object
    combine_weights: object
    router_logits: object
    router_probs: object


class Router(keras.layers.Layer):
    """Base class of the routers: tokens in, one `RoutingDecision` out.

    A router maps the tokens of a MoE layer, `[G, T, d]` in `G` routing
    groups, to a `RoutingDecision`: the dispatch plan, the combine weights,
    the router logits and probabilities. It owns the routing weights (its
    kernels, and any balancing bias) and never touches the expert weights:
    the layer dispatches the tokens with the plan, runs its expert bank, and
    hands the outputs back to the router's `combine`. Everything that
    depends on how the routing was done (which losses apply, which
    statistics describe it, how the bias moves) is asked of the router, so
    the layer has one path whatever the routing.

    Subclasses implement `route`, `combine`, `statistics` and
    `choices_per_token`; they override `load_balancing_loss`,
    `sequence_load_balancing_loss`, `balancing_bias` and `update_bias` when
    those apply to them. `TokenChoiceRouter` implements the first four for
    routers whose tokens pick experts (`TopKRouter`, `HierarchicalRouter`);
    `ExpertChoiceRouter` lets each expert pick its tokens. Routers compute
    in float32 (float64 under a float64 policy); the MoE layers build theirs
    that way.

    A router that a `SparseMoE` builds from its own arguments names them in
    `moe_arguments` (passed by name, besides `num_experts` and the layer's
    `router_initializer` as `kernel_initializer`) and refuses layer settings
    it cannot work with in `check_moe_arguments` (expert choice, for
    instance, refuses a causal decoder and dropless capacity).

    Args:
        num_experts: int, the number of experts `E`.
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    A router sending every token to expert 0 with weight 1, built on the
    token-choice base.

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_moe.layers import RouterOutput
    >>> from keras_moe.layers import TokenChoiceRouter
    >>> class FirstExpertRouter(TokenChoiceRouter):
    ...     choices_per_token = 1
    ...     def call(self, inputs):
    ...         logits = ops.zeros(ops.shape(inputs)[:-1] + (self.num_experts,))
    ...         probs = ops.softmax(logits)
    ...         ids = ops.zeros(ops.shape(inputs)[:-1] + (1,), "int32")
    ...         return RouterOutput(ids, ops.ones(ops.shape(ids)), logits, probs)
    >>> router = FirstExpertRouter(num_experts=4)
    >>> tokens = np.ones((1, 3, 8), "float32")  # one group of three tokens
    >>> decision = router.route(tokens, capacity=2)
    >>> ops.convert_to_numpy(decision.plan.expert_counts).tolist()
    [[3, 0, 0, 0]]
    >>> ops.convert_to_numpy(decision.plan.kept)[0, :, 0].tolist()
    [True, True, False]
    """

    moe_arguments = ()

    def __init__(self, num_experts, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, min_value=1)

    @classmethod
    def check_moe_arguments(cls, arguments):
        """Refuse the settings of a MoE layer this router cannot work with.

        Args:
            arguments: dict of the layer's router arguments (`top_k`,
                `score_function`, ...) and of `causal`, `capacity_factor`
                and `eval_capacity_factor`.

        Raises:
            ValueError: naming the setting and why it does not apply.
        """

    @property
    def choices_per_token(self):
        """Expert slots a token takes on average: `k` in the capacity.

        Capacity per expert is `ceil(capacity_factor * T * k / E)`.
        """
        raise NotImplementedError(
            f"`{type(self).__name__}` must define `choices_per_token`."
        )

    # Whether `route` can lay the routed rows out for the grouped matmul
    # (`tile_size`, see `keras_moe.ops.grouped_matmul`).
    supports_grouped_layout = False

    def route(
        self, tokens, token_mask=None, capacity=None, training=None, tile_size=None
    ):
        """Decide where the tokens of each group go.

        Args:
            tokens: `[G, T, d]`, padding already zeroed.
            token_mask: optional bool `[G, T]`, False for padding: padding
                is routed nowhere and takes no capacity.
            capacity: int or scalar int tensor, slots per expert, or None
                for dropless routing (where the router supports it).
            training: bool, turns on training-only noise.
            tile_size: optional int, for routers with
                `supports_grouped_layout`: put the plan in the grouped
                layout with tiles of this many rows (others ignore it).

        Returns:
            A `RoutingDecision`.
        """
        raise NotImplementedError(f"`{type(self).__name__}` must define `route`.")

    def combine(self, expert_outputs, decision):
        """Mix the expert outputs back into the tokens.

        Args:
            expert_outputs: `[G, E, C, d]`, the experts' outputs on the
                buffers `dispatch` filled from `decision.plan`.
            decision: the `RoutingDecision` of `route`.

        Returns:
            `[G, T, d]`, in the dtype of `expert_outputs`.
        """
        raise NotImplementedError(
            f"`{type(self).__name__}` must define `combine`."
        )

    def statistics(self, decision, token_mask=None):
        """This step's router statistics, as `keras_moe.ops.router_stats`.

        Args:
            decision: the `RoutingDecision` of `route`.
            token_mask: optional bool `[G, T]`, False for padding.

        Returns:
            A dict of float32 tensors (`ROUTED_SCALARS`, `ROUTED_VECTORS`).
        """
        raise NotImplementedError(
            f"`{type(self).__name__}` must define `statistics`."
        )

    def load_balancing_loss(self, decision, token_mask=None):
        """The unweighted Switch load-balancing loss, or None.

        None (the default) for routings that are balanced by construction.
        """
        return None

    def sequence_load_balancing_loss(self, decision, sequence_length, token_mask=None):
        """The unweighted per-sequence balance loss, or None.

        Args:
            decision: the `RoutingDecision` of `route`.
            sequence_length: int, tokens per sequence (-1: one sequence).
            token_mask: optional bool `[G, T]`, False for padding.
        """
        return None

    def z_loss(self, decision, token_mask=None):
        """The unweighted router z-loss `mean(logsumexp(logits) ** 2)`."""
        return router_z_loss(decision.router_logits, token_mask)

    @property
    def balancing_bias(self):
        """The non-trainable `[E]` balancing bias, or None without one."""
        return None

    def update_bias(self, expert_counts):
        """One step of bias balancing; routers without a bias do nothing.

        Args:
            expert_counts: int `[..., E]`, this step's `plan.expert_counts`.
        """
        return None
