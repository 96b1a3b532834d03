from typing import NamedTuple

import keras
from keras import ops

from keras_moe.layers.moe_layer import MoELayer
from keras_moe.ops.router_stats import SOFT
from keras_moe.ops.router_stats import soft_routing_stats
from keras_moe.utils.argument_validation import check_int

# Added under the square root of the L2 normalisation, so that an all-zero
# vector (a padding token) normalises to zero with finite gradients.
_L2_EPSILON = 1e-6

# Stands for -inf in the dispatch softmax: finite, so that a sequence whose
# tokens are all padding gives uniform (then masked to zero) weights, not NaN.
_MASKED_LOGIT = -1e9


class SoftRouting(NamedTuple):
    """How a `SoftMoE` mixes the tokens of each sequence into slots and back.

    Slots are numbered expert-major: slot `e * slots_per_expert + s` is slot
    `s` of expert `e`. All tensors are `[batch, tokens, num_slots]` in the
    router dtype (float32, or float64 under a float64 policy).

    Attributes:
        router_logits: scaled cosine similarities of tokens and slot
            parameters.
        dispatch_weights: softmax over the (real) tokens of a sequence, per
            slot: each slot's input is a convex mix of tokens. Zero on padding.
        combine_weights: softmax over all slots, per token: each token's
            output is a convex mix of slot outputs. Zero on padding.
    """

    router_logits: object
    dispatch_weights: object
    combine_weights: object


