import contextlib
from collections.abc import Mapping

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.src.utils.tensor_utils import any_equal

from keras_moe.distribution.batch_padding import data_parallel_size
from keras_moe.distribution.batch_padding import first_rows
from keras_moe.distribution.batch_padding import pad_inputs
from keras_moe.distribution.batch_padding import pad_training_batch
from keras_moe.models.moe_backbone import MoEBackbone
from keras_moe.models.saved_compile_config import SavedCompileConfig
from keras_moe.models.moe_backbone import check_quantization_mode
from keras_moe.models.moe_causal_lm_preprocessor import MoECausalLMPreprocessor
from keras_moe.models.moe_causal_lm_preprocessor import check_tokenized_inputs
from keras_moe.utils.weights_loading import load_weights_or_restore

_MISSING_LABELS = (
    "`fit()` and `evaluate()` need labels: received `y=None` with inputs "
    "that are not text. The preprocessor makes inputs and labels from text "
    'only; already tokenized inputs `{"token_ids", "padding_mask"}` are used '
    "as they are, so also pass `y` (the next token at each position: e.g. "
    "`token_ids[:, :-1]` as inputs and `token_ids[:, 1:]` as `y`) and the "
    "padding mask as `sample_weight` to leave padding out of the loss."
)


def _rows_of_arrays(x):
    """The number of samples of array or text inputs; `None` for datasets."""
    if isinstance(x, Mapping):
        x = next(iter(x.values()), None)
    if isinstance(x, str):
        return 1
    if isinstance(x, (list, tuple)) or hasattr(x, "shape"):
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) > 0 and shape[0] is not None:
            return int(shape[0])
        if isinstance(x, (list, tuple)):
            return len(x)
    return None


def _check_tokenized_arrays(x, y, needs_labels):
    """Check `{"token_ids", "padding_mask"}` inputs given to fit/evaluate/predict."""
    # Checked before Keras starts: an error inside a JAX training step leaves
    # the model's variables with the step, and one inside a `tf.data`
    # pipeline comes wrapped in its trace.
    if not isinstance(x, Mapping):
        return
    check_tokenized_inputs(x, "x")
    if needs_labels and y is None:
        raise ValueError(_MISSING_LABELS)


@contextlib.contextmanager
def _indivisible_batches_explained():
    """Turn JAX's `IndivisibleError` about the batch into a clear error.

    `MoECausalLM` pads the batches it makes (see
    `keras_moe.distribution.batch_padding`); batches it cannot see before
    Keras splits them (a `tf.data` dataset given to `predict`, data fed
    by several processes unevenly) still have to divide.
    """
    try:
        yield
    except ValueError as error:
        if type(error).__name__ != "IndivisibleError":
            raise
        size = data_parallel_size()
        raise ValueError(
            "Under the current `keras.distribution`, every batch is split "
            f"over the {size} devices of its batch axis, so each batch size "
            f"must be a multiple of {size}. `fit`, `evaluate`, `predict` on "
            "arrays or text and `generate` pad their batches to that "
            "multiple; for a dataset, batch it with a batch size that is a "
            f"multiple of {size} and `drop_remainder=True` (or pad it). "
            f"JAX's error: {error}"
        ) from error


