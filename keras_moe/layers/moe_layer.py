import keras
from keras import ops

from keras_moe.config import check_finite
from keras_moe.distribution import expert_parallel
from keras_moe.layers.experts import Experts
from keras_moe.metrics import RouterStatsMetric
from keras_moe.ops.router_stats import ROUTED
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_rate

# Constructor arguments that a MoE layer hands to its `Experts` and reads
# back from it in `get_config`.
EXPERT_ARGUMENTS = (
    "activation",
    "gated",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
)


def router_dtype_for(dtype_policy):
    """Routers compute in float32, or float64 when the layer is float64.

    Args:
        dtype_policy: the MoE layer's `keras.DTypePolicy`.

    Returns:
        `"float32"` or `"float64"`.

    Example:

    >>> import keras
    >>> router_dtype_for(keras.DTypePolicy("mixed_bfloat16"))
    'float32'
    """
    if dtype_policy.compute_dtype == "float64":
        return "float64"
    return "float32"


class MoELayer(keras.layers.Layer):
    """What every Mixture-of-Experts layer shares.

    A MoE layer routes tokens to an expert bank and mixes the results back.
    This base owns everything that does not depend on how the routing is
    done:
    - the expert bank, `self.experts` (an `Experts` of `num_experts`
      experts), made by `_make_experts` from the expert arguments, which
      `get_config` reads back from it;
    - the input-shape checks, at build and at every call, and the padding
      mask: padding tokens are zeroed before any routing (they may hold
      anything, even NaN) and their outputs are zero;
    - the routing groups (`_group_tokens`): under a `keras.distribution`
      that splits the experts, tokens are routed in one group per data
      shard, computed once per call, and `_run_experts` runs the bank where
      the experts live;
    - the router statistics (`self.router_stats`, a `RouterStatsMetric` of
      kind `stats_kind`) and its accumulators, listed in `variables` (so
      compiled steps thread them) but not in `weights` (so they are neither
      saved nor counted);
    - the router dtype (`self.router_dtype`): router math runs in float32
      (float64 under a float64 policy) whatever the policy.

    Subclasses create their routing weights in `_build_router(hidden_dim)`,
    say what the experts receive in `_expert_input_shape()`, and name the
    variables the statistics report as they stand in `_stats_readouts()`.
    Class attributes: `stats_kind` (`"routed"` or `"soft"`) and
    `input_rank` (None for inputs `[..., d]` of any rank >= 2, or 3 for
    `[batch, tokens, d]`).

    Args:
        num_experts: int, the number of experts `E`.
        intermediate_dim: int, the hidden width of each expert.
        track_router_stats: bool, record router statistics in training
            calls. Defaults to True.
        expert_dropout: float in `[0, 1)`, dropout on each expert's hidden
            activation in training (Switch Transformer's "expert
            dropout"). Defaults to 0.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    A dense mixture on this base, for illustration only (every expert runs
    on every token, which the routed layers never do):

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_moe.layers.moe_layer import MoELayer
    >>> class DenseMixture(MoELayer):
    ...     def __init__(self, num_experts, intermediate_dim, **kwargs):
    ...         super().__init__(
    ...             num_experts, intermediate_dim, track_router_stats=False,
    ...             **kwargs)
    ...         self.experts = self._make_experts()
    ...     def call(self, inputs, mask=None):
    ...         tokens, token_mask = self._prepare_inputs(inputs, mask)
    ...         buffers = ops.stack([tokens] * self.num_experts)  # [E, T, d]
    ...         outputs = ops.mean(self.experts(buffers), axis=0)
    ...         return self._zero_padding(outputs, token_mask)
    >>> moe = DenseMixture(num_experts=2, intermediate_dim=8)
    >>> x = np.ones((3, 4), "float32")
    >>> outputs = moe(x, mask=np.array([True, True, False]))
    >>> tuple(outputs.shape), ops.convert_to_numpy(outputs)[2].tolist()
    ((3, 4), [0.0, 0.0, 0.0, 0.0])
    """

    stats_kind = ROUTED
    input_rank = None

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        *,
        track_router_stats=True,
        expert_dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, min_value=1)
        self.track_router_stats = check_bool(
            "track_router_stats", track_router_stats
        )
        self.router_stats = (
            RouterStatsMetric(self.stats_kind) if self.track_router_stats else None
        )
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, min_value=1
        )
        self.expert_dropout = check_rate("expert_dropout", expert_dropout)
        self.router_dtype = router_dtype_for(self.dtype_policy)
        self.supports_masking = True

    def _make_experts(
        self,
        activation="silu",
        gated=True,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
    ):
        """The expert bank, in the layer's dtype policy."""
        return Experts(
            num_experts=self.num_experts,
            intermediate_dim=self.intermediate_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            dropout=self.expert_dropout,
            dtype=self.dtype_policy,
            name="experts",
        )

    # Build -----------------------------------------------------------------

    def build(self, input_shape):
        if not self._accepts_rank(len(input_shape)) or input_shape[-1] is None:
            raise ValueError(
                f"`{type(self).__name__}` expects inputs of shape "
                f"{self._input_layout('hidden_dim')} {self._rank_rule()} a "
                f"known last dimension. Received: input_shape={tuple(input_shape)}"
            )
        self.hidden_dim = int(input_shape[-1])
        expert_parallel.check_expert_layout(
            f"{self.path}/{self.experts.name}", self.num_experts
        )
        self._build_router(self.hidden_dim)
        self.experts.build(self._expert_input_shape())
        if self.router_stats is not None:
            self.router_stats.build_state(
                self, self.num_experts, self._stats_readouts()
            )

    def _build_router(self, hidden_dim):
        """Create the routing weights for tokens of width `hidden_dim`."""

    def _expert_input_shape(self):
        """The shape of what the expert bank receives, `[E, C, d]` by default."""
        return (self.num_experts, None, self.hidden_dim)

    def _stats_readouts(self):
        """Variables the statistics report as they stand (name -> variable)."""
        return {}

    @property
    def variables(self):
        # The router statistics accumulators are state, not weights: listed
        # here (so `jax.jit` steps thread them like any non-trainable state)
        # but not in `weights`, so they are neither saved nor counted.
        variables = super().variables
        if self.router_stats is not None:
            variables.extend(self.router_stats.state_variables)
        return variables

    # Inputs ----------------------------------------------------------------

    def _accepts_rank(self, rank):
        return rank >= 2 if self.input_rank is None else rank == self.input_rank

    def _input_layout(self, last):
        """`[..., last]`, or `[batch, tokens, last]` for rank-3 layers."""
        leading = "..." if self.input_rank is None else "batch, tokens"
        return f"[{leading}, {last}]"

    def _rank_rule(self):
        if self.input_rank is None:
            return "with rank >= 2 and"
        return f"(rank {self.input_rank}) with"

    def _check_input_shape(self, shape):
        if not self._accepts_rank(len(shape)) or shape[-1] != self.hidden_dim:
            rank_rule = ""
            if self.input_rank is not None:
                rank_rule = f"the rank must be {self.input_rank} and "
            raise ValueError(
                f"`{type(self).__name__}` was built for inputs of shape "
                f"{self._input_layout(self.hidden_dim)}; {rank_rule}the last "
                "dimension cannot change after build. Received: "
                f"inputs.shape={tuple(shape)}"
            )

    def _token_mask(self, inputs, mask):
        """The padding mask as bool `[...]` (the leading dims), or None."""
        if mask is None:
            return None
        expected = tuple(inputs.shape[:-1])
        # Dimensions known at trace time only: free, and what a wrong mask
        # (a transposed one, or one of another batch) differs in.
        if len(mask.shape) != len(expected) or any(
            isinstance(got, int) and isinstance(want, int) and got != want
            for got, want in zip(mask.shape, expected)
        ):
            leading = "..." if self.input_rank is None else "batch, tokens"
            raise ValueError(
                f"`{type(self).__name__}` expects `mask` of shape [{leading}], "
                f"the leading dimensions of the inputs: {expected} for inputs "
                f"of shape {tuple(inputs.shape)}. Received: "
                f"mask.shape={tuple(mask.shape)}"
            )
        return ops.cast(mask, "bool")

    def _zero_padding(self, values, token_mask):
        """`values [..., d]` with the padding tokens' rows set to zero."""
        if token_mask is None:
            return values
        return ops.where(
            ops.expand_dims(token_mask, -1), values, ops.zeros((), values.dtype)
        )

    @staticmethod
    def _has_no_tokens(shape):
        """Whether a leading dimension is statically 0: nothing to route.

        An empty batch or sequence gets an empty output, adds no loss and
        records no statistics (a gather from an empty axis, or a maximum
        over one, fails on every backend). Checked on the static shape, so
        it costs nothing per call.
        """
        return any(isinstance(dim, int) and dim == 0 for dim in shape[:-1])

    def _prepare_inputs(self, inputs, mask):
        """Checked inputs with zeroed padding, and the token mask.

        Padding may hold anything (even NaN); zeroing it keeps it out of the
        router's math, every sum over tokens and the gradients.

        Returns:
            `(tokens, token_mask)`: `tokens` of the shape of `inputs`,
            `token_mask` bool of its leading dimensions, or None.
        """
        self._check_input_shape(inputs.shape)
        token_mask = self._token_mask(inputs, mask)
        check_finite(inputs, token_mask, layer=self)
        return self._zero_padding(inputs, token_mask), token_mask

    # Routing groups --------------------------------------------------------

    def _group_tokens(self, tokens, token_mask):
        """Tokens `[..., d]` as `G` routing groups `[G, T, d]`.

        One group holds every token of the batch or, under a
        `keras.distribution` that splits the experts, one group per data
        shard (capacity is then per group; see
        `keras_moe.distribution.expert_parallel`).

        Returns:
            `(tokens [G, T, d], token_mask [G, T] or None, groups)`, with
            `groups` the `RoutingGroups` (None for a single group) that
            `_run_experts` needs.
        """
        groups = expert_parallel.routing_groups(self.experts, tokens.shape)
        num_groups = 1 if groups is None else groups.num_groups
        grouped = ops.reshape(tokens, (num_groups, -1, self.hidden_dim))
        grouped = expert_parallel.constrain_groups(grouped, groups)
        if token_mask is not None:
            token_mask = ops.reshape(token_mask, (num_groups, -1))
        return grouped, token_mask, groups

    def _run_experts(self, buffers, groups, training=None):
        """The expert bank on dispatched buffers `[G, E, C, d]`.

        With several routing groups, the buffers travel to the devices that
        hold their experts and back (two all-to-alls).
        """
        if groups is not None:
            return expert_parallel.run_experts(
                self.experts, buffers, groups, training=training
            )
        return ops.expand_dims(self.experts(buffers[0], training=training), 0)

    # Statistics ------------------------------------------------------------

    def _observe(self, training, compute_stats):
        """Record this call's statistics (`compute_stats()`), if tracked."""
        if self.router_stats is not None:
            self.router_stats.observe(self, training, compute_stats)

    # Config ----------------------------------------------------------------

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        # The expert arguments are stored once, in the expert bank.
        expert_config = self.experts.get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "track_router_stats": self.track_router_stats,
                "expert_dropout": self.expert_dropout,
            }
        )
        config.update({key: expert_config[key] for key in EXPERT_ARGUMENTS})
        return config
