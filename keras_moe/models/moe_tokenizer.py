import keras
import tensorflow as tf
from keras_hub.src.utils.tensor_utils import canonicalize_python_token_inputs
from keras_hub.src.utils.tensor_utils import convert_to_ragged_batch
from keras_hub.src.utils.tensor_utils import preprocessing_function
from keras_hub.tokenizers import ByteTokenizer

from keras_moe.models.moe_backbone import MoEBackbone

NUM_BYTES = 256
START_TOKEN = "<|start|>"
END_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (START_TOKEN, END_TOKEN, PAD_TOKEN)


@keras.saving.register_keras_serializable(package="keras_moe")
class MoETokenizer(ByteTokenizer):
    """Byte-level tokenizer of the `MoEBackbone` models: no vocabulary file.

    Text is encoded as UTF-8 and every byte is a token, so any text
    round-trips and nothing is ever downloaded. Three special tokens follow
    the 256 byte ids:

    | id  | token        | use                                  |
    |-----|--------------|--------------------------------------|
    | 0-255 | the bytes  | text                                 |
    | 256 | `<|start|>`  | `start_token_id`, begins a sequence  |
    | 257 | `<|end|>`    | `end_token_id`, ends it; stops `generate()` |
    | 258 | `<|pad|>`    | `pad_token_id`, fills packed sequences |

    `vocabulary_size()` is 259: a backbone used with this tokenizer needs
    `vocabulary_size >= 259`. Detokenizing drops the special ids (and, as
    keras-hub's `ByteTokenizer` does, the byte 0).

    Args:
        lowercase: bool, lowercase the text first. Defaults to False.
        sequence_length: optional int, pad (with byte 0) or truncate the
            output to this length. `MoECausalLMPreprocessor` leaves it unset
            and packs with the pad token.
        normalization_form: optional Unicode normalization (`"NFC"`, ...).
        errors: `"replace"`, `"ignore"` or `"strict"`, how detokenizing
            handles invalid UTF-8.
        replacement_char: int, the code point used with `errors="replace"`.
        dtype: the integer dtype of token ids. Defaults to `"int32"`.
        **kwargs: base tokenizer arguments (`name`, ...).

    Example:

    >>> tokenizer = MoETokenizer()
    >>> [int(i) for i in tokenizer("Hé")]
    [72, 195, 169]
    >>> tokenizer.detokenize([256, 72, 195, 169, 257])
    'Hé'
    >>> tokenizer.vocabulary_size(), tokenizer.end_token_id
    (259, 257)
    """

    backbone_cls = MoEBackbone

    def __init__(
        self,
        lowercase=False,
        sequence_length=None,
        normalization_form=None,
        errors="replace",
        replacement_char=65533,
        dtype="int32",
        **kwargs,
    ):
        self._add_special_token(START_TOKEN, "start_token")
        self._add_special_token(END_TOKEN, "end_token")
        self._add_special_token(PAD_TOKEN, "pad_token")
        super().__init__(
            lowercase=lowercase,
            sequence_length=sequence_length,
            normalization_form=normalization_form,
            errors=errors,
            replacement_char=replacement_char,
            dtype=dtype,
            **kwargs,
        )
        # Nothing to build (no vocabulary, no weights). `model.quantize`
        # refuses a model holding an unbuilt layer, and this one is part of
        # every model loaded with its preprocessor.
        self.built = True

    def vocabulary_size(self):
        return NUM_BYTES + len(SPECIAL_TOKENS)

    def get_vocabulary(self):
        vocabulary = {chr(i): i for i in range(NUM_BYTES)}
        for offset, token in enumerate(SPECIAL_TOKENS):
            vocabulary[token] = NUM_BYTES + offset
        return vocabulary

    def id_to_token(self, id):
        if NUM_BYTES <= id < self.vocabulary_size():
            return SPECIAL_TOKENS[id - NUM_BYTES]
        return super().id_to_token(id)

    def token_to_id(self, token):
        if token in SPECIAL_TOKENS:
            return NUM_BYTES + SPECIAL_TOKENS.index(token)
        return super().token_to_id(token)

    def _detokenize_python(self, inputs):
        inputs, batched = canonicalize_python_token_inputs(inputs)
        special_ids = set(self.special_token_ids)
        inputs = [[i for i in ids if i not in special_ids] for ids in inputs]
        outputs = super()._detokenize_python(inputs)
        return outputs if batched else outputs[0]

    @preprocessing_function
    def _detokenize_tf(self, inputs):
        inputs, unbatched, _ = convert_to_ragged_batch(inputs)
        inputs = tf.ragged.boolean_mask(inputs, tf.less(inputs, NUM_BYTES))
        outputs = ByteTokenizer._detokenize_tf.__wrapped__(self, inputs)
        if unbatched:
            outputs = tf.squeeze(outputs, 0)
        return outputs

    # A byte tokenizer has no vocabulary or merges files to save or load.
    def save_assets(self, dir_path):
        pass

    def load_assets(self, dir_path):
        pass

    def load_preset_assets(self, preset):
        pass