@keras.saving.register_keras_serializable(package="keras_moe")
class MoECausalLM(SavedCompileConfig, CausalLM):
    """A Mixture-of-Experts causal language model: `MoEBackbone` + LM head.

    Calling the model on `{"token_ids", "padding_mask"}` returns next-token
    logits `[batch, length, vocabulary_size]`, computed with the backbone's
    `token_embedding` in reverse (the output projection, or the input
    embedding itself when `tie_word_embeddings`). `fit()` trains on text when
    a preprocessor is attached (the MoE router losses are added to the
    language-model loss), or, with or without one, on already tokenized
    inputs `{"token_ids", "padding_mask"}` with their labels `y` (and the
    padding mask as `sample_weight`), and `generate()` samples autoregressively with a
    cache: strings in and out with a preprocessor, token ids (and
    `stop_token_ids`) without one. The sampler is chosen in `compile()`.

    `keras.saving.load_model` restores the `compile()` arguments (the
    sampler included) and the optimizer's state, so `fit()` resumes where
    the saved model stopped, LoRA fine-tuning included. Under a
    data-parallel `keras.distribution`, batches whose size the batch axis
    does not divide are padded (see `keras_moe.distribution.batch_padding`).

    With a capacity-limited MoE (`capacity_factor` set), which tokens are
    dropped depends on the whole routed batch, so cached generation (one
    token per sequence at a time) can route differently from a forward pass
    over the full sequence; drop-free routing (`capacity_factor=None`) gives
    the same logits.

    Args:
        backbone: a `MoEBackbone`.
        preprocessor: a `MoECausalLMPreprocessor`, or `None` to feed token
            ids directly.
        **kwargs: `keras_hub.models.CausalLM` arguments (`name`, ...).

    Example:

    >>> import numpy as np
    >>> from keras_moe.models import MoEBackbone, MoECausalLMPreprocessor
    >>> from keras_moe.models import MoETokenizer
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=259, num_layers=1, hidden_dim=16, num_query_heads=2,
    ...     num_experts=4, top_k=2, moe_intermediate_dim=16,
    ...     moe_options={"capacity_factor": None})
    >>> preprocessor = MoECausalLMPreprocessor(MoETokenizer(), sequence_length=8)
    >>> causal_lm = MoECausalLM(backbone, preprocessor)
    >>> causal_lm.compile(sampler="greedy")
    >>> isinstance(causal_lm.generate("ab", max_length=8), str)
    True
    >>> logits = causal_lm({"token_ids": np.zeros((1, 3), "int32"),
    ...                     "padding_mask": np.ones((1, 3), "int32")})
    >>> tuple(logits.shape)
    (1, 3, 259)
    """

    backbone_cls = MoEBackbone
    preprocessor_cls = MoECausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        tokenizer = getattr(preprocessor, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "vocabulary_size"):
            try:
                tokenizer_size = tokenizer.vocabulary_size()
            except ValueError:
                # A tokenizer whose vocabulary is an asset has none yet while
                # a saved model is deserialized: keras-hub loads it after.
                tokenizer_size = None
            if tokenizer_size is not None and (
                tokenizer_size > backbone.vocabulary_size
            ):
                raise ValueError(
                    f"The tokenizer has {tokenizer_size} token ids but the "
                    "backbone embeds only `vocabulary_size="
                    f"{backbone.vocabulary_size}`; build the backbone with "
                    f"vocabulary_size >= {tokenizer_size}."
                )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        # A truncated or corrupt file fails naming itself and leaves the
        # weights as they were, instead of half-loaded.
        return load_weights_or_restore(
            self, super().load_weights, filepath, *args, **kwargs
        )

    def fit(self, x=None, y=None, *args, **kwargs):
        _check_tokenized_arrays(x, y, needs_labels=self.loss is not None)
        with _indivisible_batches_explained():
            return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        _check_tokenized_arrays(x, y, needs_labels=self.loss is not None)
        with _indivisible_batches_explained():
            return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        _check_tokenized_arrays(x, None, needs_labels=False)
        multiple = data_parallel_size(process_local=True)
        rows = _rows_of_arrays(x)
        if multiple == 1 or not rows:
            with _indivisible_batches_explained():
                return super().predict(x, batch_size=batch_size, **kwargs)
        # Each batch is padded to a multiple of the data-parallel size
        # (`preprocess_samples`); its padding rows are dropped here.
        self._pad_predict_batches = True
        try:
            with _indivisible_batches_explained():
                outputs = super().predict(x, batch_size=batch_size, **kwargs)
        finally:
            self._pad_predict_batches = False
        batch_size = batch_size or 32
        kept, start = [], 0
        for first in range(0, rows, batch_size):
            real = min(batch_size, rows - first)
            kept.append((start, start + real))
            start += real + (-real % multiple)

        def unpad(array):
            return np.concatenate([array[a:b] for a, b in kept if a < len(array)])

        return keras.tree.map_structure(unpad, outputs)

    def preprocess_samples(self, x, y=None, sample_weight=None):
        """Preprocess one batch, and pad it for a data-parallel distribution.

        `fit`, `evaluate` and `predict` map this over every batch. Under a
        `keras.distribution` that splits batches over `n` devices (see
        `keras_moe.distribution.batch_padding`), a batch whose size is not a
        multiple of `n` is padded: training and evaluation batches with
        rows of weight 0 (the loss stays that of the real rows), prediction
        batches with copies of their last row (dropped by `predict`).

        Args:
            x: the inputs: text, or `{"token_ids", "padding_mask"}`.
            y: optional labels.
            sample_weight: optional sample weights.

        Returns:
            `(x, y, sample_weight)` as `keras.utils.pack_x_y_sample_weight`
            makes them.

        Example:

        >>> import numpy as np
        >>> from keras_moe.models import MoEBackbone
        >>> backbone = MoEBackbone(
        ...     vocabulary_size=16, num_layers=1, hidden_dim=8,
        ...     num_query_heads=2, num_experts=2, top_k=1,
        ...     moe_intermediate_dim=8)
        >>> causal_lm = MoECausalLM(backbone)
        >>> x = {"token_ids": np.ones((3, 4), "int32"),
        ...      "padding_mask": np.ones((3, 4), "int32")}
        >>> data = causal_lm.preprocess_samples(x, np.ones((3, 4), "int32"))
        >>> data[0] is x  # no distribution: unchanged
        True
        """
        data = super().preprocess_samples(x, y=y, sample_weight=sample_weight)
        multiple = data_parallel_size(process_local=True)
        if multiple == 1:
            return data
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if getattr(self, "_pad_predict_batches", False):
            return pad_inputs(x, multiple)[0]
        reduction = getattr(self.loss, "reduction", "sum_over_batch_size")
        return pad_training_batch(data, multiple, loss_reduction=reduction)

    def _normalize_generate_inputs(self, inputs):
        # Under a data-parallel distribution each prompt batch is padded
        # with copies of its last prompt to a multiple of the number of
        # batch shards (a single prompt included); the copies' outputs are
        # dropped in `_normalize_generate_outputs`.
        batches, input_is_scalar = super()._normalize_generate_inputs(inputs)
        multiple = data_parallel_size()
        self._generate_batch_rows = None
        if multiple == 1:
            return batches, input_is_scalar
        padded = [pad_inputs(batch, multiple) for batch in batches]
        self._generate_batch_rows = tuple(real for _, real in padded)
        return [batch for batch, _ in padded], input_is_scalar

    def _normalize_generate_outputs(self, outputs, input_is_scalar):
        rows = getattr(self, "_generate_batch_rows", None)
        if rows is not None:
            self._generate_batch_rows = None
            outputs = [first_rows(out, real) for out, real in zip(outputs, rows)]
        return super()._normalize_generate_outputs(outputs, input_is_scalar)

    def generate(self, inputs, *args, **kwargs):
        with _indivisible_batches_explained():
            return super().generate(inputs, *args, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        # Datasets reach here; Keras would fail deep in the loss on `None`.
        if y is None and self.loss is not None:
            raise ValueError(_MISSING_LABELS)
        return super().compute_loss(
            x, y, y_pred, sample_weight, training=training
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Keras' symbolic build of `evaluate` computes the metrics first.
        if y is None and self.loss is not None:
            raise ValueError(_MISSING_LABELS)
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        # A mode the expert kernels cannot take is refused before any layer
        # changes (see `check_quantization_mode`).
        check_quantization_mode(self, mode, filters)
        super().quantize(mode, config=config, filters=filters, **kwargs)

    def call_with_cache(
        self, token_ids, cache, cache_update_index, padding_mask=None
    ):
        """A forward pass that reads and updates the attention caches.

        Args:
            token_ids: int `[batch, length]`, the tokens at positions
                `cache_update_index ... cache_update_index + length - 1`.
            cache: the stacked per-layer caches `[batch, num_layers, ...]`
                (see `_build_cache`).
            cache_update_index: int or scalar int tensor.
            padding_mask: optional `[batch, length]`; keeps padding out of
                the MoE routing.

        Returns:
            `(logits, hidden_states, cache)`.
        """
        x = self.backbone.token_embedding(token_ids)
        updated_cache = []
        for i, block in enumerate(self.backbone.transformer_layers):
            x, layer_cache = block(
                x,
                padding_mask=padding_mask,
                cache=cache[:, i, ...],
                cache_update_index=cache_update_index,
            )
            updated_cache.append(layer_cache)
        cache = ops.stack(updated_cache, axis=1)
        hidden_states = self.backbone.layer_norm(x)
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, cache

    def _build_cache(self, token_ids, padding_mask=None):
        """Fill a cache with the prompt; returns `(hidden_states, cache)`.

        Each layer's cache has the shape its attention layer gives
        (`cache_shape(max_length)`): `[2, max_length, K, head_dim]` for
        grouped-query attention, `[max_length, kv_lora_rank +
        qk_rope_head_dim]` for latent attention.
        """
        batch_size = ops.shape(token_ids)[0]
        max_length = ops.shape(token_ids)[1]
        attention = self.backbone.transformer_layers[0].attention
        shape = [batch_size, self.backbone.num_layers]
        shape += list(attention.cache_shape(max_length))
        cache = ops.zeros(shape, dtype=self.compute_dtype)
        _, hidden_states, cache = self.call_with_cache(
            token_ids, cache, 0, padding_mask=padding_mask
        )
        return hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """Generate one batch: the compiled inner loop of `generate()`.

        Args:
            inputs: a dict with `"token_ids"` and `"padding_mask"`, prompts
                right-padded to the generation length.
            stop_token_ids: optional tuple of ids that end a sequence.

        Returns:
            A dict with `"token_ids"` and `"padding_mask"` (False after a
            stop token).
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        hidden_states, cache = self._build_cache(token_ids, padding_mask)
        # The first generated token goes right after the shortest prompt.
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)

        def next(prompt, cache, index):
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(
                prompt, cache, cache_update_index
            )
            return (
                ops.squeeze(logits, axis=1),
                ops.squeeze(hidden_states, axis=1),
                cache,
            )

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )

        if stop_token_ids is not None:
            # Mask out everything after the first generated stop token.
            end_locations = any_equal(
                token_ids, stop_token_ids, ops.logical_not(padding_mask)
            )
            end_locations = ops.cast(end_locations, "int32")
            cumsum = ops.cast(ops.cumsum(end_locations, axis=-1), "int32")
            overflow = cumsum - end_locations
            padding_mask = ops.logical_not(ops.cast(overflow, "bool"))
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        return {"token_ids": token_ids, "padding_mask": padding_mask}
