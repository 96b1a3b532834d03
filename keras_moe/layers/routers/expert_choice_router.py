import keras
from keras import ops

from keras_moe.layers.routers.linear_scoring import LinearScoring
from keras_moe.layers.routers.linear_scoring import router_scores_spec
from keras_moe.layers.routers.router import Router
from keras_moe.layers.routers.router import RoutingDecision
from keras_moe.ops.dispatch import combine_slots
from keras_moe.ops.dispatch import compute_expert_choice_plan
from keras_moe.ops.router_stats import expert_choice_stats
from keras_moe.utils.argument_validation import check_bool


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceRouter(LinearScoring, Router):
    """Expert-choice router (Zhou et al. 2022): each expert picks its tokens.

    Experts are scored as in `TopKRouter` (`x @ kernel`, softmax or sigmoid,
    optional jitter and noisy gating), but instead of each token taking its
    best experts, each expert fills its `capacity` slots with the tokens
    that score it highest. Loads are balanced by construction (so no
    load-balancing loss applies, only the z-loss), a token may get several
    experts or none, and a token's output is the sum over the slots that
    took it of score times expert output.

    An expert's choice looks at every token of its group, later ones
    included, so this router cannot sit in a causal decoder, and routing
    needs a capacity, `C = ceil(capacity_factor * T / E)`: one slot per
    token on average (`choices_per_token` is 1). `check_moe_arguments`
    refuses the MoE layer settings that break either.

    Args:
        num_experts: int, the number of experts `E`.
        score_function: `"softmax"` or `"sigmoid"`.
        router_bias: bool, a trainable bias `[E]` on the router logits.
        jitter: float in `[0, 1)`, the multiplicative input noise amplitude
            in training.
        noisy_gating: bool, add learned Gaussian noise to the logits in
            training.
        kernel_initializer: initializer of the `[d, E]` kernel.
        seed: optional int, seeds the jitter and gating noise.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[..., d]` tokens.
        training: bool, turns on jitter and gating noise.

    Returns:
        A `RouterScores` (logits, scores, probabilities) of the leading
        dimensions of `inputs`; `route` makes the choices.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> router = ExpertChoiceRouter(num_experts=4, dtype="float32")
    >>> tokens = np.random.normal(size=(1, 8, 16)).astype("float32")
    >>> decision = router.route(tokens, capacity=3)
    >>> tuple(decision.plan.slot_tokens.shape)  # [groups, experts, slots]
    (1, 4, 3)
    >>> ops.convert_to_numpy(decision.plan.expert_counts).tolist()
    [[3, 3, 3, 3]]
    """

    moe_arguments = ("score_function", "router_bias", "jitter", "noisy_gating", "seed")

    def __init__(
        self,
        num_experts,
        *,
        score_function="softmax",
        router_bias=False,
        jitter=0.0,
        noisy_gating=False,
        kernel_initializer="glorot_uniform",
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, **kwargs)
        self.router_bias = check_bool("router_bias", router_bias)
        self._init_scoring(
            score_function, jitter, noisy_gating, kernel_initializer, seed
        )

    @classmethod
    def check_moe_arguments(cls, arguments):
        if arguments["causal"]:
            raise ValueError(
                "`routing='expert_choice'` cannot be used in a causal decoder: "
                "each expert picks its tokens among the whole sequence, future "
                "tokens included. Use `routing='token_choice'`. Received: "
                "causal=True"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            if arguments[name] is None:
                raise ValueError(
                    f"`routing='expert_choice'` needs `{name}` to be a "
                    "positive number: it sets how many tokens each expert "
                    f"takes. Received: {name}=None"
                )
        expert_groups = arguments["expert_groups"]
        bias_update_rate = arguments["bias_update_rate"]
        if expert_groups != 1 or bias_update_rate:
            raise ValueError(
                "`routing='expert_choice'` is balanced by construction and "
                "does not use `expert_groups` or `bias_update_rate`. "
                f"Received: expert_groups={expert_groups!r}, "
                f"bias_update_rate={bias_update_rate!r}"
            )

    @property
    def choices_per_token(self):
        return 1

    def build(self, input_shape):
        self._build_scoring(input_shape[-1])

    def call(self, inputs, training=None):
        return self.score(inputs, training=training)

    def route(
        self, tokens, token_mask=None, capacity=None, training=None, tile_size=None
    ):
        # Each expert takes exactly `capacity` tokens: buffers are never
        # padded, so the grouped layout (`tile_size`) has nothing to save.
        if capacity is None:
            # Layers refuse dropless expert choice when they are built.
            raise TypeError(
                "Expert choice routing needs a `capacity`: it sets how many "
                "tokens each expert takes."
            )
        router_scores = self(tokens, training=training)
        plan, slot_weights = compute_expert_choice_plan(
            router_scores.scores, capacity, token_mask
        )
        return RoutingDecision(
            plan=plan,
            combine_weights=slot_weights,
            router_logits=router_scores.router_logits,
            router_probs=router_scores.router_probs,
        )

    def combine(self, expert_outputs, decision):
        num_tokens = decision.router_probs.shape[1]
        if num_tokens is None:
            num_tokens = ops.shape(decision.router_probs)[1]
        return combine_slots(
            expert_outputs, decision.plan, decision.combine_weights, num_tokens
        )

    def statistics(self, decision, token_mask=None):
        return expert_choice_stats(
            decision.router_probs,
            decision.router_logits,
            decision.plan.slot_tokens,
            decision.plan.slot_filled,
            token_mask,
        )

    def compute_output_spec(self, inputs, training=None):
        return router_scores_spec(inputs, self.num_experts, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["num_experts"] = self.num_experts
        config["router_bias"] = self.router_bias
        config.update(self._scoring_config())
        return config
