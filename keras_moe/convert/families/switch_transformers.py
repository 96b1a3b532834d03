"""Switch Transformer (`model_type="switch_transformers"`): encoder-decoder.

T5 v1.0 (ReLU feed-forward, relative position buckets, T5 layer norm, no
biases) with a top-1 Switch layer in every `encoder_sparse_step`-th encoder
block and `decoder_sparse_step`-th decoder block. It converts to a
`SwitchSeq2SeqLM` (a `SwitchEncoderDecoderBackbone`), not to a
`MoEBackbone`, so this family loads and writes the whole model itself:
`keras_moe.convert.from_transformers` and `to_transformers` hand it
`SwitchTransformersForConditionalGeneration` checkpoints and Switch models.

The checkpoints' `expert_capacity` (a fixed number of tokens per expert
and sequence) becomes the Switch paper's capacity factors (1.25 in
training, 2.0 in evaluation, over the tokens of a batch); transformers'
router losses pool all the sparse layers of a stack into one loss, the
converted model adds one per layer (the same values with one sparse layer
per stack).
"""

import json
import os
import warnings

import keras
import numpy as np

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import CONFIG_FILE
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import SafetensorsCheckpoint
from keras_moe.convert.family import Family
from keras_moe.convert.family import write_tokenizer_config
from keras_moe.convert.weight_mapping import WeightMapping
from keras_moe.models.switch_encoder_decoder_backbone import (
    SwitchEncoderDecoderBackbone,
)

# transformers' `dense_act_fn` values and the Keras activation of each.
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}
_SPIECE_FILE = "spiece.model"
# Overrides that change neither the architecture nor the weights.
_MOE_OPTION_ARGUMENTS = {
    "capacity_factor": "capacity_factor",
    "eval_capacity_factor": "eval_capacity_factor",
    "jitter": "router_jitter",
    "aux_loss_weight": "aux_loss_weight",
    "z_loss_weight": "z_loss_weight",
    "expert_kernel": "expert_kernel",
    "expert_dropout": "expert_dropout",
}


def sparse_step(hf_config, layers_field, sparse_field):
    """The sparse step transformers derives for one stack.

    `SwitchTransformersConfig` recomputes `encoder_sparse_step` as
    `num_layers // num_sparse_encoder_layers` (or `num_layers` when that is
    0), whatever `config.json` stores; the decoder likewise.

    Args:
        hf_config: dict, a `switch_transformers` `config.json`.
        layers_field: `"num_layers"` or `"num_decoder_layers"`.
        sparse_field: `"num_sparse_encoder_layers"` or
            `"num_sparse_decoder_layers"`.

    Returns:
        An int.

    Example:

    >>> sparse_step({"num_layers": 12, "num_sparse_encoder_layers": 6},
    ...             "num_layers", "num_sparse_encoder_layers")
    2
    """
    num_layers = config_fields.int_field(hf_config, layers_field)
    num_sparse = config_fields.int_field(hf_config, sparse_field, 3)
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def _num_sparse_layers(num_layers, step, stack):
    """A `num_sparse_*_layers` from which transformers derives `step`."""
    for count in range(1, num_layers + 1):
        if num_layers // count == step:
            return count
    raise ConversionError(
        "This model cannot be written as a 'switch_transformers' checkpoint: "
        f"its {stack} has num_layers={num_layers} and sparse step {step}, "
        "but transformers derives the step as `num_layers // "
        "num_sparse_layers`, which no count of sparse layers makes "
        f"{step} (0, no Switch layer, cannot be expressed)."
    )


