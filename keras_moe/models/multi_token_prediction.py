"""Multi-token prediction (DeepSeek-V3, arXiv:2412.19437, section 2.2).

`D` sequential modules after the main model. Module `k` (1-based) combines
the previous depth's representation of token `i` (the main model's for
`k = 1`) with the embedding of token `i + k`, runs one decoder block and
predicts token `i + k + 1` through the main model's output head:

    h'_i = eh_proj([RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(h_i)])
    h_i  = Block(h'_i)
    p_i  = Head(RMSNorm_head(h_i))

The embedding and the output head are the main model's. The training loss
is `mtp_loss_weight / D * sum_k L_k`, `L_k` the mean cross-entropy of depth
`k` over the positions whose target is a real token. The modules only run
in training: inference and generation use the main model alone.

The concatenation puts the embedding first, the order of DeepSeek-V3's
released `eh_proj` weights (vLLM and Megatron-LM concatenate the same way);
the paper writes the two halves the other way round.
"""

import keras
from keras import ops

from keras_moe.models.moe_decoder_block import MoEDecoderBlock
from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int


def shifted_left(values, shift):
    """`values[:, shift:]`, padded with zeros at the end to its length.

    Args:
        values: `[batch, length, ...]`.
        shift: int >= 0.

    Returns:
        A tensor of the shape of `values`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> ops.convert_to_numpy(shifted_left(np.array([[1, 2, 3, 4]]), 2)).tolist()
    [[3, 4, 0, 0]]
    """
    if shift == 0:
        return values
    # Padded first, so that the length holds even for sequences shorter
    # than `shift` and for lengths known only at run time.
    padding = [[0, 0], [0, shift]] + [[0, 0]] * (len(values.shape) - 2)
    return ops.pad(values, padding)[:, shift:]


