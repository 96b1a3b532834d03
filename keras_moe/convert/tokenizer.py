"""`HuggingFaceTokenizer`: a keras-hub tokenizer around a `tokenizer.json`.

The Hugging Face `tokenizers` library runs the checkpoint's own
`tokenizer.json` (normalizer, pre-tokenizer, BPE/Unigram/WordPiece model,
byte fallback, added tokens), so token ids are exactly those transformers
gives, for any tokenizer family. Special tokens are not added by the
tokenizer: `MoECausalLMPreprocessor` adds the start and end tokens (and
pads), like every keras-hub preprocessor.
"""

import json
import os

import keras
import numpy as np
from keras_hub.src.utils.tensor_utils import canonicalize_python_string_inputs
from keras_hub.src.utils.tensor_utils import canonicalize_python_token_inputs
from keras_hub.src.utils.tensor_utils import convert_to_ragged_batch
from keras_hub.src.utils.tensor_utils import preprocessing_function
from keras_hub.src.utils.tensor_utils import restore_outer_shape
from keras_hub.tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_TOKENS = ("start_token", "end_token", "pad_token")


@keras.saving.register_keras_serializable(package="keras_moe")
class HuggingFaceTokenizer(Tokenizer):
    """Tokenizes with a Hugging Face `tokenizer.json`, through `tokenizers`.

    Eager calls run the `tokenizers` library directly; inside `tf.data` the
    same code runs through `tf.py_function`, so the tokenizer works in
    `model.fit` pipelines on every backend. Saving (`save_to_preset`,
    `.keras` files) stores `tokenizer.json` as an asset.

    Args:
        tokenizer_file: path of a `tokenizer.json`, or `None` to load it
            later with `load_assets` (as deserialization does).
        start_token: str or `None`, the token that begins a sequence (BOS).
        end_token: str or `None`, the token that ends one (EOS); `generate()`
            stops on it.
        pad_token: str or `None`, the token packed sequences are padded with.
            `None` pads with the end token (or id 0 without one).
        sequence_length: optional int, pad (with 0) or truncate outputs.
        **kwargs: base tokenizer arguments (`name`, `dtype`, ...).

    Example:

    >>> import os, tempfile
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> vocabulary = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    >>> hf = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    >>> hf.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> _ = hf.add_special_tokens(["</s>"])
    >>> path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
    >>> hf.save(path)
    >>> tokenizer = HuggingFaceTokenizer(path, end_token="</s>")
    >>> [int(i) for i in tokenizer("hello world")]
    [2, 3]
    >>> tokenizer.detokenize([2, 3, 1]), tokenizer.end_token_id
    ('hello world', 1)
    """

    def __init__(
        self,
        tokenizer_file=None,
        start_token=None,
        end_token=None,
        pad_token=None,
        sequence_length=None,
        dtype="int32",
        **kwargs,
    ):
        super().__init__(dtype=dtype, **kwargs)
        self.start_token = start_token
        self.end_token = end_token
        self.pad_token = pad_token
        self.sequence_length = sequence_length
        self.file_assets = [TOKENIZER_FILE]
        self._tokenizer = None
        for name in _SPECIAL_TOKENS:
            setattr(self, f"{name}_id", None)
        if tokenizer_file is not None:
            self._set_tokenizer_file(tokenizer_file)

    def _set_tokenizer_file(self, path):
        from tokenizers import Tokenizer as RustTokenizer

        self._tokenizer = RustTokenizer.from_file(str(path))
        self._special_token_attrs = []
        for name in _SPECIAL_TOKENS:
            token = getattr(self, name)
            if token is None:
                setattr(self, f"{name}_id", None)
                continue
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"The special token `{name}`={token!r} is not in the "
                    f"vocabulary of {path}."
                )
            self._special_token_attrs.append(name)
            setattr(self, f"{name}_id", token_id)
        if self.pad_token_id is None:
            self.pad_token_id = self.end_token_id if self.end_token_id is not None else 0

    def _check_loaded(self):
        if self._tokenizer is None:
            raise ValueError(
                "No tokenizer.json is loaded: pass `tokenizer_file` or call "
                "`load_assets(directory)`."
            )

    def save_assets(self, dir_path):
        self._check_loaded()
        self._tokenizer.save(os.path.join(dir_path, TOKENIZER_FILE))

    def load_assets(self, dir_path):
        self._set_tokenizer_file(os.path.join(dir_path, TOKENIZER_FILE))

    def vocabulary_size(self):
        self._check_loaded()
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocabulary(self):
        self._check_loaded()
        vocabulary = self._tokenizer.get_vocab(with_added_tokens=True)
        return [token for token, _ in sorted(vocabulary.items(), key=lambda x: x[1])]

    def id_to_token(self, id):
        self._check_loaded()
        token = self._tokenizer.id_to_token(int(id))
        if token is None:
            raise ValueError(
                f"`id` must be in [0, {self.vocabulary_size() - 1}]. Received: {id}"
            )
        return token

    def token_to_id(self, token):
        self._check_loaded()
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Token {token!r} is not in the vocabulary.")
        return token_id

    def _encode(self, texts):
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def _decode(self, batch):
        return self._tokenizer.decode_batch(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=True
        )

    def _tokenize_python(self, inputs):
        self._check_loaded()
        texts, batched, outer_shape = canonicalize_python_string_inputs(inputs)
        batched_tokens = self._encode(texts)
        if self.sequence_length:
            length = self.sequence_length
            batched_tokens = np.array(
                [t[:length] + [0] * (length - len(t[:length])) for t in batched_tokens],
                dtype=self.compute_dtype,
            )
        if outer_shape is not None:
            return restore_outer_shape(batched_tokens, outer_shape)
        if not batched:
            return np.array(batched_tokens[0], dtype=self.compute_dtype)
        return batched_tokens

    @preprocessing_function
    def _tokenize_tf(self, inputs):
        import tensorflow as tf

        self._check_loaded()
        inputs = tf.convert_to_tensor(inputs)
        unbatched = inputs.shape.rank == 0
        if unbatched:
            inputs = tf.expand_dims(inputs, 0)

        def encode(strings):
            texts = [s.decode("utf-8") for s in strings.numpy().reshape(-1)]
            ids = self._encode(texts)
            flat = np.array([i for row in ids for i in row], dtype="int32")
            return flat, np.array([len(row) for row in ids], dtype="int64")

        flat, lengths = tf.py_function(encode, [inputs], [tf.int32, tf.int64])
        flat.set_shape([None])
        lengths.set_shape([None])
        tokens = tf.RaggedTensor.from_row_lengths(flat, lengths)
        tokens = tf.cast(tokens, self.compute_dtype)
        if self.sequence_length:
            tokens = tokens.to_tensor(shape=[None, self.sequence_length])
        if unbatched:
            tokens = tokens[0]
        return tokens

    def tokenize(self, inputs):
        if self._use_tf_workflow():
            return self._tokenize_tf(inputs)
        return self._tokenize_python(inputs)

    def _detokenize_python(self, inputs):
        self._check_loaded()
        batch, batched = canonicalize_python_token_inputs(inputs)
        outputs = self._decode(batch)
        return outputs if batched else outputs[0]

    @preprocessing_function
    def _detokenize_tf(self, inputs):
        import tensorflow as tf

        self._check_loaded()
        inputs, unbatched, _ = convert_to_ragged_batch(inputs)

        def decode(flat, lengths):
            ids, start = [], 0
            flat = flat.numpy()
            for length in lengths.numpy():
                ids.append(flat[start : start + length])
                start += length
            return np.array([text.encode("utf-8") for text in self._decode(ids)])

        outputs = tf.py_function(
            decode,
            [tf.cast(inputs.flat_values, "int64"), inputs.row_lengths()],
            tf.string,
        )
        outputs.set_shape([None])
        if unbatched:
            outputs = tf.squeeze(outputs, 0)
        return outputs

    def detokenize(self, inputs):
        if self._use_tf_workflow():
            return self._detokenize_tf(inputs)
        return self._detokenize_python(inputs)

    def call(self, inputs, *args, training=None, **kwargs):
        return self.tokenize(inputs, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "start_token": self.start_token,
                "end_token": self.end_token,
                "pad_token": self.pad_token,
                "sequence_length": self.sequence_length,
            }
        )
        return config

    @classmethod
    def from_checkpoint(cls, directory, model_config=None):
        """The tokenizer of a transformers checkpoint directory, or `None`.

        Special tokens come from `tokenizer_config.json` (`bos_token`,
        `eos_token`, `pad_token`), else from `config.json`'s
        `bos_token_id` / `eos_token_id`. The start token is kept only if
        the checkpoint's tokenizer adds it (`add_bos_token`, or its
        post-processor puts it first), as transformers does.

        Args:
            directory: the checkpoint directory.
            model_config: optional dict, its `config.json`.

        Returns:
            A `HuggingFaceTokenizer`, or `None` without a `tokenizer.json`.
        """
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            return None
        from tokenizers import Tokenizer as RustTokenizer

        rust = RustTokenizer.from_file(path)
        settings = {}
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as file:
                settings = json.load(file)
        model_config = model_config or {}

        def token(name, id_field):
            value = settings.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None and name in settings:
                return None  # Explicitly none (e.g. Qwen has no BOS).
            if value is None:
                token_id = model_config.get(id_field)
                if isinstance(token_id, list):
                    token_id = token_id[0] if token_id else None
                value = None if token_id is None else rust.id_to_token(token_id)
            if value is not None and rust.token_to_id(value) is None:
                return None
            return value

        start = token("bos_token", "bos_token_id")
        if start is not None:
            adds_start = settings.get("add_bos_token")
            if adds_start is None:
                ids = rust.encode("a", add_special_tokens=True).ids
                adds_start = bool(ids) and ids[0] == rust.token_to_id(start)
            if not adds_start:
                start = None
        end = token("eos_token", "eos_token_id")
        pad = token("pad_token", "pad_token_id")
        return cls(path, start_token=start, end_token=end, pad_token=pad)
