"""`SwitchSeq2SeqLM`: Switch Transformer with a language-model head."""

import keras
from keras import ops
from keras_hub.models import Seq2SeqLM
from keras_hub.src.utils.tensor_utils import any_equal

from keras_moe.models.saved_compile_config import SavedCompileConfig
from keras_moe.models.switch_encoder_decoder_backbone import (
    SwitchEncoderDecoderBackbone,
)
from keras_moe.models.switch_seq2seq_lm_preprocessor import (
    SwitchSeq2SeqLMPreprocessor,
)


@keras.saving.register_keras_serializable(package="keras_moe")
class SwitchSeq2SeqLM(SavedCompileConfig, Seq2SeqLM):
    """A Switch Transformer sequence-to-sequence language model.

    Calling the model on `{"encoder_token_ids", "encoder_padding_mask",
    "decoder_token_ids", "decoder_padding_mask"}` returns the decoder's
    next-token logits `[batch, decoder_length, vocabulary_size]` (see
    `SwitchEncoderDecoderBackbone.logits`). `fit()` trains on
    `(source, target)` text with a `SwitchSeq2SeqLMPreprocessor` attached
    (the router losses of the Switch layers are added to the loss), or on
    tokenized inputs with labels. `generate()` encodes the source once,
    computes each decoder layer's cross-attention keys and values once, and
    decodes with a self-attention key/value cache; the sampler is chosen in
    `compile()` (keras-hub's default is `"top_k"`; `"greedy"` picks the
    most likely token).

    With capacity-limited Switch layers, which tokens an expert drops
    depends on the other tokens of the call; cached decoding routes one
    token per sequence at a time, so it matches a full forward pass when
    nothing is dropped (e.g. `eval_capacity_factor=None`).

    Args:
        backbone: a `SwitchEncoderDecoderBackbone`.
        preprocessor: optional `SwitchSeq2SeqLMPreprocessor`.
        **kwargs: base `keras_hub.models.Task` arguments (`name`, ...).

    Example:

    >>> import numpy as np
    >>> backbone = SwitchEncoderDecoderBackbone(
    ...     vocabulary_size=16, num_layers=2, hidden_dim=8, num_heads=2,
    ...     intermediate_dim=16, num_experts=2, eval_capacity_factor=None)
    >>> model = SwitchSeq2SeqLM(backbone)
    >>> model.compile(sampler="greedy")
    >>> inputs = {
    ...     "encoder_token_ids": np.array([[3, 4, 5, 1]]),
    ...     "encoder_padding_mask": np.array([[1, 1, 1, 1]]),
    ...     "decoder_token_ids": np.array([[0, 0, 0]]),
    ...     "decoder_padding_mask": np.array([[1, 0, 0]]),
    ... }
    >>> tuple(model.predict(inputs, verbose=0).shape)
    (1, 3, 16)
    >>> generated = model.generate(inputs, stop_token_ids=None)
    >>> generated["decoder_token_ids"].shape
    (1, 3)
    """

    backbone_cls = SwitchEncoderDecoderBackbone
    preprocessor_cls = SwitchSeq2SeqLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)["decoder_sequence_output"]
        outputs = backbone.logits(hidden_states)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def call_encoder(self, token_ids, padding_mask):
        """The encoder outputs `[batch, length, hidden_dim]`."""
        return self.backbone.encode(token_ids, padding_mask)

    def call_decoder_with_cache(
        self,
        encoder_hidden_states,
        encoder_padding_mask,
        decoder_token_ids,
        self_attention_cache,
        self_attention_cache_update_index,
        cross_attention_cache,
        cross_attention_cache_update_index=None,
        decoder_padding_mask=None,
    ):
        """A decoder pass that reads and updates the key/value caches.

        Args:
            encoder_hidden_states: `[batch, encoder_length, d]`.
            encoder_padding_mask: `[batch, encoder_length]`.
            decoder_token_ids: int `[batch, length]`, the tokens at positions
                `self_attention_cache_update_index ...`.
            self_attention_cache: `[batch, layers, 2, max_length, H, h]`.
            self_attention_cache_update_index: int or scalar int tensor.
            cross_attention_cache: `[batch, layers, 2, encoder_length, H, h]`.
            cross_attention_cache_update_index: `0` to compute the
                cross-attention cache from `encoder_hidden_states`, `None`
                to read it.
            decoder_padding_mask: optional `[batch, length]`, keeps padding
                out of the Switch layers' routing.

        Returns:
            `(logits, hidden_states, self_attention_cache,
            cross_attention_cache)`.
        """
        backbone = self.backbone
        x = backbone.token_embedding(decoder_token_ids)
        bias = backbone.decoder_relative_position_bias.position_bias(
            ops.shape(decoder_token_ids)[1],
            ops.shape(self_attention_cache)[3],
            query_offset=self_attention_cache_update_index,
        )
        self_caches, cross_caches = [], []
        for i, block in enumerate(backbone.decoder_layers):
            x, self_cache, cross_cache = block(
                x,
                padding_mask=decoder_padding_mask,
                position_bias=bias,
                encoder_outputs=encoder_hidden_states,
                encoder_padding_mask=encoder_padding_mask,
                self_attention_cache=self_attention_cache[:, i, ...],
                self_attention_cache_update_index=self_attention_cache_update_index,
                cross_attention_cache=cross_attention_cache[:, i, ...],
                cross_attention_cache_update_index=cross_attention_cache_update_index,
            )
            self_caches.append(self_cache)
            cross_caches.append(cross_cache)
        self_attention_cache = ops.stack(self_caches, axis=1)
        if cross_attention_cache_update_index is not None:
            cross_attention_cache = ops.stack(cross_caches, axis=1)
        hidden_states = backbone.decoder_layer_norm(x)
        logits = backbone.logits(hidden_states)
        return logits, hidden_states, self_attention_cache, cross_attention_cache

    def _build_cache(
        self, encoder_token_ids, encoder_padding_mask, decoder_token_ids,
        decoder_padding_mask,
    ):
        """Encode, then fill both caches with the decoder prompt."""
        encoder_hidden_states = self.call_encoder(
            encoder_token_ids, encoder_padding_mask
        )
        batch_size = ops.shape(encoder_token_ids)[0]
        attention = self.backbone.decoder_layers[0].self_attention
        layers = self.backbone.num_decoder_layers
        shape = [batch_size, layers] + list(
            attention.cache_shape(ops.shape(decoder_token_ids)[1])
        )
        self_attention_cache = ops.zeros(shape, dtype=self.compute_dtype)
        shape[3] = ops.shape(encoder_token_ids)[1]
        cross_attention_cache = ops.zeros(shape, dtype=self.compute_dtype)
        _, hidden_states, self_attention_cache, cross_attention_cache = (
            self.call_decoder_with_cache(
                encoder_hidden_states,
                encoder_padding_mask,
                decoder_token_ids,
                self_attention_cache,
                0,
                cross_attention_cache,
                cross_attention_cache_update_index=0,
                decoder_padding_mask=decoder_padding_mask,
            )
        )
        return (
            hidden_states,
            encoder_hidden_states,
            self_attention_cache,
            cross_attention_cache,
        )

    def generate_step(self, inputs, stop_token_ids=None):
        """Generate one batch: the compiled inner loop of `generate()`.

        Args:
            inputs: a dict with `"encoder_token_ids"`,
                `"encoder_padding_mask"`, `"decoder_token_ids"` and
                `"decoder_padding_mask"`, decoder prompts right-padded to
                the generation length.
            stop_token_ids: optional tuple of ids that end a sequence.

        Returns:
            A dict with `"decoder_token_ids"` and `"decoder_padding_mask"`
            (False after a stop token).
        """
        encoder_token_ids = inputs["encoder_token_ids"]
        encoder_padding_mask = inputs["encoder_padding_mask"]
        decoder_token_ids = inputs["decoder_token_ids"]
        decoder_padding_mask = inputs["decoder_padding_mask"]
        (
            hidden_states,
            encoder_hidden_states,
            self_attention_cache,
            cross_attention_cache,
        ) = self._build_cache(
            encoder_token_ids,
            encoder_padding_mask,
            decoder_token_ids,
            decoder_padding_mask,
        )
        row_lengths = ops.sum(ops.cast(decoder_padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)

        def next(prompt, cache, index):
            cache_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_index], [batch_size, 1])
            self_cache, encoder_states, encoder_mask, cross_cache = cache
            logits, hidden_states, self_cache, _ = self.call_decoder_with_cache(
                encoder_states,
                encoder_mask,
                prompt,
                self_cache,
                cache_index,
                cross_cache,
            )
            return (
                ops.squeeze(logits, axis=1),
                ops.squeeze(hidden_states, axis=1),
                (self_cache, encoder_states, encoder_mask, cross_cache),
            )

        decoder_token_ids = self.sampler(
            next=next,
            prompt=decoder_token_ids,
            cache=(
                self_attention_cache,
                encoder_hidden_states,
                encoder_padding_mask,
                cross_attention_cache,
            ),
            index=index,
            mask=decoder_padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        if stop_token_ids is not None:
            # Mask out everything after the first generated stop token.
            end_locations = any_equal(
                decoder_token_ids,
                stop_token_ids,
                ops.logical_not(decoder_padding_mask),
            )
            end_locations = ops.cast(end_locations, "int32")
            cumsum = ops.cast(ops.cumsum(end_locations, axis=-1), "int32")
            overflow = cumsum - end_locations
            decoder_padding_mask = ops.logical_not(ops.cast(overflow, "bool"))
        else:
            decoder_padding_mask = ops.ones_like(decoder_token_ids, dtype="bool")
        return {
            "decoder_token_ids": decoder_token_ids,
            "decoder_padding_mask": decoder_padding_mask,
        }
