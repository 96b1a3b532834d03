import keras
from keras import ops

from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int


@keras.saving.register_keras_serializable(package="keras_moe")
class SharedExpertMoE(SparseMoE):
    """Routed experts plus always-on shared experts (DeepSeekMoE, Qwen-MoE).

    The output is `SparseMoE(x) + shared(x)`: every token goes through the
    shared expert(s), which learn what all tokens need, so the routed
    experts can specialise (Dai et al. 2024, DeepSeekMoE). `N` shared experts
    of width `f` are one feed-forward block of width `N * f` (their outputs
    are summed), which is how they are stored. With
    `shared_expert_gate=True` the shared output is scaled per token by
    `sigmoid(x @ shared_gate_kernel)`, as in Qwen-MoE.

    All routing options of `SparseMoE` apply to the routed experts; padding
    tokens get a zero output from both parts.

    Args:
        num_experts: int, the number of routed experts.
        intermediate_dim: int, the hidden width of each routed expert.
        num_shared_experts: int >= 1, the number of shared experts.
        shared_intermediate_dim: int, the total hidden width of the shared
            experts. Defaults to `num_shared_experts * intermediate_dim`.
        shared_expert_gate: bool, scale the shared output by a learned
            per-token sigmoid gate.
        **sparse_moe_options: the keyword arguments of `SparseMoE` (`top_k`,
            `capacity_factor`, `score_function`, `activation`, ...). The
            shared experts use the same `activation`, `gated`, `use_bias`,
            initializers and `expert_dropout` as the routed ones.

    Call arguments:
        inputs: `[..., d]`.
        mask: optional bool `[...]`, False for padding tokens.
        training: bool.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    DeepSeek-V2-Lite-style layer: 64 fine-grained experts, top-6, two
    shared experts.

    >>> import numpy as np
    >>> moe = SharedExpertMoE(
    ...     num_experts=64, intermediate_dim=16, num_shared_experts=2, top_k=6)
    >>> x = np.random.normal(size=(2, 10, 32)).astype("float32")
    >>> tuple(moe(x).shape)
    (2, 10, 32)
    >>> tuple(moe.shared_experts.up_kernel.shape)
    (32, 32)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        num_shared_experts=1,
        *,
        shared_intermediate_dim=None,
        shared_expert_gate=False,
        **sparse_moe_options,
    ):
        super().__init__(num_experts, intermediate_dim, **sparse_moe_options)
        self.num_shared_experts = check_int(
            "num_shared_experts", num_shared_experts, min_value=1
        )
        if shared_intermediate_dim is None:
            shared_intermediate_dim = self.num_shared_experts * self.intermediate_dim
        self.shared_intermediate_dim = check_int(
            "shared_intermediate_dim", shared_intermediate_dim, min_value=1
        )
        self.shared_expert_gate = check_bool(
            "shared_expert_gate", shared_expert_gate
        )
        self.shared_experts = FeedForward(
            self.shared_intermediate_dim,
            activation=self.experts.activation,
            gated=self.experts.gated,
            use_bias=self.experts.use_bias,
            kernel_initializer=self.experts.kernel_initializer,
            bias_initializer=self.experts.bias_initializer,
            dropout=self.expert_dropout,
            dtype=self.dtype_policy,
            name="shared_experts",
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.shared_experts.build((None, self.hidden_dim))
        if self.shared_expert_gate:
            self.shared_gate_kernel = self.add_weight(
                name="shared_gate_kernel",
                shape=(self.hidden_dim, 1),
                initializer=self.experts.kernel_initializer,
            )

    def call(self, inputs, mask=None, training=None):
        routed = super().call(inputs, mask=mask, training=training)
        token_mask = self._token_mask(inputs, mask)
        # Padding may hold anything (even NaN): zeroed before the shared
        # experts, it reaches neither outputs nor gradients.
        tokens = self._zero_padding(inputs, token_mask)
        shared = self.shared_experts(tokens, training=training)
        if self.shared_expert_gate:
            gate = ops.sigmoid(ops.matmul(tokens, self.shared_gate_kernel))
            shared = shared * gate
        return routed + self._zero_padding(shared, token_mask)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_shared_experts": self.num_shared_experts,
                "shared_intermediate_dim": self.shared_intermediate_dim,
                "shared_expert_gate": self.shared_expert_gate,
            }
        )
        return config
