"""`SwitchSeq2SeqLMPreprocessor`: (source, target) text to model inputs."""

from collections.abc import Mapping

import keras
from keras_hub.layers import StartEndPacker
from keras_hub.models import Seq2SeqLMPreprocessor
from keras_hub.src.utils.tensor_utils import preprocessing_function

from keras_moe.models.moe_tokenizer import MoETokenizer
from keras_moe.models.switch_encoder_decoder_backbone import (
    SwitchEncoderDecoderBackbone,
)

_TOKENIZED_KEYS = (
    "encoder_token_ids",
    "encoder_padding_mask",
    "decoder_token_ids",
    "decoder_padding_mask",
)


@keras.saving.register_keras_serializable(package="keras_moe")
class SwitchSeq2SeqLMPreprocessor(Seq2SeqLMPreprocessor):
    """Turns (source, target) text into `SwitchSeq2SeqLM` inputs and labels.

    T5's packing (keras-hub's `T5Seq2SeqLMPreprocessor`): the source is
    tokenized and ended with the end token; the target starts with the pad
    token (T5's decoder start token) and ends with the end token. The
    decoder inputs are the target without its last token, the labels the
    target without its first, and the sample weights are 0 on padding.
    For `generate()` the source is packed the same way and the decoder
    prompt is the start token (plus any given target prefix).

    Text comes as keras-hub's dict `{"encoder_text", "decoder_text"}`, or
    as the pair `x=sources, y=targets` (so `model.fit(sources, targets)`
    works). Already tokenized inputs (a dict of the model's inputs) pass
    through unchanged, with the `y` and `sample_weight` given. Any
    tokenizer with `end_token_id` and `pad_token_id` fits: the byte-level
    `MoETokenizer` or a converted checkpoint's SentencePiece tokenizer.

    Args:
        tokenizer: the tokenizer.
        encoder_sequence_length: int, the packed source length.
        decoder_sequence_length: int, the packed target length.
        **kwargs: base preprocessor arguments (`name`, ...).

    Call arguments:
        x: `{"encoder_text", "decoder_text"}`, or the source strings.
        y: the target strings when `x` holds the sources, else None.
        sample_weight: must be None (made from the padding).

    Example:

    >>> import numpy as np
    >>> preprocessor = SwitchSeq2SeqLMPreprocessor(
    ...     MoETokenizer(), encoder_sequence_length=4,
    ...     decoder_sequence_length=3)
    >>> x, y, sample_weight = preprocessor(["ab"], ["c"])
    >>> np.asarray(x["encoder_token_ids"]).tolist()
    [[97, 98, 257, 258]]
    >>> np.asarray(x["decoder_token_ids"]).tolist(), np.asarray(y).tolist()
    ([[258, 99, 257]], [[99, 257, 258]])
    >>> np.asarray(sample_weight).tolist()
    [[True, True, False]]
    """

    backbone_cls = SwitchEncoderDecoderBackbone
    tokenizer_cls = MoETokenizer

    def build(self, input_shape):
        # T5 starts no source with a start token and starts every target
        # with the pad token (its `decoder_start_token_id`).
        self.encoder_packer = StartEndPacker(
            start_value=None,
            end_value=self.tokenizer.end_token_id,
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.encoder_sequence_length,
            return_padding_mask=True,
        )
        self.decoder_packer = StartEndPacker(
            start_value=self.tokenizer.pad_token_id,
            end_value=self.tokenizer.end_token_id,
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.decoder_sequence_length,
            return_padding_mask=True,
        )
        self.built = True

    @preprocessing_function
    def call(
        self,
        x,
        y=None,
        sample_weight=None,
        *,
        encoder_sequence_length=None,
        decoder_sequence_length=None,
        sequence_length=None,
    ):
        if isinstance(x, Mapping) and _TOKENIZED_KEYS[0] in x:
            # Already the model's inputs (e.g. given to `predict`).
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        if not isinstance(x, Mapping):
            if y is None:
                raise ValueError(
                    "`SwitchSeq2SeqLMPreprocessor` makes labels from the "
                    "targets: pass `x=sources, y=targets` or "
                    '`x={"encoder_text": ..., "decoder_text": ...}`. '
                    "Received y=None with non-dict x."
                )
            x, y = {"encoder_text": x, "decoder_text": y}, None
        if y is not None or sample_weight is not None:
            raise ValueError(
                "`SwitchSeq2SeqLMPreprocessor` makes `y` and `sample_weight` "
                "from `decoder_text`; with a dict `x`, pass neither. "
                f"Received: y={y!r}, sample_weight={sample_weight!r}"
            )
        return super().call(
            x,
            encoder_sequence_length=encoder_sequence_length,
            decoder_sequence_length=decoder_sequence_length,
            sequence_length=sequence_length,
        )
