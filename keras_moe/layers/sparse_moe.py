import keras
from keras import ops

from keras_moe.layers.moe_layer import MoELayer
from keras_moe.layers.routers.expert_choice_router import ExpertChoiceRouter
from keras_moe.layers.routers.top_k_router import TopKRouter
from keras_moe.backend import data_dependent_shapes_allowed
from keras_moe.ops.dispatch import dispatch
from keras_moe.ops.dispatch import expert_capacity
from keras_moe.ops.dispatch import grouped_rows_bound
from keras_moe.ops.grouped_matmul import check_expert_kernel
from keras_moe.ops.grouped_matmul import default_expert_kernel
from keras_moe.ops.grouped_matmul import default_tile_size
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_choice
from keras_moe.utils.argument_validation import check_float

# Below this many tokens per call (decoding), per-expert buffers of every
# token beat a grouped matmul's per-expert products.
_MIN_GROUPED_TOKENS = 64

# The router class of each `routing`.
ROUTERS = {"token_choice": TopKRouter, "expert_choice": ExpertChoiceRouter}
ROUTINGS = tuple(ROUTERS)


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMoE(MoELayer):
    """Sparsely-gated Mixture-of-Experts feed-forward layer.

    A router scores every expert for every token, tokens are sorted into
    per-expert buffers of `capacity` slots, the experts run as one batched
    einsum over those buffers, and results are gathered back and mixed with
    the router's weights. The compute is `capacity_factor` times that of a
    dense feed-forward layer of `top_k * intermediate_dim` units, whatever
    `num_experts` is. The layer is the shared MoE base (expert bank, shape
    checks, padding, routing groups, statistics) plus a router (see
    `keras_moe.layers.Router`) that `routing` picks; both routings take the
    same path through the layer.

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

    **Expert choice** (`routing="expert_choice"`, an `ExpertChoiceRouter`;
    Zhou et al. 2022): each expert takes the `C = ceil(capacity_factor * tokens / num_experts)`
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

    Dropless routing (`capacity_factor=None`) cannot bound an expert's load
    below all `T` tokens, so buffers would cost `E / k` times the routed
    work. Instead the routed rows are sorted by expert into tiles that each
    belong to one expert, and a grouped matmul multiplies each tile by its
    expert's kernels (`keras_moe.ops.grouped_matmul`): the work is the
    routed rows plus at most one partly filled tile per expert, under
    `jax.jit` and XLA as in eager mode. `expert_kernel` picks the kernel;
    the default, `"auto"`, runs `jax.lax.ragged_dot` for JAX on GPU and
    TPU, the portable tile loop on CPU and under TensorFlow, one matmul per
    expert in eager PyTorch, and per-expert buffers where they cost less
    (capacity routing, calls of a few tokens such as decoding, token groups
    under expert parallelism, and token counts unknown when compiling).

    Under a `keras.distribution` (JAX) whose layout splits the experts
    (`keras_moe.distribution.get_layout_map`), the tokens are routed in
    groups, one per data shard, and sent to the devices holding their
    experts with all-to-alls. Capacity is then per group: `tokens` in the
    formulas above means the tokens of one group. Dropless routing gives the
    same result either way; there the exchange keeps per-expert buffers of
    one group's tokens (all a group can send one expert), so an all-to-all
    moves at most `groups * E * group_tokens * d` values.

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
        group_score: `"top2_sum"` (DeepSeek-V3) or `"max"` (DeepSeek-V2),
            how group-limited routing scores a group: the sum of its two
            best experts' scores, or its best expert's score.
        router_bias: bool, a trainable bias on the router logits (GPT-OSS).
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
        expert_dropout: float in `[0, 1)`, dropout on each expert's hidden
            activation in training (the Switch paper's "expert dropout",
            0.4 when fine-tuning). Defaults to 0.
        expert_kernel: how the experts multiply their rows: `"auto"` (the
            default, see above), `"buffers"` (per-expert buffers, dropless
            ones sized for every token), or a grouped matmul kernel,
            `"tiles"` (portable), `"ragged_dot"` (JAX) or `"grouped_mm"`
            (PyTorch >= 2.9). Grouped kernels apply to token-choice routing
            on a single routing group; a kernel of another backend raises a
            `ValueError`.
        routing_weights_on: `"outputs"` (the default) multiplies each
            expert's output by the token's routing weight; `"inputs"`
            multiplies the token by it before the expert, as Llama 4 does
            (`expert(w * x)`, which differs for non-linear experts). Token
            choice only.
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
        group_score="top2_sum",
        router_bias=False,
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
        expert_dropout=0.0,
        expert_kernel="auto",
        routing_weights_on="outputs",
        **kwargs,
    ):
        super().__init__(
            num_experts,
            intermediate_dim,
            track_router_stats=track_router_stats,
            expert_dropout=expert_dropout,
            **kwargs,
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
        self.expert_kernel = check_expert_kernel(expert_kernel)
        self.routing_weights_on = check_choice(
            "routing_weights_on", routing_weights_on, ("outputs", "inputs")
        )
        if routing == "expert_choice" and routing_weights_on != "outputs":
            raise ValueError(
                "routing_weights_on='inputs' applies to token-choice routing. "
                f"Received: routing={routing!r}, "
                f"routing_weights_on={routing_weights_on!r}"
            )
        if routing == "expert_choice" and expert_kernel not in ("auto", "buffers"):
            raise ValueError(
                f"expert_kernel={expert_kernel!r} applies to token-choice "
                "routing; expert choice fills exactly `capacity` slots per "
                "expert, so it runs on buffers. Use expert_kernel='auto'."
            )
        router_arguments = {
            "top_k": top_k,
            "score_function": score_function,
            "normalize_top_k": normalize_top_k,
            "routed_scaling_factor": routed_scaling_factor,
            "expert_groups": expert_groups,
            "top_groups": top_groups,
            "group_score": group_score,
            "router_bias": router_bias,
            "bias_update_rate": bias_update_rate,
            "jitter": jitter,
            "noisy_gating": noisy_gating,
            "seed": seed,
        }
        self.router = self._make_router(router_initializer, router_arguments)
        # The router arguments the router does not take (none, unless its
        # routing ignores some): kept for `get_config`.
        self._unused_router_arguments = {
            name: value
            for name, value in router_arguments.items()
            if name not in type(self.router).moe_arguments
        }
        self.top_k = getattr(self.router, "top_k", top_k)
        self.experts = self._make_experts(
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
        )

    def _make_router(self, router_initializer, router_arguments):
        """The router of `self.routing`, from the layer's router arguments."""
        router_class = ROUTERS[self.routing]
        router_class.check_moe_arguments(
            {
                **router_arguments,
                "causal": self.causal,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
            }
        )
        return router_class(
            self.num_experts,
            kernel_initializer=router_initializer,
            dtype=self.router_dtype,
            name="router",
            **{name: router_arguments[name] for name in router_class.moe_arguments},
        )

    def _build_router(self, hidden_dim):
        self.router.build((None, hidden_dim))

    def _stats_readouts(self):
        bias = self.router.balancing_bias
        return {} if bias is None else {"expert_bias": bias}

    def _capacity(self, num_tokens, training):
        """Slots per expert for groups of `num_tokens`, or None (dropless)."""
        if self.capacity_factor is None:
            return None
        capacity_factor = (
            self.capacity_factor if training else self.eval_capacity_factor
        )
        if capacity_factor is None:
            return None
        return expert_capacity(
            num_tokens,
            self.num_experts,
            self.router.choices_per_token,
            capacity_factor,
        )

    def call(self, inputs, mask=None, training=None):
        tokens, token_mask = self._prepare_inputs(inputs, mask)
        if self._has_no_tokens(inputs.shape):
            return tokens
        tokens, token_mask, groups = self._group_tokens(tokens, token_mask)
        num_tokens = tokens.shape[1]
        if num_tokens is None:
            num_tokens = ops.shape(tokens)[1]
        capacity = self._capacity(num_tokens, training)
        grouped = self._grouped_kernel(num_tokens, capacity, groups)
        decision = self.router.route(
            tokens,
            token_mask=token_mask,
            capacity=capacity,
            training=training,
            tile_size=None if grouped is None else grouped[1],
        )
        dispatched = dispatch(tokens, decision.plan)
        if self.routing_weights_on == "inputs":
            dispatched, decision = self._weighted_inputs(dispatched, decision)
        if decision.plan.tiles is not None:
            expert_outputs = self._run_grouped_experts(
                dispatched, decision.plan.tiles, grouped[0], training
            )
        else:
            expert_outputs = self._run_experts(dispatched, groups, training)
        outputs = self.router.combine(expert_outputs, decision)
        self._observe(
            training, lambda: self.router.statistics(decision, token_mask)
        )
        if training:
            self._add_router_losses(decision, token_mask, ops.shape(inputs))
            if self.router.balancing_bias is not None:
                self.router.update_bias(decision.plan.expert_counts)
        return ops.reshape(outputs, ops.shape(inputs))

    def _weighted_inputs(self, dispatched, decision):
        """Expert rows times their routing weight, and a decision that
        combines the outputs with weight 1 (`routing_weights_on="inputs"`)."""
        plan = decision.plan
        slot_shape = ops.shape(plan.slot_filled)  # [G, E, C], or [G, M] rows
        num_groups = slot_shape[0]
        slots_per_group = 1
        for size in slot_shape[1:]:
            slots_per_group = slots_per_group * size
        # [G, k, T], zero for dropped choices: those all point at slot 0.
        weights = ops.transpose(decision.combine_weights, (0, 2, 1))
        weights = ops.where(plan.choice_kept, weights, ops.zeros((), weights.dtype))
        offsets = ops.reshape(
            ops.arange(num_groups, dtype="int32") * slots_per_group, (-1, 1, 1)
        )
        slot_weights = ops.scatter(
            ops.reshape(plan.choice_slots + offsets, (-1, 1)),
            ops.reshape(weights, (-1,)),
            (num_groups * slots_per_group,),
        )
        slot_weights = ops.reshape(slot_weights, tuple(slot_shape) + (1,))
        dispatched = dispatched * ops.cast(slot_weights, dispatched.dtype)
        unit = ops.ones_like(decision.combine_weights)
        return dispatched, decision._replace(combine_weights=unit)

    def _grouped_kernel(self, num_tokens, capacity, groups):
        """`(kernel, tile_size)` of the grouped matmul for this call, or None
        to run per-expert buffers (see the class docstring)."""
        kernel = self.expert_kernel
        if (
            kernel == "buffers"
            or groups is not None
            or not isinstance(num_tokens, int)
            or not self.router.supports_grouped_layout
        ):
            return None
        num_choices = num_tokens * self.router.choices_per_token
        torch_backend = keras.backend.backend() == "torch"
        automatic = kernel == "auto"
        if automatic:
            if capacity is not None or num_tokens < _MIN_GROUPED_TOKENS:
                return None
            if torch_backend and not data_dependent_shapes_allowed():
                return None  # `torch.compile`: per-expert sizes would be symbolic
            kernel = default_expert_kernel()
        # Eager PyTorch multiplies each expert's rows as they are: no tiles.
        tile_size = 1
        if not torch_backend:
            tile_size = default_tile_size(num_choices, self.num_experts, kernel)
        _, grouped_rows = grouped_rows_bound(num_choices, self.num_experts, tile_size)
        if automatic and grouped_rows >= self.num_experts * num_tokens:
            return None
        return kernel, tile_size

    def _run_grouped_experts(self, rows, tiles, kernel, training):
        """The expert bank on rows `[1, M, d]` in the grouped layout."""
        layout = tiles._replace(
            tile_experts=tiles.tile_experts[0],
            num_tiles=tiles.num_tiles[0],
            group_sizes=tiles.group_sizes[0],
        )
        outputs = self.experts.grouped_call(rows[0], layout, kernel, training)
        return ops.expand_dims(outputs, 0)

    def _add_router_losses(self, decision, token_mask, input_shape):
        """Add the weighted losses that apply to the router's routing."""
        if self.aux_loss_weight > 0:
            loss = self.router.load_balancing_loss(decision, token_mask)
            if loss is not None:
                self.add_loss(self.aux_loss_weight * loss)
        if self.z_loss_weight > 0:
            self.add_loss(
                self.z_loss_weight * self.router.z_loss(decision, token_mask)
            )
        if self.sequence_aux_loss_weight > 0:
            # Sequences run along the second-to-last input axis; a rank-2
            # input is one sequence.
            sequence_length = input_shape[-2] if len(input_shape) > 2 else -1
            loss = self.router.sequence_load_balancing_loss(
                decision, sequence_length, token_mask
            )
            if loss is not None:
                self.add_loss(self.sequence_aux_loss_weight * loss)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "top_k": self.top_k,
                "routing": self.routing,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "aux_loss_weight": self.aux_loss_weight,
                "z_loss_weight": self.z_loss_weight,
                "sequence_aux_loss_weight": self.sequence_aux_loss_weight,
                "causal": self.causal,
                "expert_kernel": self.expert_kernel,
                "routing_weights_on": self.routing_weights_on,
            }
        )
        config.update(self._router_config())
        return config

    def _router_config(self):
        """The constructor arguments that configure the router.

        Read back from the router, where they are stored once.
        """
        router_config = self.router.get_config()
        config = {
            name: router_config[name] for name in type(self.router).moe_arguments
        }
        config.update(self._unused_router_arguments)
        config["router_initializer"] = router_config["kernel_initializer"]
        return config
