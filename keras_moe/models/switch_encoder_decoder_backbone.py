"""`SwitchEncoderDecoderBackbone`: the Switch Transformer encoder-decoder."""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.models.switch_transformer_block import SwitchTransformerBlock
from keras_moe.models.switch_transformer_block import is_sparse_layer
from keras_moe.models.t5_relative_position_bias import T5RelativePositionBias
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.argument_validation import check_rate

CONFIG_KEYS = (
    "vocabulary_size",
    "num_layers",
    "num_decoder_layers",
    "hidden_dim",
    "num_heads",
    "key_value_dim",
    "intermediate_dim",
    "num_experts",
    "expert_intermediate_dim",
    "encoder_sparse_step",
    "decoder_sparse_step",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "activation",
    "gated_feedforward",
    "dropout",
    "expert_dropout",
    "layer_norm_epsilon",
    "capacity_factor",
    "eval_capacity_factor",
    "router_jitter",
    "aux_loss_weight",
    "z_loss_weight",
    "tie_word_embeddings",
    "expert_kernel",
)


@keras.saving.register_keras_serializable(package="keras_moe")
class SwitchEncoderDecoderBackbone(Backbone):
    """The Switch Transformer encoder-decoder (T5 v1.0 with Switch layers).

    A shared token embedding (T5 adds no position embedding), an encoder
    of `num_layers` `SwitchTransformerBlock`s and a decoder of
    `num_decoder_layers` blocks with cross-attention, each stack ending in
    a T5 layer norm. Position enters through T5's bucketed relative
    position bias, computed once per stack (bidirectional in the encoder,
    causal in the decoder) and added to the scores of every self-attention
    layer of that stack. Every `encoder_sparse_step`-th encoder block and
    every `decoder_sparse_step`-th decoder block has a Switch layer (a
    top-1 `SparseMoE` of `num_experts` ReLU experts) instead of the dense
    ReLU feed-forward block; which ones follows Hugging Face's rule (see
    `is_sparse_layer`: blocks 1, 1 + step, ... or all with step 1).

    The Switch layers add their load-balancing and z-losses with
    `add_loss`, one per layer (Hugging Face's `SwitchTransformers` pools the
    router outputs of all layers of a stack into one loss per stack
    instead; the two agree for one sparse layer per stack).

    Inputs are `{"encoder_token_ids", "encoder_padding_mask",
    "decoder_token_ids", "decoder_padding_mask"}`; outputs
    `{"encoder_sequence_output", "decoder_sequence_output"}` (keras-hub's
    T5 and BART layout). Padding tokens are not attended to and not
    routed.

    Args:
        vocabulary_size: int, the number of token ids.
        num_layers: int, encoder blocks.
        hidden_dim: int, the model width `d`.
        num_heads: int, attention heads.
        intermediate_dim: int, the dense feed-forward width.
        num_experts: int, experts per Switch layer.
        num_decoder_layers: int, decoder blocks (defaults to `num_layers`).
        key_value_dim: int, per-head width (defaults to
            `hidden_dim // num_heads`).
        expert_intermediate_dim: int, each expert's width (defaults to
            `intermediate_dim`).
        encoder_sparse_step: int >= 0, see above (0: no Switch layer).
        decoder_sparse_step: int >= 0, the same for the decoder.
        relative_attention_num_buckets: int, relative position buckets.
        relative_attention_max_distance: int, the distance from which all
            positions share a bucket.
        activation: the feed-forward activation. Defaults to `"relu"`.
        gated_feedforward: bool, GLU feed-forward blocks and experts
            (Switch-XXL's gated GELU) instead of plain ones (T5 v1.0).
        dropout: float in `[0, 1)`, on the embeddings, residual branches,
            attention probabilities, dense feed-forward activations and
            stack outputs.
        expert_dropout: float in `[0, 1)`, on the experts' hidden
            activations (the Switch paper's "expert dropout": 0.4 when
            fine-tuning, with `dropout=0.1`). Defaults to `dropout`.
        layer_norm_epsilon: float, the layer norms' epsilon.
        capacity_factor: float or None, the Switch layers' training
            capacity factor (1.25 in the Switch paper).
        eval_capacity_factor: float or None, outside training (2.0).
        router_jitter: float in `[0, 1)`, the router input noise (0.01).
        aux_loss_weight: float, weight of each layer's load-balancing loss.
        z_loss_weight: float, weight of each layer's router z-loss.
        tie_word_embeddings: bool, the output projection is the input
            embedding (with logits scaled by `hidden_dim ** -0.5`).
        expert_kernel: see `SparseMoE`.
        dtype: the dtype policy.
        **kwargs: base `keras_hub.models.Backbone` arguments (`name`, ...).

    Example:

    >>> import numpy as np
    >>> backbone = SwitchEncoderDecoderBackbone(
    ...     vocabulary_size=32, num_layers=2, hidden_dim=8, num_heads=2,
    ...     intermediate_dim=16, num_experts=4)
    >>> inputs = {
    ...     "encoder_token_ids": np.ones((2, 6), "int32"),
    ...     "encoder_padding_mask": np.ones((2, 6), "int32"),
    ...     "decoder_token_ids": np.ones((2, 3), "int32"),
    ...     "decoder_padding_mask": np.ones((2, 3), "int32"),
    ... }
    >>> outputs = backbone(inputs)
    >>> tuple(outputs["decoder_sequence_output"].shape)
    (2, 3, 8)
    >>> [block.is_sparse for block in backbone.encoder_layers]
    [False, True]
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        num_heads,
        intermediate_dim,
        num_experts,
        num_decoder_layers=None,
        key_value_dim=None,
        expert_intermediate_dim=None,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        activation="relu",
        gated_feedforward=False,
        dropout=0.0,
        expert_dropout=None,
        layer_norm_epsilon=1e-6,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        router_jitter=0.01,
        aux_loss_weight=0.01,
        z_loss_weight=0.001,
        tie_word_embeddings=True,
        expert_kernel="auto",
        dtype=None,
        **kwargs,
    ):
        vocabulary_size = check_int("vocabulary_size", vocabulary_size, min_value=1)
        num_layers = check_int("num_layers", num_layers, min_value=1)
        if num_decoder_layers is None:
            num_decoder_layers = num_layers
        num_decoder_layers = check_int(
            "num_decoder_layers", num_decoder_layers, min_value=1
        )
        hidden_dim = check_int("hidden_dim", hidden_dim, min_value=1)
        num_heads = check_int("num_heads", num_heads, min_value=1)
        if key_value_dim is None:
            if hidden_dim % num_heads:
                raise ValueError(
                    "`hidden_dim` must be divisible by `num_heads` when "
                    f"`key_value_dim` is not given. Received: hidden_dim="
                    f"{hidden_dim}, num_heads={num_heads}"
                )
            key_value_dim = hidden_dim // num_heads
        key_value_dim = check_int("key_value_dim", key_value_dim, min_value=1)
        intermediate_dim = check_int("intermediate_dim", intermediate_dim, min_value=1)
        num_experts = check_int("num_experts", num_experts, min_value=1)
        expert_intermediate_dim = check_int(
            "expert_intermediate_dim",
            expert_intermediate_dim or intermediate_dim,
            min_value=1,
        )
        encoder_sparse_step = check_int(
            "encoder_sparse_step", encoder_sparse_step, min_value=0
        )
        decoder_sparse_step = check_int(
            "decoder_sparse_step", decoder_sparse_step, min_value=0
        )
        relative_attention_num_buckets = check_int(
            "relative_attention_num_buckets",
            relative_attention_num_buckets,
            min_value=2,
        )
        relative_attention_max_distance = check_int(
            "relative_attention_max_distance",
            relative_attention_max_distance,
            min_value=2,
        )
        dropout = check_rate("dropout", dropout)
        expert_dropout = check_rate(
            "expert_dropout", dropout if expert_dropout is None else expert_dropout
        )
        gated_feedforward = check_bool("gated_feedforward", gated_feedforward)
        tie_word_embeddings = check_bool("tie_word_embeddings", tie_word_embeddings)

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=tie_word_embeddings,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
            dtype=dtype,
            name="token_embedding",
        )
        self.embeddings_dropout = keras.layers.Dropout(
            dropout, dtype=dtype, name="embeddings_dropout"
        )

        def stack(prefix, count, sparse_step, is_decoder):
            return [
                SwitchTransformerBlock(
                    num_heads=num_heads,
                    key_value_dim=key_value_dim,
                    intermediate_dim=intermediate_dim,
                    is_decoder=is_decoder,
                    num_experts=(
                        num_experts if is_sparse_layer(i, sparse_step) else None
                    ),
                    expert_intermediate_dim=expert_intermediate_dim,
                    activation=activation,
                    gated=gated_feedforward,
                    dropout=dropout,
                    expert_dropout=expert_dropout,
                    layer_norm_epsilon=layer_norm_epsilon,
                    capacity_factor=capacity_factor,
                    eval_capacity_factor=eval_capacity_factor,
                    router_jitter=router_jitter,
                    aux_loss_weight=aux_loss_weight,
                    z_loss_weight=z_loss_weight,
                    expert_kernel=expert_kernel,
                    dtype=dtype,
                    name=f"{prefix}_block_{i}",
                )
                for i in range(count)
            ]

        def position_bias(prefix, bidirectional):
            return T5RelativePositionBias(
                num_heads=num_heads,
                num_buckets=relative_attention_num_buckets,
                max_distance=relative_attention_max_distance,
                bidirectional=bidirectional,
                dtype=dtype,
                name=f"{prefix}_relative_position_bias",
            )

        self.encoder_relative_position_bias = position_bias("encoder", True)
        self.encoder_layers = stack("encoder", num_layers, encoder_sparse_step, False)
        self.encoder_layer_norm = RMSNormalization(
            layer_norm_epsilon, dtype=dtype, name="encoder_final_norm"
        )
        self.decoder_relative_position_bias = position_bias("decoder", False)
        self.decoder_layers = stack(
            "decoder", num_decoder_layers, decoder_sparse_step, True
        )
        self.decoder_layer_norm = RMSNormalization(
            layer_norm_epsilon, dtype=dtype, name="decoder_final_norm"
        )
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=dtype, name="output_dropout"
        )

        # === Functional model ===
        encoder_token_ids = keras.Input(
            shape=(None,), dtype="int32", name="encoder_token_ids"
        )
        encoder_padding_mask = keras.Input(
            shape=(None,), dtype="int32", name="encoder_padding_mask"
        )
        decoder_token_ids = keras.Input(
            shape=(None,), dtype="int32", name="decoder_token_ids"
        )
        decoder_padding_mask = keras.Input(
            shape=(None,), dtype="int32", name="decoder_padding_mask"
        )
        encoder_output = self._encode(encoder_token_ids, encoder_padding_mask)
        x = self.embeddings_dropout(self.token_embedding(decoder_token_ids))
        bias = self.decoder_relative_position_bias(x)
        for block in self.decoder_layers:
            x = block(
                x,
                padding_mask=decoder_padding_mask,
                position_bias=bias,
                encoder_outputs=encoder_output,
                encoder_padding_mask=encoder_padding_mask,
            )
        decoder_output = self.output_dropout(self.decoder_layer_norm(x))
        super().__init__(
            inputs={
                "encoder_token_ids": encoder_token_ids,
                "encoder_padding_mask": encoder_padding_mask,
                "decoder_token_ids": decoder_token_ids,
                "decoder_padding_mask": decoder_padding_mask,
            },
            outputs={
                "encoder_sequence_output": encoder_output,
                "decoder_sequence_output": decoder_output,
            },
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_decoder_layers = num_decoder_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.key_value_dim = key_value_dim
        self.intermediate_dim = intermediate_dim
        self.num_experts = num_experts
        self.expert_intermediate_dim = expert_intermediate_dim
        self.encoder_sparse_step = encoder_sparse_step
        self.decoder_sparse_step = decoder_sparse_step
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.activation = activation
        self.gated_feedforward = gated_feedforward
        self.dropout = dropout
        self.expert_dropout = expert_dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router_jitter = router_jitter
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.tie_word_embeddings = tie_word_embeddings
        self.expert_kernel = expert_kernel

    def _encode(self, token_ids, padding_mask, training=None):
        x = self.embeddings_dropout(self.token_embedding(token_ids), training=training)
        bias = self.encoder_relative_position_bias(x)
        for block in self.encoder_layers:
            x = block(
                x, padding_mask=padding_mask, position_bias=bias, training=training
            )
        return self.output_dropout(self.encoder_layer_norm(x), training=training)

    def encode(self, token_ids, padding_mask):
        """The encoder stack's outputs `[batch, length, hidden_dim]`.

        Args:
            token_ids: int `[batch, length]`.
            padding_mask: `[batch, length]`, truthy for real tokens.

        Returns:
            The encoder outputs, after the final layer norm.
        """
        return self._encode(token_ids, padding_mask)

    def logits(self, hidden_states):
        """Vocabulary logits of decoder outputs.

        With tied embeddings the outputs are scaled by `hidden_dim ** -0.5`
        first (T5 v1.0 and Switch Transformer).

        Args:
            hidden_states: `[..., hidden_dim]`, decoder outputs.

        Returns:
            `[..., vocabulary_size]`.
        """
        if self.tie_word_embeddings:
            hidden_states = hidden_states * ops.cast(
                self.hidden_dim**-0.5, hidden_states.dtype
            )
        return self.token_embedding(hidden_states, reverse=True)

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in CONFIG_KEYS})
        return config
