import keras
from keras import ops

from keras_moe.config import check_finite
from keras_moe.distribution import expert_parallel
from keras_moe.layers.experts import Experts
from keras_moe.layers.top_k_router import TopKRouter
from keras_moe.ops.dispatch import combine
from keras_moe.ops.dispatch import combine_slots
from keras_moe.ops.dispatch import compute_dispatch_plan
from keras_moe.ops.dispatch import compute_expert_choice_plan
from keras_moe.ops.dispatch import dispatch
from keras_moe.ops.dispatch import expert_capacity
from keras_moe.ops.router_losses import load_balancing_loss
from keras_moe.ops.router_losses import router_z_loss
from keras_moe.ops.router_losses import sequence_load_balancing_loss
from keras_moe.ops.router_stats import ROUTED
from keras_moe.ops.router_stats import RouterStatsMetric
from keras_moe.ops.router_stats import expert_choice_stats
from keras_moe.ops.router_stats import token_choice_stats
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_choice
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int


def router_dtype_for(dtype_policy):
    """Routers compute in float32, or float64 when the layer is float64."""
    if dtype_policy.compute_dtype == "float64":
        return "float64"
    return "float32"


ROUTINGS = ("token_choice", "expert_choice")

# Constructor arguments that `SparseMoE` hands to its `TopKRouter` and reads
# back from it in `get_config`.
_ROUTER_ARGUMENTS = (
    "score_function",
    "normalize_top_k",
    "routed_scaling_factor",
    "expert_groups",
    "top_groups",
    "bias_update_rate",
    "jitter",
    "noisy_gating",
    "seed",
)
_EXPERT_ARGUMENTS = (
    "activation",
    "gated",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
)


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMoE(keras.layers.Layer):
    """Sparsely-gated Mixture-of-Experts feed-forward layer.

    A router scores every expert for every token, tokens are sorted into
    per-expert buffers of `capacity` slots, the experts run as one batched
    einsum over those buffers, and results are gathered back and mixed with
    the router's weights. The compute is `capacity_factor` times that of a
    dense feed-forward layer of `top_k * intermediate_dim` units, whatever
    `num_experts` is.

    **Token choice** (`routing="token_choice"`, the default; Shazeer et al.
    2017, GShard, Switch, Mixtral, DeepSeek): each token is sent to the
    `top_k` experts its router scores highest. Capacity per expert is
    `C = ceil(capacity_factor * tokens * top_k / num_experts)`; first
    choices win capacity before second choices, and a choice that finds its
    expert full is dropped (it contributes zero; the residual connection
    around the layer carries the token). With `capacity_factor=None` nothing
    is ever dropped. The router options (`score_function`, group-limited
    routing, aux-loss-free bias balancing, jitter, noisy gating) are those of
    `TopKRouter`.

    **Expert choice** (`routing="expert_choice"`; Zhou et al. 2022): each
    expert takes the `C = ceil(capacity_factor * tokens / num_experts)`
    tokens that score it highest, so loads are balanced by construction and
    a token may get several experts or none; `top_k` and the balancing
    options do not apply. An expert's choice looks at every token of the
    batch, the future included, so expert choice cannot be used in a causal
    decoder: it refuses `causal=True`.

    During training the layer adds, with `add_loss`: the Switch Transformer
    load-balancing loss (`aux_loss_weight * E * sum_i f_i * P_i`), the
    ST-MoE router z-loss (`z_loss_weight * mean(logsumexp(logits)^2)`) and
    DeepSeek-V3's sequence-wise balance loss (the Switch loss per sequence,
    `sequence_aux_loss_weight`). Under expert choice only the z-loss applies.
    With `bias_update_rate > 0` each training call also takes one step of
    aux-loss-free balancing on the router's `expert_bias`.

    Padding tokens (a Keras mask, or the `mask` call argument) are not
    routed, take no capacity, count in no loss, and get a zero output.

    Under a `keras.distribution` (JAX) whose layout splits the experts
    (`keras_moe.distribution.get_layout_map`), the tokens are routed in
    groups, one per data shard, and sent to the devices holding their
    experts with all-to-alls. Capacity is then per group: `tokens` in the
    formulas above means the tokens of one group. Dropless routing gives the
    same result either way.

    With `track_router_stats=True` each training call also records router
    statistics from the routing it just did (expert load, importance,
    dropped fraction, the balance losses, MaxVio, router entropy; see
    `keras_moe.ops.router_stats`) in `layer.router_stats`, a Keras metric:
    `model.fit` logs `moe_aux_loss`, `moe_maxvio` and `moe_dropped_fraction`,
    and `keras_moe.callbacks` reads the rest.

    Args:
        num_experts: int, the number of experts `E`.
        intermediate_dim: int, the hidden width of each expert.
        top_k: int, experts per token (token choice). Defaults to 2.
        routing: `"token_choice"` or `"expert_choice"`.
        score_function: `"softmax"` or `"sigmoid"` router scores.
        normalize_top_k: bool, renormalise the `top_k` weights to sum to 1.
        routed_scaling_factor: positive float multiplying the weights.
        expert_groups: int dividing `num_experts`: group-limited routing
            over this many groups of experts (1 = off).
        top_groups: int in `[1, expert_groups]`, groups a token may use.
        bias_update_rate: float >= 0, the step of aux-loss-free balancing
            (0 = off).
        jitter: float in `[0, 1)`, multiplicative noise on the router's
            inputs in training (Switch uses 0.01).
        noisy_gating: bool, learned Gaussian noise on the logits in training.
        capacity_factor: positive float, or `None` for dropless token-choice
            routing. Used in training. Defaults to 1.25.
        eval_capacity_factor: positive float, or `None` for dropless: the
            capacity factor outside training. Ignored (dropless) when
            `capacity_factor` is `None`. Defaults to 2.0.
        activation: the experts' activation. Defaults to `"silu"`.
        gated: bool, GLU experts (SwiGLU/GeGLU) when True, plain
            feed-forward experts when False. Defaults to True.
        aux_loss_weight: float >= 0, weight α of the load-balancing loss.
        z_loss_weight: float >= 0, weight of the router z-loss.
        sequence_aux_loss_weight: float >= 0, weight of the sequence-wise
            balance loss. Sequences are the second-to-last input axis.
        causal: bool, whether the layer sits in a causal decoder (where a
            token must not see later ones). Decoders set it.
        use_bias: bool, whether expert projections have biases.
        kernel_initializer: initializer of the expert kernels.
        bias_initializer: initializer of the expert biases.
        router_initializer: initializer of the router kernel.
        seed: optional int, seeds the router's jitter and gating noise.
        track_router_stats: bool, record router statistics in training
            calls. Defaults to True; False removes their (small) cost.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., d]`, any number of leading dimensions.
        mask: optional bool `[...]` (the leading dimensions), False for
            padding tokens. Propagated Keras masks are used automatically.
        training: bool, selects the capacity factor, turns on router noise,
            adds the losses and updates the balancing bias.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    >>> import numpy as np
    >>> moe = SparseMoE(num_experts=8, intermediate_dim=64, top_k=2)
    >>> x = np.random.normal(size=(2, 10, 32)).astype("float32")
    >>> tuple(moe(x).shape)
    (2, 10, 32)

    DeepSeek-V3 routing: sigmoid scores, group-limited, bias balancing and
    no auxiliary loss.

    >>> moe = SparseMoE(
    ...     num_experts=16, intermediate_dim=32, top_k=4,
    ...     score_function="sigmoid", expert_groups=4, top_groups=2,
    ...     routed_scaling_factor=2.5, bias_update_rate=0.001,
    ...     aux_loss_weight=0.0, capacity_factor=None)
    >>> tuple(moe(x, training=True).shape)
    (2, 10, 32)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        top_k=2,
        *,
        routing="token_choice",
        score_function="softmax",
        normalize_top_k=True,
        routed_scaling_factor=1.0,
        expert_groups=1,
        top_groups=1,
        bias_update_rate=0.0,
        jitter=0.0,
        noisy_gating=False,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        activation="silu",
        gated=True,
        aux_loss_weight=0.01,
        z_loss_weight=0.0,
        sequence_aux_loss_weight=0.0,
        causal=False,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_initializer="glorot_uniform",
        seed=None,
        track_router_stats=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, min_value=1)
        self.track_router_stats = check_bool(
            "track_router_stats", track_router_stats
        )
        self.router_stats = (
            RouterStatsMetric(ROUTED) if self.track_router_stats else None
        )
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, min_value=1
        )
        self.routing = check_choice("routing", routing, ROUTINGS)
        self.capacity_factor = check_float(
            "capacity_factor", capacity_factor, positive=True, allow_none=True
        )
        self.eval_capacity_factor = check_float(
            "eval_capacity_factor",
            eval_capacity_factor,
            positive=True,
            allow_none=True,
        )
        self.aux_loss_weight = check_float("aux_loss_weight", aux_loss_weight)
        self.z_loss_weight = check_float("z_loss_weight", z_loss_weight)
        self.sequence_aux_loss_weight = check_float(
            "sequence_aux_loss_weight", sequence_aux_loss_weight
        )
        self.causal = check_bool("causal", causal)
        self._updates_expert_bias = (
            check_float("bias_update_rate", bias_update_rate) > 0
        )
        if self.routing == "expert_choice":
            self._check_expert_choice_arguments(
                expert_groups=expert_groups, bias_update_rate=bias_update_rate
            )
        self.supports_masking = True

        self.router = self._make_router(
            top_k=top_k,
            router_initializer=router_initializer,
            score_function=score_function,
            normalize_top_k=normalize_top_k,
            routed_scaling_factor=routed_scaling_factor,
            expert_groups=expert_groups,
            top_groups=top_groups,
            bias_update_rate=bias_update_rate,
            jitter=jitter,
            noisy_gating=noisy_gating,
            seed=seed,
        )
        self.top_k = self.router.top_k
        self.experts = Experts(
            num_experts=self.num_experts,
            intermediate_dim=self.intermediate_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            dtype=self.dtype_policy,
            name="experts",
        )

    def _check_expert_choice_arguments(self, expert_groups, bias_update_rate):
        if self.causal:
            raise ValueError(
                "`routing='expert_choice'` cannot be used in a causal decoder: "
                "each expert picks its tokens among the whole sequence, future "
                "tokens included. Use `routing='token_choice'`. Received: "
                "causal=True"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) is None:
                raise ValueError(
                    f"`routing='expert_choice'` needs `{name}` to be a "
                    "positive number: it sets how many tokens each expert "
                    f"takes. Received: {name}=None"
                )
        if expert_groups != 1 or bias_update_rate:
            raise ValueError(
                "`routing='expert_choice'` is balanced by construction and "
                "does not use `expert_groups` or `bias_update_rate`. "
                f"Received: expert_groups={expert_groups!r}, "
                f"bias_update_rate={bias_update_rate!r}"
            )

    def _make_router(self, top_k, router_initializer, **router_options):
        return TopKRouter(
            num_experts=self.num_experts,
            top_k=top_k,
            kernel_initializer=router_initializer,
            dtype=router_dtype_for(self.dtype_policy),
            name="router",
            **router_options,
        )

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"`{type(self).__name__}` expects inputs of shape [..., "
                "hidden_dim] with rank >= 2 and a known last dimension. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.hidden_dim = int(input_shape[-1])
        expert_parallel.check_expert_layout(
            f"{self.path}/{self.experts.name}", self.num_experts
        )
        self.router.build((None, self.hidden_dim))
        self.experts.build((self.num_experts, None, self.hidden_dim))
        if self.router_stats is not None:
            readouts = {}
            if getattr(self.router, "expert_bias", None) is not None:
                readouts["expert_bias"] = self.router.expert_bias
            self.router_stats.build_state(self, self.num_experts, readouts)

    @property
    def variables(self):
        # The router statistics accumulators are state, not weights: listed
        # here (so `jax.jit` steps thread them like any non-trainable state)
        # but not in `weights`, so they are neither saved nor counted.
        variables = super().variables
        if self.router_stats is not None:
            variables.extend(self.router_stats.state_variables)
        return variables

    def _check_input_shape(self, shape):
        if len(shape) < 2 or shape[-1] != self.hidden_dim:
            raise ValueError(
                f"`{type(self).__name__}` was built for inputs of shape [..., "
                f"{self.hidden_dim}]; the last dimension cannot change after "
                f"build. Received: inputs.shape={tuple(shape)}"
            )

    def _capacity_factor(self, training):
        if self.capacity_factor is None:
            return None
        return self.capacity_factor if training else self.eval_capacity_factor

    def call(self, inputs, mask=None, training=None):
        self._check_input_shape(inputs.shape)
        check_finite(inputs, mask, layer=self)
        # Routing groups: one holding every token of the batch or, under a
        # `keras.distribution`, one per data shard (capacity is then per
        # group; see `keras_moe.distribution.expert_parallel`).
        groups = expert_parallel.routing_groups(self.experts, inputs.shape)
        num_groups = 1 if groups is None else groups.num_groups
        tokens = ops.reshape(inputs, (num_groups, -1, self.hidden_dim))
        tokens = expert_parallel.constrain_groups(tokens, groups)
        num_tokens = tokens.shape[1]
        if num_tokens is None:
            num_tokens = ops.shape(tokens)[1]
        token_mask = None
        if mask is not None:
            token_mask = ops.reshape(ops.cast(mask, "bool"), (num_groups, -1))
            # Padding may hold anything (even NaN); zeroing it keeps it out
            # of the router's math and its gradients.
            tokens = ops.where(
                ops.expand_dims(token_mask, -1), tokens, ops.zeros((), tokens.dtype)
            )
        if self.routing == "expert_choice":
            outputs = self._expert_choice(tokens, num_tokens, token_mask, training)
        else:
            outputs = self._token_choice(
                tokens, num_tokens, token_mask, training, ops.shape(inputs)
            )
        return ops.reshape(outputs, ops.shape(inputs))

    def _token_choice(self, tokens, num_tokens, token_mask, training, input_shape):
        routing = self.router(tokens, training=training)
        capacity_factor = self._capacity_factor(training)
        capacity = None  # Dropless: sized by the dispatch plan.
        if capacity_factor is not None:
            capacity = expert_capacity(
                num_tokens,
                self.num_experts,
                self.router.choices_per_token,
                capacity_factor,
            )
        plan = compute_dispatch_plan(
            routing.expert_ids, self.num_experts, capacity, token_mask
        )
        expert_outputs = self._run_experts(dispatch(tokens, plan))
        outputs = combine(expert_outputs, plan, routing.expert_weights)
        if self.router_stats is not None:
            self.router_stats.observe(
                self,
                training,
                lambda: token_choice_stats(
                    routing.router_probs,
                    routing.router_logits,
                    plan.expert_counts,
                    plan.num_kept,
                    token_mask,
                ),
            )
        if training:
            self._add_router_losses(routing, plan, token_mask, input_shape)
            if self._updates_expert_bias:
                self.router.update_bias(plan.expert_counts)
        return outputs

    def _expert_choice(self, tokens, num_tokens, token_mask, training):
        router_scores = self.router.score(tokens, training=training)
        capacity = expert_capacity(
            num_tokens, self.num_experts, 1, self._capacity_factor(training)
        )
        plan, slot_weights = compute_expert_choice_plan(
            router_scores.scores, capacity, token_mask
        )
        expert_outputs = self._run_experts(dispatch(tokens, plan))
        if self.router_stats is not None:
            self.router_stats.observe(
                self,
                training,
                lambda: expert_choice_stats(
                    router_scores.router_probs,
                    router_scores.router_logits,
                    plan.slot_tokens,
                    plan.slot_filled,
                    token_mask,
                ),
            )
        if training and self.z_loss_weight > 0:
            self.add_loss(
                self.z_loss_weight
                * router_z_loss(router_scores.router_logits, token_mask)
            )
        return combine_slots(expert_outputs, plan, slot_weights, num_tokens)

    def _run_experts(self, buffers):
        groups = expert_parallel.routing_groups(
            self.experts, num_groups=buffers.shape[0]
        )
        if groups is not None:
            return expert_parallel.run_experts(self.experts, buffers, groups)
        return ops.expand_dims(self.experts(buffers[0]), 0)

    def _add_router_losses(self, routing, plan, token_mask, input_shape):
        if self.aux_loss_weight > 0:
            self.add_loss(
                self.aux_loss_weight
                * load_balancing_loss(
                    routing.router_probs, plan.expert_counts, token_mask
                )
            )
        if self.z_loss_weight > 0:
            self.add_loss(
                self.z_loss_weight
                * router_z_loss(routing.router_logits, token_mask)
            )
        if self.sequence_aux_loss_weight > 0:
            # Sequences run along the second-to-last input axis; a rank-2
            # input is one sequence.
            sequence_length = input_shape[-2] if len(input_shape) > 2 else -1

            def by_sequence(values):
                trailing = tuple(values.shape[2:])
                return ops.reshape(values, (-1, sequence_length) + trailing)

            self.add_loss(
                self.sequence_aux_loss_weight
                * sequence_load_balancing_loss(
                    by_sequence(routing.router_probs),
                    by_sequence(routing.expert_ids),
                    None if token_mask is None else by_sequence(token_mask),
                )
            )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        # The expert and router arguments are stored once, in the sublayers.
        expert_config = self.experts.get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "top_k": self.top_k,
                "routing": self.routing,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "aux_loss_weight": self.aux_loss_weight,
                "z_loss_weight": self.z_loss_weight,
                "sequence_aux_loss_weight": self.sequence_aux_loss_weight,
                "causal": self.causal,
                "track_router_stats": self.track_router_stats,
            }
        )
        config.update(self._router_config())
        config.update({key: expert_config[key] for key in _EXPERT_ARGUMENTS})
        return config

    def _router_config(self):
        """The constructor arguments that configure the router."""
        router_config = self.router.get_config()
        config = {key: router_config[key] for key in _ROUTER_ARGUMENTS}
        config["router_initializer"] = router_config["kernel_initializer"]
        return config
