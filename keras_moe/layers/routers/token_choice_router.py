from typing import NamedTuple

import keras
from keras import ops

from keras_moe.layers.routers.router import Router
from keras_moe.layers.routers.router import RoutingDecision
from keras_moe.ops.dispatch import combine
from keras_moe.ops.dispatch import compute_dispatch_plan
from keras_moe.ops.router_losses import load_balancing_loss
from keras_moe.ops.router_losses import sequence_load_balancing_loss
from keras_moe.ops.router_stats import token_choice_stats


class RouterOutput(NamedTuple):
    """What a router decided for a batch of tokens.

    Attributes:
        expert_ids: int32 `[..., k]`, the chosen experts, best first.
        expert_weights: float `[..., k]`, the combine weight of each choice.
        router_logits: float `[..., E]`, in the router's dtype.
        router_probs: float `[..., E]`, each token's distribution over
            experts: the softmax of the logits, or the sigmoid scores
            normalised to sum to 1. The balance losses use it.
    """

    expert_ids: object
    expert_weights: object
    router_logits: object
    router_probs: object


def router_output_spec(inputs, num_choices, num_experts, dtype):
    """The `RouterOutput` of symbolic shapes for `inputs` `[..., d]`."""
    leading = tuple(inputs.shape[:-1])
    choice_shape = leading + (num_choices,)
    expert_shape = leading + (num_experts,)
    return RouterOutput(
        expert_ids=keras.KerasTensor(choice_shape, "int32"),
        expert_weights=keras.KerasTensor(choice_shape, dtype),
        router_logits=keras.KerasTensor(expert_shape, dtype),
        router_probs=keras.KerasTensor(expert_shape, dtype),
    )


class TokenChoiceRouter(Router):
    """Base class of the routers whose tokens choose their experts.

    A subclass's `call(inputs)` maps tokens `[..., d]` to a `RouterOutput`:
    `choices_per_token` experts per token and their combine weights. This
    base turns that into a `RoutingDecision`: a `DispatchPlan` in which
    every (token, choice) gets a slot of its expert or is dropped when the
    expert is full (first choices win capacity before second choices), and
    combines the kept choices' outputs with their weights. Token choice
    routing is balanced by losses: the Switch load-balancing loss and the
    per-sequence one apply, and the statistics are `token_choice_stats`.

    Args:
        num_experts: int, the number of experts `E`.
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_moe.layers import TopKRouter
    >>> router = TopKRouter(num_experts=4, top_k=2, dtype="float32")
    >>> tokens = np.random.normal(size=(1, 6, 8)).astype("float32")
    >>> decision = router.route(tokens, capacity=None)  # dropless
    >>> int(ops.convert_to_numpy(decision.plan.num_kept))
    12
    >>> tuple(decision.combine_weights.shape)
    (1, 6, 2)
    """

    supports_grouped_layout = True

    def route(
        self, tokens, token_mask=None, capacity=None, training=None, tile_size=None
    ):
        routing = self(tokens, training=training)
        plan = compute_dispatch_plan(
            routing.expert_ids,
            self.num_experts,
            capacity,
            token_mask,
            tile_size=tile_size,
        )
        return RoutingDecision(
            plan=plan,
            combine_weights=routing.expert_weights,
            router_logits=routing.router_logits,
            router_probs=routing.router_probs,
        )

    def combine(self, expert_outputs, decision):
        return combine(expert_outputs, decision.plan, decision.combine_weights)

    def statistics(self, decision, token_mask=None):
        return token_choice_stats(
            decision.router_probs,
            decision.router_logits,
            decision.plan.expert_counts,
            decision.plan.num_kept,
            token_mask,
        )

    def load_balancing_loss(self, decision, token_mask=None):
        return load_balancing_loss(
            decision.router_probs, decision.plan.expert_counts, token_mask
        )

    def sequence_load_balancing_loss(self, decision, sequence_length, token_mask=None):
        # -1: every token of the call is one sequence.
        leading = (1, -1) if sequence_length == -1 else (-1, sequence_length)

        def by_sequence(values):
            trailing = tuple(values.shape[2:])
            return ops.reshape(values, leading + trailing)

        return sequence_load_balancing_loss(
            by_sequence(decision.router_probs),
            by_sequence(decision.plan.expert_ids),
            None if token_mask is None else by_sequence(token_mask),
        )

    def compute_output_spec(self, inputs, training=None):
        return router_output_spec(
            inputs, self.choices_per_token, self.num_experts, self.compute_dtype
        )
