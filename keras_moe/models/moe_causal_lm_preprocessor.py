from collections.abc import Mapping

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

    Already tokenized inputs, a dict `{"token_ids", "padding_mask"}` (the
    model's inputs), pass through unchanged with the `y` and
    `sample_weight` given, so `fit`, `evaluate` and `predict` of a model
    with this preprocessor attached take them as they are. They are not
    split into inputs and labels: pass the labels (the next token at each
    position) as `y`, and `padding_mask` as `sample_weight` to leave padding
    out of the loss.

    Args:
        tokenizer: a `MoETokenizer`.
        sequence_length: int, the length of packed inputs. Defaults to 1024.
        add_start_token: bool, prepend the start token. Defaults to True.
        add_end_token: bool, append the end token. Defaults to True.
        **kwargs: base preprocessor arguments (`name`, ...).

    Call arguments:
        x: a string, a list of strings or a string tensor; or a dict
            `{"token_ids", "padding_mask"}` of already tokenized inputs.
        y: `None` for text (labels are made from `x`); the labels of
            tokenized inputs.
        sample_weight: `None` for text; optional for tokenized inputs.
        sequence_length: optional int, overrides `sequence_length`.

    Example:

    >>> import numpy as np
    >>> preprocessor = MoECausalLMPreprocessor(MoETokenizer(), sequence_length=5)
    >>> x, y, sample_weight = preprocessor(["abc"])
    >>> np.asarray(x["token_ids"]).tolist(), np.asarray(y).tolist()
    ([[256, 97, 98, 99, 257]], [[97, 98, 99, 257, 258]])
    >>> np.asarray(sample_weight).tolist()
    [[True, True, True, True, False]]
    >>> tokenized = {"token_ids": np.array([[256, 97]]),
    ...              "padding_mask": np.array([[1, 1]])}
    >>> x, y = preprocessor(tokenized, y=np.array([[97, 257]]))
    >>> x is tokenized, np.asarray(y).tolist()
    (True, [[97, 257]])
    """

    backbone_cls = MoEBackbone
    tokenizer_cls = MoETokenizer

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if isinstance(x, Mapping):
            # Already the model's inputs: tokenizing them again would fail
            # inside the tokenizer.
            check_tokenized_inputs(x, "x")
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        return super().call(
            x, y=y, sample_weight=sample_weight, sequence_length=sequence_length
        )

    def generate_preprocess(self, x, sequence_length=None):
        if isinstance(x, Mapping):
            raise ValueError(
                "`generate()` of a model with a preprocessor takes prompts as "
                "strings; received a dict with keys "
                f"{sorted(map(str, x))}. To generate from token ids, detach "
                "the preprocessor (`model.preprocessor = None`) and pass "
                '`{"token_ids", "padding_mask"}` padded to the generation '
                "length, with `stop_token_ids`."
            )
        return super().generate_preprocess(x, sequence_length=sequence_length)


_TOKENIZED_KEYS = ("token_ids", "padding_mask")


def check_tokenized_inputs(x, name):
    """Check a dict of already tokenized model inputs (keys and shapes)."""
    keys = set(x)
    if keys != set(_TOKENIZED_KEYS):
        missing = [key for key in _TOKENIZED_KEYS if key not in keys]
        extra = sorted(map(str, keys - set(_TOKENIZED_KEYS)))
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if extra:
            problems.append(f"unexpected {extra}")
        raise ValueError(
            f"`{name}` given as a dict must be already tokenized model inputs "
            f"with exactly the keys {list(_TOKENIZED_KEYS)} ({', '.join(problems)}); "
            "pass text (strings) to have it tokenized. "
            f"Received keys: {sorted(map(str, keys))}"
        )
    token_shape = getattr(x["token_ids"], "shape", None)
    mask_shape = getattr(x["padding_mask"], "shape", None)
    if token_shape is not None and mask_shape is not None and (
        tuple(token_shape) != tuple(mask_shape)
    ):
        raise ValueError(
            "`padding_mask` must have the shape of `token_ids`. Received: "
            f"token_ids.shape={tuple(token_shape)}, "
            f"padding_mask.shape={tuple(mask_shape)}"
        )
