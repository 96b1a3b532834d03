import keras
from keras_hub.models import CausalLMPreprocessor

from keras_moe.models.moe_backbone import MoEBackbone
from keras_moe.models.moe_tokenizer import MoETokenizer


@keras.saving.register_keras_serializable(package="keras_moe")
class MoECausalLMPreprocessor(CausalLMPreprocessor):
    """Turns text into `MoECausalLM` inputs, labels and sample weights.

    Tokenizes with `MoETokenizer` (bytes), adds the start and end tokens,
    packs or truncates to `sequence_length + 1` with the pad token, and
    splits into inputs `{"token_ids", "padding_mask"}` (the first
    `sequence_length` tokens), labels (the next token at each position) and
    sample weights (0 on padding). For `generate()` it packs prompts without
    an end token and turns generated ids back into text.

    Args:
        tokenizer: a `MoETokenizer`.
        sequence_length: int, the length of packed inputs. Defaults to 1024.
        add_start_token: bool, prepend the start token. Defaults to True.
        add_end_token: bool, append the end token. Defaults to True.
        **kwargs: base preprocessor arguments (`name`, ...).

    Call arguments:
        x: a string, a list of strings or a string tensor.
        y: must be `None`: labels are made from `x`.
        sample_weight: must be `None`.
        sequence_length: optional int, overrides `sequence_length`.

    Example:

    >>> import numpy as np
    >>> preprocessor = MoECausalLMPreprocessor(MoETokenizer(), sequence_length=5)
    >>> x, y, sample_weight = preprocessor(["abc"])
    >>> np.asarray(x["token_ids"]).tolist(), np.asarray(y).tolist()
    ([[256, 97, 98, 99, 257]], [[97, 98, 99, 257, 258]])
    >>> np.asarray(sample_weight).tolist()
    [[True, True, True, True, False]]
    """

    backbone_cls = MoEBackbone
    tokenizer_cls = MoETokenizer