def multi_token_prediction_loss(logits, token_ids, padding_mask, depth):
    """The mean cross-entropy of depth `depth`'s predictions.

    Position `i` of `logits` predicts token `i + depth + 1`; positions whose
    target is beyond the sequence or padding are left out.

    Args:
        logits: float `[batch, length, vocabulary_size]`.
        token_ids: int `[batch, length]`, the inputs of the main model.
        padding_mask: `[batch, length]`, truthy for real tokens.
        depth: int >= 1.

    Returns:
        A float32 scalar (0 when no position has a target).

    Example:

    >>> import numpy as np
    >>> logits = np.zeros((1, 4, 8), "float32")  # uniform over 8 tokens
    >>> loss = multi_token_prediction_loss(
    ...     logits, np.array([[1, 2, 3, 4]]), np.ones((1, 4)), depth=1)
    >>> round(float(loss), 4) == round(float(np.log(8)), 4)
    True
    """
    targets = shifted_left(ops.convert_to_tensor(token_ids, "int32"), depth + 1)
    weights = shifted_left(
        ops.cast(ops.convert_to_tensor(padding_mask), "float32"), depth + 1
    )
    losses = keras.losses.sparse_categorical_crossentropy(
        targets, ops.cast(logits, "float32"), from_logits=True
    )
    return ops.sum(losses * weights) / ops.maximum(ops.sum(weights), 1.0)


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiTokenPredictionBlock(MoEDecoderBlock):
    """One multi-token prediction module: a decoder block with its inputs.

    The block type of the main model's layers (`MoEDecoderBlock`), with an
    `enorm` and an `hnorm` RMSNorm on the token embedding and the previous
    representation, the `eh_proj` projection of their concatenation
    (`[2d, d]`, no bias) in front, and the `head_norm` RMSNorm that the
    output head applies to its result (DeepSeek-V3's `shared_head.norm`).

    Weights: the block's, plus `enorm/scale [d]`, `hnorm/scale [d]`,
    `eh_proj/kernel [2d, d]` and `head_norm/scale [d]`.

    Args:
        attention: the attention layer, as for `MoEDecoderBlock`.
        feedforward: the feed-forward layer, as for `MoEDecoderBlock`.
        layer_norm_epsilon: float, the epsilon of every RMS normalization.
        dropout: float in `[0, 1)`, as for `MoEDecoderBlock`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        hidden_states: `[batch, length, d]`, the previous depth's
            representation of each position.
        next_embeddings: `[batch, length, d]`, the embedding of the token
            `k` positions ahead.
        padding_mask: optional `[batch, length]`, truthy where that token
            is real.
        training: bool.

    Returns:
        `[batch, length, d]`, the block's output (before `head_norm`).

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> from keras_moe.models import GroupedQueryAttention
    >>> block = MultiTokenPredictionBlock(
    ...     attention=GroupedQueryAttention(num_query_heads=2),
    ...     feedforward=SparseMoE(num_experts=4, intermediate_dim=32))
    >>> x = np.random.normal(size=(2, 6, 16)).astype("float32")
    >>> tuple(block(x, x).shape)
    (2, 6, 16)
    """

    def __init__(self, attention, feedforward, **kwargs):
        super().__init__(attention, feedforward, **kwargs)
        self.enorm = RMSNormalization(
            self.layer_norm_epsilon, dtype=self.dtype_policy, name="enorm"
        )
        self.hnorm = RMSNormalization(
            self.layer_norm_epsilon, dtype=self.dtype_policy, name="hnorm"
        )
        self.eh_proj = None  # Its width is the input's: made in `build`.
        self.head_norm = RMSNormalization(
            self.layer_norm_epsilon, dtype=self.dtype_policy, name="head_norm"
        )

    def build(self, input_shape):
        # `input_shape`: that of `hidden_states` (the embeddings' is the same).
        hidden_dim = int(input_shape[-1])
        self.enorm.build(input_shape)
        self.hnorm.build(input_shape)
        self.eh_proj = keras.layers.Dense(
            hidden_dim, use_bias=False, dtype=self.dtype_policy, name="eh_proj"
        )
        self.eh_proj.build(tuple(input_shape[:-1]) + (2 * hidden_dim,))
        super().build(input_shape)
        self.head_norm.build(input_shape)

    def call(self, hidden_states, next_embeddings, padding_mask=None, training=None):
        x = ops.concatenate(
            [self.enorm(next_embeddings), self.hnorm(hidden_states)], axis=-1
        )
        x = self.eh_proj(x)
        return super().call(x, padding_mask=padding_mask, training=training)


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiTokenPrediction(keras.layers.Layer):
    """Multi-token prediction modules and their training loss.

    Called on the main model's output, it returns that output unchanged;
    in training it also runs the modules and adds
    `loss_weight / D * sum_k L_k` with `add_loss` (see
    `multi_token_prediction_loss`), so `fit()` optimizes it. Outside
    training it does nothing. `MoEBackbone(num_mtp_layers=D)` builds one.

    Args:
        blocks: list of `D >= 1` `MultiTokenPredictionBlock`s, built.
        token_embedding: the main model's `ReversibleEmbedding`, shared
            (embedding and output head); not tracked as a sublayer.
        loss_weight: float >= 0, the weight `lambda` of the loss (0.3, then
            0.1, in DeepSeek-V3's pre-training).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        hidden_states: `[batch, length, d]`, the main model's
            representation before its final norm.
        sequence_output: `[batch, length, d]`, the main model's output,
            returned as is.
        token_ids: int `[batch, length]`.
        padding_mask: `[batch, length]`, truthy for real tokens.
        training: bool; only training runs the modules.

    Example:

    >>> import numpy as np
    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=4, top_k=2, moe_intermediate_dim=8, num_mtp_layers=1)
    >>> inputs = {"token_ids": np.array([[3, 5, 7, 9]], "int32"),
    ...           "padding_mask": np.ones((1, 4), "int32")}
    >>> outputs = backbone(inputs, training=True)  # adds the loss
    >>> [tuple(logits.shape) for logits in backbone.multi_token_logits(inputs)]
    [(1, 4, 32)]
    """

    def __init__(self, blocks, token_embedding, loss_weight=0.3, **kwargs):
        super().__init__(**kwargs)
        self.blocks = list(blocks)
        check_int("num_mtp_layers", len(self.blocks), min_value=1)
        self.loss_weight = check_float("mtp_loss_weight", loss_weight)
        # A plain attribute would make the embedding a sublayer, saved twice.
        self._shared = _SharedLayer(token_embedding)

    def build(self, *args, **kwargs):
        # The blocks come built (their variable paths are the backbone's).
        self.built = True

    def depth_outputs(self, hidden_states, token_ids, padding_mask, training=None):
        """Each module's output, before its `head_norm`.

        Args:
            hidden_states: `[batch, length, d]`, the main model's
                representation before its final norm.
            token_ids: int `[batch, length]`.
            padding_mask: `[batch, length]`.
            training: bool.

        Returns:
            A list of `D` tensors `[batch, length, d]`; position `i` of
            depth `k` predicts token `i + k + 1`.
        """
        embedding = self._shared.layer
        outputs = []
        for depth, block in enumerate(self.blocks, start=1):
            next_ids = shifted_left(ops.cast(token_ids, "int32"), depth)
            next_mask = shifted_left(ops.cast(padding_mask, "int32"), depth)
            hidden_states = block(
                hidden_states,
                embedding(next_ids),
                padding_mask=next_mask,
                training=training,
            )
            outputs.append(hidden_states)
        return outputs

    def logits(self, depth_outputs):
        """The output head on each module's output: `[batch, length, V]` each."""
        embedding = self._shared.layer
        return [
            embedding(block.head_norm(output), reverse=True)
            for block, output in zip(self.blocks, depth_outputs)
        ]

    def call(
        self,
        hidden_states,
        sequence_output,
        token_ids,
        padding_mask,
        training=None,
    ):
        if not training:
            return sequence_output
        outputs = self.depth_outputs(
            hidden_states, token_ids, padding_mask, training=training
        )
        total = 0.0
        for depth, logits in enumerate(self.logits(outputs), start=1):
            total = total + multi_token_prediction_loss(
                logits, token_ids, padding_mask, depth
            )
        self.add_loss(self.loss_weight / len(self.blocks) * total)
        return sequence_output

    def compute_output_spec(self, hidden_states, sequence_output, *args, **kwargs):
        return keras.KerasTensor(sequence_output.shape, sequence_output.dtype)

    def get_config(self):
        # Rebuilt by `MoEBackbone` from its own config, never on its own.
        config = super().get_config()
        config["loss_weight"] = self.loss_weight
        return config


class _SharedLayer:
    """Holds a layer owned elsewhere, out of Keras' tracking."""

    def __init__(self, layer):
        self.layer = layer
