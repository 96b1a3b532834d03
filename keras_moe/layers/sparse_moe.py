import keras
from keras import ops

from keras_moe.layers.experts import Experts
from keras_moe.layers.top_k_router import TopKRouter
from keras_moe.ops.dispatch import combine
from keras_moe.ops.dispatch import compute_dispatch_plan
from keras_moe.ops.dispatch import dispatch
from keras_moe.ops.dispatch import expert_capacity
from keras_moe.ops.router_losses import load_balancing_loss
from keras_moe.ops.router_losses import router_z_loss
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int


def router_dtype_for(dtype_policy):
    """Routers compute in float32, or float64 when the layer is float64."""
    if dtype_policy.compute_dtype == "float64":
        return "float64"
    return "float32"


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMoE(keras.layers.Layer):
    """Sparsely-gated Mixture-of-Experts feed-forward layer (top-k routing).

    Each token is sent to the `top_k` experts its router scores highest and
    its output is the weighted sum of their outputs. Tokens are sorted into
    per-expert buffers of `capacity` slots, the experts run as one batched
    einsum over those buffers, and results are gathered back: the compute is
    `capacity_factor` times that of a dense feed-forward layer of
    `top_k * intermediate_dim` units, whatever `num_experts` is.

    Capacity per expert is `C = ceil(capacity_factor * tokens * top_k /
    num_experts)`. First choices win capacity before second choices; a choice
    that finds its expert full is dropped (it contributes zero, and the
    residual connection around the layer carries the token). With
    `capacity_factor=None` nothing is ever dropped.

    During training the layer adds the Switch Transformer load-balancing loss
    (`aux_loss_weight * E * sum_i f_i * P_i`) and the ST-MoE router z-loss
    (`z_loss_weight * mean(logsumexp(logits)^2)`) with `add_loss`. Padding
    tokens (a Keras mask, or the `mask` call argument) are not routed, take no
    capacity, count in no loss, and get a zero output.

    Args:
        num_experts: int, the number of experts `E`.
        intermediate_dim: int, the hidden width of each expert.
        top_k: int in `[1, num_experts]`, experts per token. Defaults to 2.
        capacity_factor: positive float, or `None` for dropless routing.
            Used in training. Defaults to 1.25.
        eval_capacity_factor: positive float, the capacity factor outside
            training. Ignored (dropless) when `capacity_factor` is `None`.
            Defaults to 2.0.
        activation: the experts' activation. Defaults to `"silu"`.
        gated: bool, GLU experts (SwiGLU/GeGLU) when True, plain
            feed-forward experts when False. Defaults to True.
        normalize_top_k: bool, renormalise the `top_k` weights to sum to 1.
        aux_loss_weight: float >= 0, weight α of the load-balancing loss.
        z_loss_weight: float >= 0, weight of the router z-loss.
        use_bias: bool, whether expert projections have biases.
        kernel_initializer: initializer of the expert kernels.
        bias_initializer: initializer of the expert biases.
        router_initializer: initializer of the router kernel.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., d]`, any number of leading dimensions.
        mask: optional bool `[...]` (the leading dimensions), False for
            padding tokens. Propagated Keras masks are used automatically.
        training: bool, selects the capacity factor and adds the losses.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    >>> import numpy as np
    >>> moe = SparseMoE(num_experts=8, intermediate_dim=64, top_k=2)
    >>> x = np.random.normal(size=(2, 10, 32)).astype("float32")
    >>> tuple(moe(x).shape)
    (2, 10, 32)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        top_k=2,
        *,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        activation="silu",
        gated=True,
        normalize_top_k=True,
        aux_loss_weight=0.01,
        z_loss_weight=0.0,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, min_value=1)
        self.intermediate_dim = check_int(
            "intermediate_dim", intermediate_dim, min_value=1
        )
        self.top_k = check_int(
            "top_k", top_k, min_value=1, max_value=self.num_experts
        )
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
        self.supports_masking = True

        self.router = TopKRouter(
            num_experts=self.num_experts,
            top_k=self.top_k,
            normalize_top_k=normalize_top_k,
            kernel_initializer=router_initializer,
            dtype=router_dtype_for(self.dtype_policy),
            name="router",
        )
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

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"`{type(self).__name__}` expects inputs of shape [..., "
                "hidden_dim] with rank >= 2 and a known last dimension. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.hidden_dim = int(input_shape[-1])
        self.router.build((None, self.hidden_dim))
        self.experts.build((self.num_experts, None, self.hidden_dim))

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
        # One routing group holding every token of the batch.
        tokens = ops.reshape(inputs, (1, -1, self.hidden_dim))
        num_tokens = tokens.shape[1]
        if num_tokens is None:
            num_tokens = ops.shape(tokens)[1]
        token_mask = None
        if mask is not None:
            token_mask = ops.reshape(ops.cast(mask, "bool"), (1, -1))
            # Padding may hold anything (even NaN); zeroing it keeps it out
            # of the router's math and its gradients.
            tokens = ops.where(
                ops.expand_dims(token_mask, -1), tokens, ops.zeros((), tokens.dtype)
            )

        routing = self.router(tokens)
        capacity_factor = self._capacity_factor(training)
        capacity = None  # Dropless: sized by the dispatch plan.
        if capacity_factor is not None:
            capacity = expert_capacity(
                num_tokens, self.num_experts, self.top_k, capacity_factor
            )
        plan = compute_dispatch_plan(
            routing.expert_ids, self.num_experts, capacity, token_mask
        )
        buffers = dispatch(tokens, plan)
        expert_outputs = ops.expand_dims(self.experts(buffers[0]), 0)
        outputs = combine(expert_outputs, plan, routing.expert_weights)
        if training:
            self._add_router_losses(routing, plan, token_mask)
        return ops.reshape(outputs, ops.shape(inputs))

    def _add_router_losses(self, routing, plan, token_mask):
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

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        # The expert and router arguments are stored once, in the sublayers.
        expert_config = self.experts.get_config()
        router_config = self.router.get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "top_k": self.top_k,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "normalize_top_k": router_config["normalize_top_k"],
                "router_initializer": router_config["kernel_initializer"],
                "aux_loss_weight": self.aux_loss_weight,
                "z_loss_weight": self.z_loss_weight,
            }
        )
        for key in (
            "activation",
            "gated",
            "use_bias",
            "kernel_initializer",
            "bias_initializer",
        ):
            config[key] = expert_config[key]
        return config
