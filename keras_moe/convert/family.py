"""`Family`: what keras-moe knows about one Hugging Face `model_type`.

A family converts a transformers config into `MoEBackbone` arguments and
back, names the checkpoint tensor of each backbone weight (see
`keras_moe.models.weight_structure`), and refuses to export a model its
checkpoints cannot hold. Each family lives in its own module under
`keras_moe/convert/families/`; loading, export and weight mapping find it
through `keras_moe.convert.registry` by its `model_type`.
"""

import json
import os
import warnings

import keras

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import SafetensorsCheckpoint
from keras_moe.convert.tokenizer import HuggingFaceTokenizer
from keras_moe.models.attention_config import GQA_OPTION_DEFAULTS
from keras_moe.models.backbone_config import config_moe_layer_flags

# Tensor names shared by the transformers decoders (Llama layout), keyed by
# the backbone weight's path inside its block (`BackboneWeight.key`).
# `{layer}` is the block index and `{expert}` a routed expert's index.
DECODER_TENSOR_NAMES = {
    "token_embedding/embeddings": "model.embed_tokens.weight",
    "final_norm/scale": "model.norm.weight",
    "token_embedding/reverse_embeddings": "lm_head.weight",
    "pre_attention_norm/scale": "model.layers.{layer}.input_layernorm.weight",
    "pre_feedforward_norm/scale": (
        "model.layers.{layer}.post_attention_layernorm.weight"
    ),
    "attention/query/kernel": "model.layers.{layer}.self_attn.q_proj.weight",
    "attention/key/kernel": "model.layers.{layer}.self_attn.k_proj.weight",
    "attention/value/kernel": "model.layers.{layer}.self_attn.v_proj.weight",
    "attention/attention_output/kernel": (
        "model.layers.{layer}.self_attn.o_proj.weight"
    ),
    "feedforward/gate_kernel": "model.layers.{layer}.mlp.gate_proj.weight",
    "feedforward/up_kernel": "model.layers.{layer}.mlp.up_proj.weight",
    "feedforward/down_kernel": "model.layers.{layer}.mlp.down_proj.weight",
    "moe/router/kernel": "model.layers.{layer}.mlp.gate.weight",
    "moe/experts/gate_kernel": (
        "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight"
    ),
    "moe/experts/up_kernel": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    "moe/experts/down_kernel": (
        "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"
    ),
}
# Backbone options and their defaults that only some families' checkpoints
# hold: a family whose `attention_options` leaves one out cannot hold
# another value. The GQA options (the temperature scale matters only with
# a floor scale), GPT-OSS's clamped SwiGLU and DBRX's LayerNorm.
ATTENTION_OPTIONS = {
    **{
        name: default
        for name, default in GQA_OPTION_DEFAULTS.items()
        if name != "attention_temperature_scale"
    },
    "swiglu_alpha": None,
    "swiglu_limit": None,
    "norm_type": "rms",
}
_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_EXPORTED_ACTIVATIONS = ("silu", "gelu", "relu")


def moe_layer_indices(backbone):
    """The indices of a backbone's MoE layers, from its config.

    Args:
        backbone: a `MoEBackbone`.

    Returns:
        A list of ints.

    Example:

    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=3, hidden_dim=8, num_query_heads=2,
    ...     intermediate_dim=8, num_experts=2, top_k=1, moe_intermediate_dim=4,
    ...     first_k_dense=1)
    >>> moe_layer_indices(backbone)
    [1, 2]
    """
    flags = config_moe_layer_flags(backbone.get_config())
    return [index for index, is_moe in enumerate(flags) if is_moe]


def moe_settings(backbone):
    """The configuration of a backbone's MoE layers (the first one's).

    Every MoE layer of a `MoEBackbone` is built from the same arguments, so
    the first one's `get_config()` (router and expert arguments included)
    speaks for all.

    Args:
        backbone: a `MoEBackbone` with at least one MoE layer.

    Returns:
        A dict of MoE layer arguments (`score_function`, `normalize_top_k`,
        `aux_loss_weight`, ...).

    Example:

    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=2, top_k=1, moe_intermediate_dim=4)
    >>> moe_settings(backbone)["score_function"]
    'softmax'
    """
    first = moe_layer_indices(backbone)[0]
    return backbone.transformer_layers[first].feedforward.get_config()


# `config.json` token id field -> keras-hub tokenizer attribute.
_SPECIAL_TOKEN_IDS = (
    ("bos_token_id", "start_token_id"),
    ("eos_token_id", "end_token_id"),
    ("pad_token_id", "pad_token_id"),
)