def _l2_normalize(x, axis):
    return x * ops.rsqrt(
        ops.sum(ops.square(x), axis=axis, keepdims=True) + _L2_EPSILON
    )


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftMoE(MoELayer):
    """Soft Mixture-of-Experts layer (Puigcerver et al. 2023).

    Instead of routing each token to a few experts, every expert processes a
    few *slots*, and each slot is a weighted average of all the tokens of a
    sequence. With `S = slots_per_expert` and `E * S` slots, each slot `n` has
    a learned parameter vector `phi_n`; the router logits are the cosine
    similarities of tokens and slot parameters times a learned scalar `scale`
    (initialised to 1). Dispatch weights are their softmax over the tokens of
    a sequence (per slot), combine weights their softmax over all slots (per
    token):

    ```
    slot_inputs [batch, E, S, d] = dispatch_weights^T @ tokens
    slot_outputs = Experts(slot_inputs)     # the same bank as SparseMoE
    outputs [batch, tokens, d]   = combine_weights @ slot_outputs
    ```

    Nothing is discrete, so there is no token dropping, no load imbalance and
    no auxiliary loss, and the layer is fully differentiable. The experts
    process `E * S` slots per sequence whatever the number of tokens; the
    dispatch and combine einsums cost `O(tokens * E * S * d)`.

    This layer is for encoders only: every slot mixes all the tokens of a
    sequence, so each token's output depends on every other token of its
    sequence, including later ones. It cannot be used in a causal decoder.

    Router math (normalisation, logits and both softmaxes) runs in float32
    (float64 under a float64 policy) whatever the dtype policy; the experts
    and the two mixing einsums run in the policy's compute dtype. Padding
    tokens (a Keras mask, or the `mask` call argument) take no part in the
    dispatch softmax, whatever values they hold, and get a zero output.

    With `track_router_stats=True` each training call records statistics of
    the dispatch and combine weights (their entropies and largest weights,
    each expert's share of the combine weight; see
    `keras_moe.ops.router_stats`) in `layer.router_stats`, which
    `keras_moe.callbacks` reads together with the learned `scale`.

    Args:
        num_experts: int, the number of experts `E`.
        intermediate_dim: int, the hidden width of each expert.
        slots_per_expert: int >= 1, the slots `S` each expert processes per
            sequence. Defaults to 1.
        activation: the experts' activation. Defaults to `"silu"`.
        gated: bool, GLU experts (SwiGLU/GeGLU) when True, plain
            feed-forward experts when False. Defaults to True.
        use_bias: bool, whether expert projections have biases.
        kernel_initializer: initializer of the expert kernels.
        bias_initializer: initializer of the expert biases.
        slot_initializer: initializer of the slot parameters `slot_kernel`,
            `[d, E * S]` (column `e * S + s` is slot `s` of expert `e`).
            Defaults to `"lecun_normal"`.
        track_router_stats: bool, record routing statistics in training
            calls. Defaults to True.
        expert_dropout: float in `[0, 1)`, dropout on each expert's hidden
            activation in training. Defaults to 0.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[batch, tokens, d]`.
        mask: optional bool `[batch, tokens]`, False for padding tokens.
            Propagated Keras masks are used automatically.
        training: bool, turns on `expert_dropout`; training calls record
            router statistics.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    >>> import numpy as np
    >>> moe = SoftMoE(num_experts=8, intermediate_dim=64, slots_per_expert=2)
    >>> x = np.random.normal(size=(2, 10, 32)).astype("float32")
    >>> tuple(moe(x).shape)
    (2, 10, 32)
    >>> routing = moe.compute_routing(x)
    >>> tuple(routing.dispatch_weights.shape)
    (2, 10, 16)
    """

    stats_kind = SOFT
    input_rank = 3

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        slots_per_expert=1,
        *,
        activation="silu",
        gated=True,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        slot_initializer="lecun_normal",
        track_router_stats=True,
        expert_dropout=0.0,
        **kwargs,
    ):
        super().__init__(
            num_experts,
            intermediate_dim,
            track_router_stats=track_router_stats,
            expert_dropout=expert_dropout,
            **kwargs,
        )
        self.slots_per_expert = check_int(
            "slots_per_expert", slots_per_expert, min_value=1
        )
        self.num_slots = self.num_experts * self.slots_per_expert
        self.slot_initializer = keras.initializers.get(slot_initializer)
        self.experts = self._make_experts(
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
        )

    def _build_router(self, hidden_dim):
        # Router weights stay in the router dtype and are never autocast to
        # the compute dtype.
        self.slot_kernel = self.add_weight(
            name="slot_kernel",
            shape=(hidden_dim, self.num_slots),
            initializer=self.slot_initializer,
            dtype=self.router_dtype,
            autocast=False,
        )
        self.scale = self.add_weight(
            name="scale",
            shape=(),
            initializer="ones",
            dtype=self.router_dtype,
            autocast=False,
        )

    def _expert_input_shape(self):
        return (None, self.num_experts, self.slots_per_expert, self.hidden_dim)

    def _stats_readouts(self):
        return {"scale": self.scale}

    def _routing(self, tokens, token_mask):
        """`SoftRouting` for tokens whose padding is already zeroed."""
        tokens = ops.cast(tokens, self.router_dtype)
        logits = ops.einsum(
            "btd,dn->btn",
            _l2_normalize(tokens, axis=-1),
            _l2_normalize(ops.convert_to_tensor(self.slot_kernel), axis=0),
        )
        logits = logits * ops.cast(self.scale, self.router_dtype)
        if token_mask is None:
            dispatch_weights = ops.softmax(logits, axis=1)
            combine_weights = ops.softmax(logits, axis=-1)
        else:
            real = ops.expand_dims(token_mask, -1)
            zeros = ops.zeros((), self.router_dtype)
            dispatch_weights = ops.softmax(
                ops.where(real, logits, ops.full((), _MASKED_LOGIT, logits.dtype)),
                axis=1,
            )
            dispatch_weights = ops.where(real, dispatch_weights, zeros)
            combine_weights = ops.where(
                real, ops.softmax(logits, axis=-1), zeros
            )
        return SoftRouting(
            router_logits=logits,
            dispatch_weights=dispatch_weights,
            combine_weights=combine_weights,
        )

    def compute_routing(self, inputs, mask=None):
        """The router's logits, dispatch and combine weights for `inputs`.

        Args:
            inputs: `[batch, tokens, d]`.
            mask: optional bool `[batch, tokens]`, False for padding.

        Returns:
            A `SoftRouting` of `[batch, tokens, E * S]` tensors in the router
            dtype.
        """
        inputs = ops.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        tokens, token_mask = self._prepare_inputs(inputs, mask)
        return self._routing(tokens, token_mask)

    def call(self, inputs, mask=None, training=None):
        # Soft routing has no capacity, noise or loss: `training` only
        # turns on the experts' dropout (and the statistics).
        tokens, token_mask = self._prepare_inputs(inputs, mask)
        routing = self._routing(tokens, token_mask)
        if not self._has_no_tokens(inputs.shape):
            self._observe(
                training,
                lambda: soft_routing_stats(
                    routing.dispatch_weights,
                    routing.combine_weights,
                    self.num_experts,
                    token_mask,
                ),
            )

        dispatch_weights = ops.cast(routing.dispatch_weights, tokens.dtype)
        slot_inputs = ops.einsum("btn,btd->bnd", dispatch_weights, tokens)
        slot_inputs = ops.reshape(
            slot_inputs,
            (-1, self.num_experts, self.slots_per_expert, self.hidden_dim),
        )
        slot_outputs = self.experts(slot_inputs, training=training)
        slot_outputs = ops.reshape(
            slot_outputs, (-1, self.num_slots, self.hidden_dim)
        )
        combine_weights = ops.cast(routing.combine_weights, slot_outputs.dtype)
        return ops.einsum("btn,bnd->btd", combine_weights, slot_outputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "slots_per_expert": self.slots_per_expert,
                "slot_initializer": keras.initializers.serialize(
                    self.slot_initializer
                ),
            }
        )
        return config
