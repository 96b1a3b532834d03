import keras
from keras import ops

from keras_moe.backend import stable_top_k
from keras_moe.layers.routers.linear_scoring import MIN_NORMALIZER
from keras_moe.layers.routers.linear_scoring import LinearScoring
from keras_moe.layers.routers.token_choice_router import RouterOutput
from keras_moe.layers.routers.token_choice_router import TokenChoiceRouter
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_choice
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int

# How group-limited routing scores a group of experts: the sum of its two
# best scores (DeepSeek-V3's `noaux_tc`) or its best score (DeepSeek-V2's
# `group_limited_greedy`).
GROUP_SCORES = ("top2_sum", "max")


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(LinearScoring, TokenChoiceRouter):
    """Token-choice router: each token picks its `top_k` best experts.

    Logits are `x @ kernel` with a `[d, E]` kernel. Scores are their softmax
    (Shazeer et al. 2017, GShard, Switch, Mixtral) or their sigmoid
    (DeepSeek-V3), and each token takes the `top_k` highest-scoring experts,
    weighted by their scores: renormalised to sum to 1 over the `k` choices
    when `normalize_top_k=True` (Mixtral, DeepSeek-V3), then multiplied by
    `routed_scaling_factor`.

    Options from the literature, all off by default:
    - Group-limited routing (DeepSeek-V2, DeepSeek-V3): experts form
      `expert_groups` groups of consecutive experts; only the `top_groups`
      best groups are eligible, and the `top_k` experts are picked among
      them. A group's score is the sum of its two best experts' (selection)
      scores with `group_score="top2_sum"` (DeepSeek-V3's `noaux_tc`), or
      its best expert's score with `group_score="max"` (DeepSeek-V2's
      `group_limited_greedy`).
    - Aux-loss-free balancing (Wang et al. 2024): with
      `bias_update_rate > 0` a non-trainable per-expert `expert_bias` is
      added to the scores *for selection only* (weights use the unbiased
      scores). `update_bias(expert_counts)` moves it by
      `bias_update_rate * sign(mean_load - load_i)`; `SparseMoE` calls it
      once per training step.
    - Jitter (Switch): in training, the router's inputs are multiplied by
      noise drawn from `U(1 - jitter, 1 + jitter)`.
    - Noisy gating (Shazeer et al. 2017): in training, the logits get
      `N(0, 1) * softplus(x @ noise_kernel)` added, with a learned
      `[d, E]` `noise_kernel`.

    Router math is sensitive to rounding, so it runs in float32 (float64
    under a float64 policy) whatever the enclosing dtype policy; the MoE
    layers build their router that way.

    Args:
        num_experts: int, the number of experts `E`.
        top_k: int in `[1, num_experts]`, experts per token.
        score_function: `"softmax"` or `"sigmoid"`.
        normalize_top_k: bool, renormalise the `k` weights to sum to 1. With
            `top_k=1` and softmax scores this makes every weight 1, so the
            router then learns only through auxiliary losses; Switch keeps it
            False.
        routed_scaling_factor: positive float multiplying the weights.
        expert_groups: int dividing `num_experts`, the number of groups for
            group-limited routing. 1 (the default) turns it off.
        top_groups: int in `[1, expert_groups]`, the groups a token may use.
        router_bias: bool, a trainable bias `[E]` added to the router logits
            (GPT-OSS).
        group_score: how group-limited routing scores a group: `"top2_sum"`
            (the sum of its two best experts' scores, DeepSeek-V3) or
            `"max"` (its best expert's score, DeepSeek-V2).
        bias_update_rate: float >= 0, the step `u` of aux-loss-free
            balancing; 0 turns it off.
        jitter: float in `[0, 1)`, the multiplicative input noise amplitude.
        noisy_gating: bool, add learned Gaussian noise to the logits.
        kernel_initializer: initializer of the `[d, E]` kernel.
        seed: optional int, seeds the jitter and gating noise.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[..., d]` tokens.
        training: bool, turns on jitter and gating noise.

    Returns:
        A `RouterOutput` of tensors with the leading dimensions of `inputs`.

    Example:

    >>> import numpy as np
    >>> router = TopKRouter(num_experts=8, top_k=2, dtype="float32")
    >>> routing = router(np.random.normal(size=(5, 16)).astype("float32"))
    >>> tuple(routing.expert_ids.shape), tuple(routing.expert_weights.shape)
    ((5, 2), (5, 2))

    DeepSeek-V3-style routing: sigmoid scores, 4 groups of which 2 are used,
    bias balancing.

    >>> router = TopKRouter(
    ...     num_experts=16, top_k=4, score_function="sigmoid",
    ...     expert_groups=4, top_groups=2, bias_update_rate=0.001,
    ...     routed_scaling_factor=2.5, dtype="float32")
    >>> routing = router(np.random.normal(size=(5, 16)).astype("float32"))
    >>> groups = np.asarray(routing.expert_ids) // 4
    >>> all(len(set(row)) <= 2 for row in groups.tolist())
    True

    DeepSeek-V2-style routing: softmax scores, a group scored by its best
    expert, 3 of 8 groups used.

    >>> router = TopKRouter(
    ...     num_experts=16, top_k=6, normalize_top_k=False,
    ...     expert_groups=8, top_groups=3, group_score="max",
    ...     routed_scaling_factor=16.0, dtype="float32")
    >>> routing = router(np.random.normal(size=(5, 16)).astype("float32"))
    >>> groups = np.asarray(routing.expert_ids) // 2
    >>> all(len(set(row)) <= 3 for row in groups.tolist())
    True
    """

    moe_arguments = (
        "top_k",
        "score_function",
        "normalize_top_k",
        "routed_scaling_factor",
        "expert_groups",
        "top_groups",
        "group_score",
        "router_bias",
        "bias_update_rate",
        "jitter",
        "noisy_gating",
        "seed",
    )

    def __init__(
        self,
        num_experts,
        top_k=2,
        *,
        score_function="softmax",
        normalize_top_k=True,
        routed_scaling_factor=1.0,
        expert_groups=1,
        top_groups=1,
        group_score="top2_sum",
        router_bias=False,
        bias_update_rate=0.0,
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
        self.normalize_top_k = check_bool("normalize_top_k", normalize_top_k)
        self.routed_scaling_factor = check_float(
            "routed_scaling_factor", routed_scaling_factor, positive=True
        )
        self.expert_groups = check_int(
            "expert_groups", expert_groups, min_value=1, max_value=num_experts
        )
        if num_experts % self.expert_groups:
            raise ValueError(
                "`expert_groups` must divide `num_experts` "
                f"({num_experts}). Received: expert_groups={expert_groups}"
            )
        self.top_groups = check_int(
            "top_groups", top_groups, min_value=1, max_value=self.expert_groups
        )
        self.group_score = check_choice("group_score", group_score, GROUP_SCORES)
        self.top_k = check_int("top_k", top_k, min_value=1)
        eligible_experts = self.top_groups * (num_experts // self.expert_groups)
        if self.top_k > eligible_experts:
            raise ValueError(
                "`top_k` must be at most the number of experts a token can "
                f"reach: {eligible_experts} (`top_groups` groups of "
                "`num_experts // expert_groups` experts). Received: "
                f"top_k={top_k}, num_experts={num_experts}, "
                f"expert_groups={expert_groups}, top_groups={top_groups}"
            )
        self.bias_update_rate = check_float("bias_update_rate", bias_update_rate)

    def build(self, input_shape):
        self._build_scoring(input_shape[-1])
        if self.bias_update_rate > 0:
            self.expert_bias = self.add_weight(
                name="expert_bias",
                shape=(self.num_experts,),
                initializer="zeros",
                trainable=False,
            )

    def select(self, scores):
        """The `top_k` experts of each token and their combine weights.

        Args:
            scores: float `[..., E]`, from `score`.

        Returns:
            `(expert_ids, expert_weights)`, int32 and float `[..., k]`.
        """
        selection_scores = scores
        if self.bias_update_rate > 0:
            selection_scores = scores + ops.cast(self.expert_bias, scores.dtype)
        if self.top_groups < self.expert_groups:
            selection_scores = self._restrict_to_top_groups(selection_scores)
        _, expert_ids = stable_top_k(selection_scores, self.top_k)
        # Weights come from the unbiased scores, whatever chose the experts.
        expert_weights = ops.take_along_axis(scores, expert_ids, axis=-1)
        if self.normalize_top_k:
            expert_weights = expert_weights / ops.maximum(
                ops.sum(expert_weights, axis=-1, keepdims=True), MIN_NORMALIZER
            )
        if self.routed_scaling_factor != 1.0:
            expert_weights = expert_weights * self.routed_scaling_factor
        return expert_ids, expert_weights

    def _restrict_to_top_groups(self, selection_scores):
        """Set the scores of experts outside each token's best groups to -inf."""
        experts_per_group = self.num_experts // self.expert_groups
        leading_shape = tuple(ops.shape(selection_scores)[:-1])
        grouped = ops.reshape(
            selection_scores,
            leading_shape + (self.expert_groups, experts_per_group),
        )
        if self.group_score == "max":
            group_scores = ops.max(grouped, axis=-1)
        else:
            best_in_group, _ = ops.top_k(grouped, min(2, experts_per_group))
            group_scores = ops.sum(best_in_group, axis=-1)
        _, top_group_ids = stable_top_k(group_scores, self.top_groups)
        group_kept = ops.sum(
            ops.one_hot(top_group_ids, self.expert_groups, dtype="int32"),
            axis=-2,
        )
        expert_kept = ops.repeat(group_kept > 0, experts_per_group, axis=-1)
        return ops.where(
            expert_kept,
            selection_scores,
            ops.full((), float("-inf"), selection_scores.dtype),
        )

    def call(self, inputs, training=None):
        router_scores = self.score(inputs, training=training)
        expert_ids, expert_weights = self.select(router_scores.scores)
        return RouterOutput(
            expert_ids=expert_ids,
            expert_weights=expert_weights,
            router_logits=router_scores.router_logits,
            router_probs=router_scores.router_probs,
        )

    def update_bias(self, expert_counts):
        """One step of aux-loss-free balancing from this step's routing.

        `b_i += bias_update_rate * sign(mean_load - load_i)`: experts that got
        fewer choices than average become more attractive.

        Args:
            expert_counts: int `[..., E]`, choices routed to each expert
                (padding excluded), summed over any leading axes.
        """
        counts = ops.cast(expert_counts, self.expert_bias.dtype)
        counts = ops.sum(ops.reshape(counts, (-1, self.num_experts)), axis=0)
        step = ops.sign(ops.mean(counts) - counts) * self.bias_update_rate
        self.expert_bias.assign(self.expert_bias + step)

    @property
    def choices_per_token(self):
        return self.top_k

    @property
    def balancing_bias(self):
        # Created in `build`, with `bias_update_rate > 0` only.
        return getattr(self, "expert_bias", None)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "normalize_top_k": self.normalize_top_k,
                "routed_scaling_factor": self.routed_scaling_factor,
                "expert_groups": self.expert_groups,
                "top_groups": self.top_groups,
                "group_score": self.group_score,
                "router_bias": self.router_bias,
                "bias_update_rate": self.bias_update_rate,
            }
        )
        config.update(self._scoring_config())
        return config