class SwitchTransformers(Family):
    """Switch-Base/Large/XXL and Switch-C (`google/switch-*`) checkpoints.

    Example:

    >>> config = SwitchTransformers().backbone_config({
    ...     "model_type": "switch_transformers", "vocab_size": 32128,
    ...     "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
    ...     "num_decoder_layers": 12, "num_heads": 12, "num_experts": 8,
    ...     "num_sparse_encoder_layers": 6, "num_sparse_decoder_layers": 6})
    >>> config["encoder_sparse_step"], config["capacity_factor"]
    (2, 1.25)
    """

    model_type = "switch_transformers"
    architecture = "SwitchTransformersForConditionalGeneration"
    backbone_class = SwitchEncoderDecoderBackbone

    # --- Hugging Face config -> SwitchEncoderDecoderBackbone ----------------

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
        activation = field(hf_config, "dense_act_fn", "relu")
        if activation not in _ACTIVATIONS:
            raise ConversionError(
                f"config.json has `dense_act_fn`={activation!r}; Switch "
                f"Transformer checkpoints use one of {sorted(_ACTIVATIONS)}."
            )
        projection = field(hf_config, "feed_forward_proj")
        if projection is not None and projection != activation:
            raise ConversionError(
                f"config.json has `feed_forward_proj`={projection!r}: Switch "
                "Transformer's feed-forward blocks and experts are plain "
                f"(not gated) `{activation}` blocks, `feed_forward_proj="
                f"{activation!r}`."
            )
        if field(hf_config, "is_gated_act", False):
            raise ConversionError(
                "config.json has `is_gated_act`=true: transformers' "
                "SwitchTransformers runs plain (not gated) `wi`/`wo` blocks, "
                "so such a checkpoint holds no gate projections to convert."
            )
        if field(hf_config, "router_bias", False):
            raise ConversionError(
                "config.json has `router_bias`=true: keras-moe Switch routers "
                "have no bias (the published checkpoints have none)."
            )
        router_dtype = field(hf_config, "router_dtype", "float32")
        if router_dtype not in ("float32", "float64"):
            raise ConversionError(
                f"config.json has `router_dtype`={router_dtype!r}: keras-moe "
                "routers compute in float32 (float64 under a float64 policy)."
            )
        num_layers = int_field(hf_config, "num_layers")
        decoder_config = {"num_decoder_layers": num_layers, **hf_config}
        return dict(
            vocabulary_size=int_field(hf_config, "vocab_size"),
            num_layers=num_layers,
            num_decoder_layers=int_field(decoder_config, "num_decoder_layers"),
            hidden_dim=int_field(hf_config, "d_model"),
            num_heads=int_field(hf_config, "num_heads"),
            key_value_dim=int_field(hf_config, "d_kv"),
            intermediate_dim=int_field(hf_config, "d_ff"),
            num_experts=int_field(hf_config, "num_experts"),
            encoder_sparse_step=sparse_step(
                hf_config, "num_layers", "num_sparse_encoder_layers"
            ),
            decoder_sparse_step=sparse_step(
                decoder_config, "num_decoder_layers", "num_sparse_decoder_layers"
            ),
            relative_attention_num_buckets=int_field(
                hf_config, "relative_attention_num_buckets", 32
            ),
            relative_attention_max_distance=int_field(
                hf_config, "relative_attention_max_distance", 128
            ),
            activation=_ACTIVATIONS[activation],
            dropout=float(field(hf_config, "dropout_rate", 0.1)),
            layer_norm_epsilon=float(field(hf_config, "layer_norm_epsilon", 1e-6)),
            capacity_factor=1.25,
            eval_capacity_factor=2.0,
            router_jitter=float(field(hf_config, "router_jitter_noise", 0.01)),
            aux_loss_weight=float(field(hf_config, "router_aux_loss_coef", 0.001)),
            z_loss_weight=float(field(hf_config, "router_z_loss_coef", 0.001)),
            tie_word_embeddings=bool(field(hf_config, "tie_word_embeddings", True)),
        )

    def describes(self, backbone, moe):
        # Decoder-only `MoEBackbone`s are never Switch encoder-decoders.
        return False

    # --- Weights --------------------------------------------------------------

    def weight_mappings(self, backbone):
        """Every weight of a `SwitchEncoderDecoderBackbone` and its tensor.

        Args:
            backbone: a built `SwitchEncoderDecoderBackbone`.

        Returns:
            A list of `keras_moe.convert.weight_mapping.WeightMapping`.
        """
        mappings = [
            WeightMapping(
                backbone.token_embedding.embeddings, ("shared.weight",), "copy"
            )
        ]
        if not backbone.tie_word_embeddings:
            mappings.append(
                WeightMapping(
                    backbone.token_embedding.reverse_embeddings,
                    ("lm_head.weight",),
                    "linear",
                )
            )
        stacks = (
            ("encoder", backbone.encoder_layers, backbone.encoder_layer_norm,
             backbone.encoder_relative_position_bias),
            ("decoder", backbone.decoder_layers, backbone.decoder_layer_norm,
             backbone.decoder_relative_position_bias),
        )
        for stack, blocks, final_norm, position_bias in stacks:
            mappings.append(
                WeightMapping(
                    position_bias.embeddings,
                    (f"{stack}.block.0.layer.0.SelfAttention."
                     "relative_attention_bias.weight",),
                    "copy",
                )
            )
            for i, block in enumerate(blocks):
                mappings += self._block_mappings(f"{stack}.block.{i}", block)
            mappings.append(
                WeightMapping(
                    final_norm.scale, (f"{stack}.final_layer_norm.weight",), "copy"
                )
            )
        return mappings

    def _block_mappings(self, prefix, block):
        def attention(layer, name):
            projections = [
                WeightMapping(
                    getattr(layer, f"{keras_name}_kernel"),
                    (f"{name}.{hf_name}.weight",),
                    "linear",
                )
                for keras_name, hf_name in (
                    ("query", "q"), ("key", "k"), ("value", "v")
                )
            ]
            projections.append(
                WeightMapping(layer.output_kernel, (f"{name}.o.weight",), "linear", 2)
            )
            return projections

        def norm(layer, name):
            return WeightMapping(layer.scale, (f"{name}.layer_norm.weight",), "copy")

        sublayer = f"{prefix}.layer"
        mappings = [norm(block.self_attention_norm, f"{sublayer}.0")]
        mappings += attention(block.self_attention, f"{sublayer}.0.SelfAttention")
        feedforward_index = 1
        if block.is_decoder:
            mappings.append(norm(block.cross_attention_norm, f"{sublayer}.1"))
            mappings += attention(
                block.cross_attention, f"{sublayer}.1.EncDecAttention"
            )
            feedforward_index = 2
        feedforward = f"{sublayer}.{feedforward_index}"
        mappings.append(norm(block.feedforward_norm, feedforward))
        ffn = block.feedforward
        if block.is_sparse:
            experts = range(ffn.num_experts)
            mappings.append(
                WeightMapping(
                    ffn.router.kernel,
                    (f"{feedforward}.mlp.router.classifier.weight",),
                    "linear",
                )
            )
            for keras_name, hf_name in (("up", "wi"), ("down", "wo")):
                mappings.append(
                    WeightMapping(
                        getattr(ffn.experts, f"{keras_name}_kernel"),
                        tuple(
                            f"{feedforward}.mlp.experts.expert_{j}.{hf_name}.weight"
                            for j in experts
                        ),
                        "experts",
                    )
                )
        else:
            for keras_name, hf_name in (("up", "wi"), ("down", "wo")):
                mappings.append(
                    WeightMapping(
                        getattr(ffn, f"{keras_name}_kernel"),
                        (f"{feedforward}.mlp.{hf_name}.weight",),
                        "linear",
                    )
                )
        return mappings

    # --- Loading ----------------------------------------------------------------

    def load_model(
        self, directory, hf_config, preprocessor="default", check_memory=True,
        **overrides,
    ):
        """A `SwitchSeq2SeqLM` from a checkpoint directory.

        Args:
            directory: a local checkpoint directory.
            hf_config: dict, its `config.json`.
            preprocessor: `"default"` (a `SwitchSeq2SeqLMPreprocessor` with
                the checkpoint's tokenizer, when it has one), `None` or a
                preprocessor.
            check_memory: bool, refuse a checkpoint that cannot fit in memory.
            **overrides: `dtype`, `dropout`, `moe_options` (`capacity_factor`,
                `eval_capacity_factor`, `jitter`, `aux_loss_weight`,
                `z_loss_weight`, `expert_kernel`, `expert_dropout`).

        Returns:
            A `keras_moe.models.SwitchSeq2SeqLM`, not compiled.
        """
        # Imported here: `keras_moe.convert.loading` imports the registry,
        # which imports this module.
        from keras_moe.convert import loading
        from keras_moe.models import SwitchSeq2SeqLM
        from keras_moe.models.memory import check_fits_in_memory

        config = self.backbone_config(hf_config)
        for key, value in overrides.items():
            if key != "moe_options":
                config[key] = value
                continue
            if not isinstance(value, dict):
                raise ValueError(
                    f"`moe_options` must be a dict. Received: moe_options={value!r}"
                )
            for option, option_value in value.items():
                if option not in _MOE_OPTION_ARGUMENTS:
                    raise ValueError(
                        f"`moe_options` key {option!r} does not apply to Switch "
                        f"layers. Accepted: {', '.join(_MOE_OPTION_ARGUMENTS)}."
                    )
                config[_MOE_OPTION_ARGUMENTS[option]] = option_value
        try:
            checkpoint = SafetensorsCheckpoint(directory)
        except ConversionError as error:
            # The advice names the transformers class of seq2seq models.
            raise ConversionError(
                str(error).replace("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")
            ) from None
        try:
            if check_memory:
                check_fits_in_memory(
                    f"The checkpoint in {str(directory)!r}",
                    checkpoint.num_elements(),
                    config.get("dtype"),
                    largest_params=checkpoint.largest_variable_size(),
                )
            backbone = SwitchEncoderDecoderBackbone(**config)
            mappings = self.weight_mappings(backbone)
            loading.check_tensors(mappings, checkpoint)
            for mapping in mappings:
                dtype = loading._numpy_dtype(mapping.variable)
                if mapping.kind == "experts":
                    value = np.empty(tuple(mapping.variable.shape), dtype=dtype)
                    for j, name in enumerate(mapping.names):
                        loading._copy_into(
                            value[j], mapping.to_keras(checkpoint.get(name))
                        )
                else:
                    value = loading._staged(
                        mapping.to_keras(checkpoint.get(mapping.names[0])), dtype
                    )
                mapping.variable.assign(value)
            self._warn_unused(checkpoint)
        finally:
            checkpoint.close()
        if isinstance(preprocessor, str):
            if preprocessor != "default":
                raise ValueError(
                    "`preprocessor` must be 'default', None or a preprocessor. "
                    f"Received: preprocessor={preprocessor!r}"
                )
            preprocessor = self.default_preprocessor(directory, hf_config)
        return SwitchSeq2SeqLM(backbone=backbone, preprocessor=preprocessor)

    @staticmethod
    def _warn_unused(checkpoint):
        # Tied checkpoints may store copies of the shared embedding.
        copies = {
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
            "lm_head.weight",
        }
        unused = [
            name
            for name in checkpoint.keys()
            if name not in checkpoint.read_names and name not in copies
        ]
        if unused:
            warnings.warn(
                f"{len(unused)} tensor(s) of the checkpoint were not used: "
                f"{', '.join(unused[:10])}.",
                stacklevel=4,
            )

    @staticmethod
    def default_preprocessor(directory, hf_config, sequence_length=512):
        """A `SwitchSeq2SeqLMPreprocessor` with the checkpoint's tokenizer.

        The `tokenizer.json` when there is one (`HuggingFaceTokenizer`),
        else T5's SentencePiece `spiece.model` (keras-hub's `T5Tokenizer`);
        `None` without either.

        Args:
            directory: the checkpoint directory.
            hf_config: dict, its `config.json`.
            sequence_length: int, the packed source and target length.

        Returns:
            A `SwitchSeq2SeqLMPreprocessor`, or None.
        """
        from keras_moe.convert.tokenizer import HuggingFaceTokenizer
        from keras_moe.models import SwitchSeq2SeqLMPreprocessor

        tokenizer = HuggingFaceTokenizer.from_checkpoint(directory, hf_config)
        if tokenizer is None and os.path.isfile(os.path.join(directory, _SPIECE_FILE)):
            from keras_hub.models import T5Tokenizer

            tokenizer = T5Tokenizer(proto=os.path.join(directory, _SPIECE_FILE))
        if tokenizer is None:
            return None
        return SwitchSeq2SeqLMPreprocessor(
            tokenizer,
            encoder_sequence_length=sequence_length,
            decoder_sequence_length=sequence_length,
        )

    # --- SwitchEncoderDecoderBackbone -> Hugging Face -------------------------

    def transformers_config(self, backbone):
        """The `config.json` dict of a `SwitchEncoderDecoderBackbone`.

        Args:
            backbone: a `SwitchEncoderDecoderBackbone`.

        Returns:
            A JSON-serializable dict.

        Raises:
            ConversionError: for settings transformers cannot express.
        """
        if backbone.expert_intermediate_dim != backbone.intermediate_dim:
            self.refuse(
                "transformers' Switch experts have the width of the dense "
                f"feed-forward blocks (`d_ff`), but expert_intermediate_dim="
                f"{backbone.expert_intermediate_dim} differs from "
                f"intermediate_dim={backbone.intermediate_dim}."
            )
        if backbone.gated_feedforward:
            self.refuse(
                "its feed-forward blocks are gated (gated_feedforward=True); "
                "transformers' SwitchTransformers runs plain `wi`/`wo` blocks."
            )
        activation = backbone.activation
        if activation not in _ACTIVATIONS.values():
            self.refuse(
                f"activation={activation!r}; `dense_act_fn` may be one of "
                f"{sorted(_ACTIVATIONS)}."
            )
        dtype = keras.backend.standardize_dtype(backbone.dtype_policy.variable_dtype)
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "is_encoder_decoder": True,
            "vocab_size": backbone.vocabulary_size,
            "d_model": backbone.hidden_dim,
            "d_kv": backbone.key_value_dim,
            "d_ff": backbone.intermediate_dim,
            "num_layers": backbone.num_layers,
            "num_decoder_layers": backbone.num_decoder_layers,
            "num_heads": backbone.num_heads,
            "num_experts": backbone.num_experts,
            "num_sparse_encoder_layers": _num_sparse_layers(
                backbone.num_layers, backbone.encoder_sparse_step, "encoder"
            ),
            "num_sparse_decoder_layers": _num_sparse_layers(
                backbone.num_decoder_layers, backbone.decoder_sparse_step, "decoder"
            ),
            "relative_attention_num_buckets": backbone.relative_attention_num_buckets,
            "relative_attention_max_distance": (
                backbone.relative_attention_max_distance
            ),
            "dense_act_fn": activation,
            "dropout_rate": backbone.dropout,
            "layer_norm_epsilon": backbone.layer_norm_epsilon,
            "router_bias": False,
            "router_jitter_noise": backbone.router_jitter,
            "router_aux_loss_coef": backbone.aux_loss_weight,
            "router_z_loss_coef": backbone.z_loss_weight,
            "tie_word_embeddings": backbone.tie_word_embeddings,
            # T5's ids; a model with a tokenizer writes its own on export
            # (`special_token_ids`).
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
            "dtype": dtype,
        }

    def special_token_ids(self, tokenizer):
        """`pad_token_id`, `eos_token_id` and `decoder_start_token_id`.

        T5 decoders start with the pad token, as
        `SwitchSeq2SeqLMPreprocessor` does.

        Args:
            tokenizer: the model's tokenizer.

        Returns:
            A dict of the ids the tokenizer has.
        """
        ids = super().special_token_ids(tokenizer)
        ids.pop("bos_token_id", None)  # T5 has no start token
        if "pad_token_id" in ids:
            ids["decoder_start_token_id"] = ids["pad_token_id"]
        return ids

    def write_tokenizer(self, tokenizer, backbone, directory):
        """Write `tokenizer.json`, or T5's SentencePiece `spiece.model`.

        A keras-hub SentencePiece tokenizer (`T5Tokenizer`, as
        `default_preprocessor` makes from a checkpoint's `spiece.model`)
        writes its model proto back as `spiece.model`, with a
        `tokenizer_config.json` for transformers' `T5Tokenizer`. T5's
        released vocabularies reserve 100 sentinel ids (`<extra_id_0>`...)
        after the SentencePiece pieces: they are declared when the
        embedding has room for them.

        Args:
            tokenizer: the model's tokenizer, or None.
            backbone: the `SwitchEncoderDecoderBackbone` being written.
            directory: the checkpoint directory.
        """
        from keras_hub.tokenizers import SentencePieceTokenizer

        if not isinstance(tokenizer, SentencePieceTokenizer):
            super().write_tokenizer(tokenizer, backbone, directory)
            return
        with open(os.path.join(directory, _SPIECE_FILE), "wb") as file:
            file.write(tokenizer.proto)
        pieces = tokenizer.vocabulary_size()
        extra_ids = 100 if backbone.vocabulary_size >= pieces + 100 else 0
        write_tokenizer_config(
            directory,
            {
                "tokenizer_class": "T5Tokenizer",
                "eos_token": tokenizer.end_token,
                "pad_token": tokenizer.pad_token,
                "unk_token": "<unk>",
                "extra_ids": extra_ids,
            },
        )

    def write_config(self, backbone, directory):
        """Write `config.json` for `backbone` into `directory`."""
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as file:
            json.dump(self.transformers_config(backbone), file, indent=2)


FAMILIES = (SwitchTransformers(),)
