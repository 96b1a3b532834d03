from collections.abc import Mapping

import keras
import keras_hub
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.src.utils.tensor_utils import any_equal

from keras_moe.models.moe_backbone import MoEBackbone
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


@keras.saving.register_keras_serializable(package="keras_moe")
class MoECausalLM(CausalLM):
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
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        _check_tokenized_arrays(x, y, needs_labels=self.loss is not None)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        _check_tokenized_arrays(x, None, needs_labels=False)
        return super().predict(x, *args, **kwargs)

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