def write_tokenizer_config(directory, settings):
    """Write `settings` as the `tokenizer_config.json` in `directory`."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2)


class Family:
    """One Hugging Face `model_type` and its conversions, both ways.

    Subclasses set the class attributes and implement `backbone_config`,
    `describes`, `check_exportable` and `export_config`; the rest is shared
    by transformers' decoder-only families.

    Attributes:
        model_type: str, the `model_type` of the family's `config.json`.
        architecture: str, its transformers class (`"...ForCausalLM"`).
        attention_type: `"gqa"` or `"mla"`, the backbone attention it uses.
        score_function: `"softmax"` or `"sigmoid"`, its router scores.
        rope_theta: float, transformers' default RoPE base.
        yarn: bool, whether its checkpoints may use YaRN RoPE scaling.
        tensor_names: dict, backbone weight key (`BackboneWeight.key`) ->
            checkpoint tensor name (`{layer}`, `{expert}` filled in); a
            weight without an entry cannot be exported to the family.
        checkpoint_aliases: `(name part, alternative)` pairs: other
            spellings of tensor names found in stored checkpoints.
        expert_projections: the per-expert names of the gate, up and down
            projections in the tensor names.
        dequantized_methods: the `quantization_config` `quant_method`s
            whose weights the family's `open_checkpoint` dequantizes on
            load (GPT-OSS: `"mxfp4"`); other quantized checkpoints are
            refused.
        routing_weights_on: where its MoE layers apply the routing
            weights (`SparseMoE(routing_weights_on=...)`): `"outputs"`, or
            `"inputs"` (Llama 4).
        llama3_rope: bool, whether its checkpoints may use a llama3
            `rope_scaling`.
        expert_biases: bool, whether its routed experts' projections have
            biases (GPT-OSS) or not (the others).
        attention_options: the GQA options with a non-default value that
            the family's checkpoints can hold, among `ATTENTION_OPTIONS`
            (`qk_norm_per_head`, `clip_qkv`, `partial_rotary_factor`);
            export refuses the others.

    Example:

    >>> from keras_moe.convert import registry
    >>> family = registry.lookup("mixtral")
    >>> family.architecture
    'MixtralForCausalLM'
    """

    model_type = None
    architecture = None
    attention_type = "gqa"
    score_function = "softmax"
    rope_theta = 10000.0
    yarn = False
    tensor_names = DECODER_TENSOR_NAMES
    checkpoint_aliases = ()
    expert_projections = ("gate_proj", "up_proj", "down_proj")
    attention_options = ()
    dequantized_methods = ()
    routing_weights_on = "outputs"
    llama3_rope = False
    expert_biases = False

    # --- Hugging Face config -> MoEBackbone ---------------------------------

    def backbone_config(self, hf_config):
        """The `MoEBackbone` arguments equivalent to a transformers config.

        Args:
            hf_config: dict, a `config.json` of this `model_type`.

        Returns:
            A dict of `MoEBackbone` keyword arguments.
        """
        raise NotImplementedError

    def uses_sliding_window(self, hf_config):
        """Whether the config's `sliding_window` applies to its attention."""
        return True

    def attention_window(self, hf_config):
        """`sliding_window` and `attention_layer_types` of a config.

        By default (Mixtral) a config's `sliding_window`, when
        `uses_sliding_window`, applies to every layer.

        Args:
            hf_config: dict, a `config.json` of this `model_type`.

        Returns:
            A dict of those two `MoEBackbone` arguments.
        """
        window = None
        if self.uses_sliding_window(hf_config):
            window = config_fields.sliding_window(hf_config)
        return dict(sliding_window=window, attention_layer_types=None)

    def open_checkpoint(self, directory):
        """The tensors of a checkpoint directory of this family.

        Args:
            directory: the checkpoint directory.

        Returns:
            A `keras_moe.convert.checkpoint.SafetensorsCheckpoint` (or one
            that reads the family's stored layout the same way).
        """
        return SafetensorsCheckpoint(
            directory,
            aliases=self.checkpoint_aliases,
            expert_projections=self.expert_projections,
        )

    def decoder_config(self, hf_config):
        """The `MoEBackbone` arguments every decoder family reads alike.

        Args:
            hf_config: dict, a `config.json` of this `model_type`.

        Returns:
            A dict: sizes, RoPE, norms, embedding tying and activation.
        """
        scaling = config_fields.rope_scaling(hf_config, self.yarn)
        window = {}
        if self.attention_type == "gqa":
            window = self.attention_window(hf_config)
        elif self.uses_sliding_window(hf_config):
            config_fields.warn_sliding_window(hf_config)
        int_field, field = config_fields.int_field, config_fields.field
        return dict(
            **window,
            vocabulary_size=int_field(hf_config, "vocab_size"),
            num_layers=int_field(hf_config, "num_hidden_layers"),
            hidden_dim=int_field(hf_config, "hidden_size"),
            num_query_heads=int_field(hf_config, "num_attention_heads"),
            rope_max_wavelength=config_fields.rope_theta(hf_config, self.rope_theta),
            layer_norm_epsilon=float(field(hf_config, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(field(hf_config, "tie_word_embeddings", False)),
            ffn_activation=config_fields.activation(hf_config),
            ffn_gated=True,
            rope_scaling=scaling,
        )

    # --- MoEBackbone -> Hugging Face config ---------------------------------

    def describes(self, backbone, moe):
        """Whether this is the family to export `backbone` to by default.

        Families describe disjoint sets of backbones, so inferring the
        `model_type` of a model never depends on the order of registration.

        Args:
            backbone: a `MoEBackbone`.
            moe: its `moe_settings`.

        Returns:
            A bool.
        """
        raise NotImplementedError

    def distinctive_feature(self, backbone, moe):
        """The one mechanism that sets a GQA backbone's family apart, or None.

        Checked in a fixed order, so that a backbone with several of them
        (which no single family holds) still gets one answer, and the families'
        `describes` stay disjoint: `"layer_norm"` (DBRX), `"attention_sinks"`
        (GPT-OSS), `"routing_weights_on_inputs"` (Llama 4), `"sigmoid_routing"`
        (GLM-4.5). Backbones with none of them are told apart by q/k norm and
        shared experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

        Args:
            backbone: a `MoEBackbone`.
            moe: its `moe_settings`.

        Returns:
            One of the strings above, or None.

        Example:

        >>> from keras_moe.models import MoEBackbone
        >>> backbone = MoEBackbone(
        ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
        ...     num_experts=2, top_k=1, moe_intermediate_dim=4, attention_sinks=True)
        >>> Family().distinctive_feature(backbone, moe_settings(backbone))
        'attention_sinks'
        """
        if getattr(backbone, "norm_type", "rms") == "layer":
            return "layer_norm"
        if getattr(backbone, "attention_sinks", False):
            return "attention_sinks"
        if moe.get("routing_weights_on", "outputs") == "inputs":
            return "routing_weights_on_inputs"
        if moe["score_function"] == "sigmoid":
            return "sigmoid_routing"
        return None

    def check_exportable(self, backbone, moe):
        """Refuse (`self.refuse`) what the family's checkpoints cannot hold.

        Args:
            backbone: a `MoEBackbone`.
            moe: its `moe_settings`.
        """
        raise NotImplementedError

    def export_config(self, backbone, moe):
        """The family's own `config.json` fields (added to the shared ones).

        Args:
            backbone: a `MoEBackbone` that passed `check_exportable`.
            moe: its `moe_settings`.

        Returns:
            A dict.
        """
        raise NotImplementedError

    def refuse(self, reason):
        """Raise the `ConversionError` for a model the family cannot hold.

        Args:
            reason: str, what the model has that the family does not.
        """
        raise ConversionError(
            f"This model cannot be written as a {self.model_type!r} "
            f"checkpoint: {reason}"
        )

    def transformers_config(self, backbone):
        """The `config.json` dict describing `backbone` in this family.

        Args:
            backbone: a `MoEBackbone`.

        Returns:
            A JSON-serializable dict.

        Raises:
            ConversionError: if the family cannot express the model.
        """
        moe = moe_settings(backbone)
        self._check_shared_settings(backbone, moe)
        self.check_exportable(backbone, moe)
        dtype = keras.backend.standardize_dtype(backbone.dtype_policy.variable_dtype)
        config = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": backbone.vocabulary_size,
            "hidden_size": backbone.hidden_dim,
            "num_hidden_layers": backbone.num_layers,
            "num_attention_heads": backbone.num_query_heads,
            "num_key_value_heads": backbone.num_key_value_heads
            or backbone.num_query_heads,
            "hidden_act": backbone.ffn_activation,
            "rms_norm_eps": backbone.layer_norm_epsilon,
            "rope_theta": backbone.rope_max_wavelength,
            "rope_scaling": None,
            "tie_word_embeddings": backbone.tie_word_embeddings,
            "num_experts_per_tok": backbone.top_k,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": _TORCH_DTYPES.get(dtype, "float32"),
            "use_cache": True,
        }
        config.update(self.export_config(backbone, moe))
        return config

    def _check_shared_settings(self, backbone, moe):
        """What no transformers family has, then attention and scoring."""
        if not backbone.ffn_gated:
            self.refuse("its feed-forward layers are not gated (ffn_gated=False).")
        if backbone.ffn_activation not in _EXPORTED_ACTIVATIONS:
            self.refuse(f"ffn_activation={backbone.ffn_activation!r}.")
        if moe["routing"] != "token_choice":
            self.refuse("only token-choice routing exists there.")
        if bool(moe["use_bias"]) != self.expert_biases:
            having = "have" if moe["use_bias"] else "have no"
            self.refuse(f"its experts' projections {having} biases (use_bias).")
        if moe["noisy_gating"]:
            warnings.warn(
                "Noisy gating is a training-time option that transformers "
                "models do not have: the exported router has no noise kernel.",
                stacklevel=4,
            )
        if backbone.attention_type != self.attention_type:
            self.refuse(f"its attention is {backbone.attention_type!r}.")
        for name, default in ATTENTION_OPTIONS.items():
            value = getattr(backbone, name, default)
            if name not in self.attention_options and value != default:
                self.refuse(f"its attention sets {name}={value!r}.")
        if moe["score_function"] != self.score_function:
            self.refuse(
                f"its router uses score_function={moe['score_function']!r}."
            )
        weights_on = moe.get("routing_weights_on", "outputs")
        if weights_on != self.routing_weights_on:
            self.refuse(f"its MoE layers set routing_weights_on={weights_on!r}.")
        scaling = getattr(backbone, "rope_scaling", None)
        if scaling and scaling.get("rope_type") == "llama3" and not self.llama3_rope:
            self.refuse("its RoPE has a llama3 rope_scaling.")

    # --- Tensors --------------------------------------------------------

    def tensor_name(self, weight):
        """The checkpoint tensor holding a backbone weight, or None.

        Args:
            weight: a `keras_moe.models.weight_structure.BackboneWeight`.

        Returns:
            The tensor name (with an `{expert}` field for routed experts),
            or None if the family's checkpoints have no such tensor.

        Example:

        >>> from keras_moe.convert import registry
        >>> from keras_moe.models.weight_structure import BackboneWeight
        >>> weight = BackboneWeight(
        ...     "decoder_block_2/moe/router/kernel", (8, 4), "router", "kernel", 2, 1)
        >>> registry.lookup("qwen3_moe").tensor_name(weight)
        'model.layers.2.mlp.gate.weight'
        """
        template = self.tensor_names.get(weight.key)
        if template is None:
            return None
        return template.replace("{layer}", str(weight.layer))

    def special_token_ids(self, tokenizer):
        """The `config.json` ids of `tokenizer`'s special tokens.

        Written on export, so that transformers starts, stops and pads
        generation as the exported model's preprocessor does (without
        them, transformers falls back on its config class's defaults).

        Args:
            tokenizer: the model's tokenizer (keras-hub attributes
                `start_token_id`, `end_token_id`, `pad_token_id`).

        Returns:
            A dict of the `bos_token_id`, `eos_token_id` and `pad_token_id`
            the tokenizer has.

        Example:

        >>> from types import SimpleNamespace
        >>> from keras_moe.convert import registry
        >>> tokenizer = SimpleNamespace(start_token_id=None, end_token_id=2,
        ...                             pad_token_id=0)
        >>> registry.lookup("mixtral").special_token_ids(tokenizer)
        {'eos_token_id': 2, 'pad_token_id': 0}
        """
        ids = {}
        for field, attribute in _SPECIAL_TOKEN_IDS:
            value = getattr(tokenizer, attribute, None)
            if value is not None:
                ids[field] = int(value)
        return ids

    def write_tokenizer(self, tokenizer, backbone, directory):
        """Write the files transformers reads `tokenizer` from, if any.

        A `HuggingFaceTokenizer` writes its `tokenizer.json` and a
        `tokenizer_config.json` naming its special tokens; other
        tokenizers have no transformers file and write nothing.

        Args:
            tokenizer: the model's tokenizer, or None.
            backbone: the backbone being written.
            directory: the checkpoint directory.
        """
        if not isinstance(tokenizer, HuggingFaceTokenizer):
            return
        tokenizer.save_assets(directory)
        write_tokenizer_config(
            directory,
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": tokenizer.start_token,
                "eos_token": tokenizer.end_token,
                "pad_token": tokenizer.pad_token,
                "add_bos_token": tokenizer.start_token is not None,
            },
        )

    def stored_tensors(self, backbone, tensors):
        """Checkpoint tensors in the layout the family's files store.

        The writing side of `open_checkpoint`: export names tensors by
        `tensor_name` (one `[out, in]` tensor per routed expert); a family
        whose files store them otherwise (GPT-OSS's stacked experts)
        regroups them here.

        Args:
            backbone: the `MoEBackbone` being written.
            tensors: iterable of `(name, array)` pairs named by
                `tensor_name`.

        Yields:
            `(name, array)` pairs as the checkpoint stores them (here, the
            same pairs).

        Example:

        >>> from keras_moe.convert import registry
        >>> pairs = [("model.norm.weight", [1.0, 1.0])]
        >>> [name for name, _ in registry.lookup("mixtral").stored_tensors(None, pairs)]
        ['model.norm.weight']
        """
        yield from tensors
