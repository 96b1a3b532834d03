"""Llama 4 (`model_type` `"llama4_text"`, and `"llama4"` with a `text_config`).

The text model of Llama 4 Scout and Maverick: grouped-query attention whose
layers with RoPE attend within chunks of `attention_chunk_size` tokens and
RMS-normalize queries and keys without a weight (`use_qk_norm`), while
every `no_rope_layer_interval`-th layer (`no_rope_layers`) has no position
embedding, sees the whole prefix and scales its queries by attention
temperature tuning (`attn_temperature_tuning`, `floor_scale`,
`attn_scale`). Scout's RoPE has a llama3 `rope_scaling`. Layers listed in
`moe_layers` (every `interleave_moe_layer_step`-th) are MoE layers: top-1
sigmoid routing, the token multiplied by its routing weight *before* the
expert (`SparseMoE(routing_weights_on="inputs")`), plus one shared expert of
the experts' width; the other layers are dense of width
`intermediate_size_mlp`.

Checkpoints store each layer's experts stacked, `experts.gate_up_proj
[E, d, 2f]` (gate columns first) and `experts.down_proj [E, f, d]`, as
`Llama4Checkpoint` reads them and export writes them. Llama 4 rotates
adjacent feature pairs (complex RoPE) where keras-moe rotates the two
halves of each head: the rows of `q_proj` and `k_proj` are permuted on the
way in (even features first, then odd) and back on the way out, which
gives the same attention scores. The multimodal checkpoints (`"llama4"`,
`Llama4ForConditionalGeneration`) prefix the text model's tensors with
`language_model.`; their vision encoder is not converted.
"""

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import read_config
from keras_moe.convert.family import DECODER_TENSOR_NAMES
from keras_moe.convert.family import Family
from keras_moe.convert.family import moe_layer_indices
from keras_moe.convert.families._llama4_checkpoint import PER_EXPERT_WEIGHT
from keras_moe.convert.families._llama4_checkpoint import ROTATED
from keras_moe.convert.families._llama4_checkpoint import Llama4Checkpoint
from keras_moe.convert.families._llama4_checkpoint import RotatedExport
from keras_moe.convert.families._llama4_checkpoint import StackedExport
from keras_moe.convert.weight_mapping import weight_mappings
from keras_moe.models.backbone_config import attention_layer_types

_ATTENTION = "model.layers.{layer}.self_attn"
_FEEDFORWARD = "model.layers.{layer}.feed_forward"
_SHARED = _FEEDFORWARD + ".shared_expert"
# transformers' `Llama4TextConfig` defaults, for a config.json that leaves
# a field out.
DEFAULTS = {
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "attention_bias": False,
    "router_aux_loss_coef": 0.001,
}
LAYER_TYPES = ("full_attention", "chunked_attention")
_LLAMA3_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
def text_config(hf_config):
    """The text model's config: `hf_config` itself, or its `text_config`.

    Args:
        hf_config: dict, a `config.json` of `model_type` `"llama4_text"`,
            or `"llama4"` (multimodal) with a nested `text_config`.

    Returns:
        A dict.

    Raises:
        ConversionError: for a `"llama4"` config without `text_config`.

    Example:

    >>> text_config({"model_type": "llama4", "text_config": {"vocab_size": 8}})
    {'vocab_size': 8, 'model_type': 'llama4_text'}
    """
    if hf_config.get("model_type") != "llama4":
        return hf_config
    text = hf_config.get("text_config")
    if not isinstance(text, dict):
        raise ConversionError(
            "config.json of model_type='llama4' needs a `text_config` dict "
            f"(the language model's settings). Received: text_config={text!r}"
        )
    return {**text, "model_type": "llama4_text"}


def _field(text, name):
    return config_fields.field(text, name, DEFAULTS.get(name))


def _rope_scaling(text):
    """None (plain RoPE) or the llama3 `rope_scaling` of a text config."""
    name = "rope_scaling"
    scaling = text.get("rope_scaling")
    if scaling is None:
        name, scaling = "rope_parameters", text.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ConversionError(
            f"config.json field `{name}` asks for rope_type={rope_type!r}; "
            "keras-moe converts plain RoPE and llama3 scaling for Llama 4."
        )
    missing = [key for key in _LLAMA3_KEYS if scaling.get(key) is None]
    if missing:
        raise ConversionError(
            f"config.json field `{name}` (rope_type 'llama3') lacks {missing}."
        )
    return {"rope_type": "llama3", **{key: scaling[key] for key in _LLAMA3_KEYS}}


def _rope_layers(text, num_layers):
    """1 for each layer with RoPE, 0 for a NoPE layer (`no_rope_layers`)."""
    flags = text.get("no_rope_layers")
    if not flags:
        interval = config_fields.int_field(
            text, "no_rope_layer_interval", DEFAULTS["no_rope_layer_interval"]
        )
        if interval < 1:
            raise ConversionError(
                "config.json field `no_rope_layer_interval` must be >= 1. "
                f"Received: no_rope_layer_interval={interval}"
            )
        return [int((i + 1) % interval != 0) for i in range(num_layers)]
    if (
        not isinstance(flags, list)
        or len(flags) < num_layers
        or any(flag not in (0, 1) for flag in flags)
    ):
        raise ConversionError(
            "config.json field `no_rope_layers` must list a 1 (RoPE) or a 0 "
            f"(NoPE) for each of the {num_layers} layers. "
            f"Received: no_rope_layers={flags!r}"
        )
    return [int(flag) for flag in flags[:num_layers]]


def _layer_types(text, rope_layers, chunk_size):
    layer_types = text.get("layer_types")
    if layer_types is None:
        return [
            "chunked_attention" if rope and chunk_size is not None else "full_attention"
            for rope in rope_layers
        ]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) < len(rope_layers)
        or any(kind not in LAYER_TYPES for kind in layer_types)
    ):
        raise ConversionError(
            f"config.json field `layer_types` must name one of {LAYER_TYPES} "
            f"for each of the {len(rope_layers)} layers. "
            f"Received: layer_types={layer_types!r}"
        )
    layer_types = list(layer_types[: len(rope_layers)])
    if "chunked_attention" in layer_types and chunk_size is None:
        raise ConversionError(
            "config.json field `layer_types` has 'chunked_attention' layers "
            "but `attention_chunk_size` is null."
        )
    return layer_types


def _moe_layers(text, num_layers):
    moe_layers = text.get("moe_layers")
    if moe_layers is None:
        step = config_fields.int_field(
            text, "interleave_moe_layer_step", DEFAULTS["interleave_moe_layer_step"]
        )
        if step < 1:
            raise ConversionError(
                "config.json field `interleave_moe_layer_step` must be >= 1. "
                f"Received: interleave_moe_layer_step={step}"
            )
        moe_layers = list(range(step - 1, num_layers, step))
    if not isinstance(moe_layers, list) or not all(
        isinstance(i, int) and 0 <= i < num_layers for i in moe_layers
    ):
        raise ConversionError(
            "config.json field `moe_layers` must list layer indices in "
            f"[0, {num_layers}). Received: moe_layers={moe_layers!r}"
        )
    if not moe_layers:
        raise ConversionError(
            "This checkpoint has no MoE layer (`moe_layers` is empty); "
            "keras-moe converts Mixture-of-Experts models."
        )
    return sorted(set(moe_layers))


class Llama4Text(Family):
    """Llama 4 Scout and Maverick text models (`Llama4ForCausalLM`).

    Example:

    >>> config = Llama4Text().backbone_config({
    ...     "model_type": "llama4_text", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 4, "num_attention_heads": 4,
    ...     "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 8,
    ...     "intermediate_size_mlp": 12, "num_local_experts": 4,
    ...     "interleave_moe_layer_step": 2, "attention_chunk_size": 8})
    >>> config["moe_layers"], config["nope_layers"]
    ([1, 3], [3])
    >>> config["attention_layer_types"][2:]
    ['chunked_attention', 'full_attention']
    """

    model_type = "llama4_text"
    architecture = "Llama4ForCausalLM"
    score_function = "sigmoid"
    rope_theta = DEFAULTS["rope_theta"]
    routing_weights_on = "inputs"
    llama3_rope = True
    attention_options = (
        "attention_layer_types",
        "attention_output_bias",
        "attention_chunk_size",
        "nope_layers",
        "use_qk_l2_norm",
        "attention_temperature_floor_scale",
    )
    tensor_names = {
        **DECODER_TENSOR_NAMES,
        "attention/query/bias": f"{_ATTENTION}.q_proj.bias",
        "attention/key/bias": f"{_ATTENTION}.k_proj.bias",
        "attention/value/bias": f"{_ATTENTION}.v_proj.bias",
        "attention/attention_output/bias": f"{_ATTENTION}.o_proj.bias",
        "feedforward/gate_kernel": f"{_FEEDFORWARD}.gate_proj.weight",
        "feedforward/up_kernel": f"{_FEEDFORWARD}.up_proj.weight",
        "feedforward/down_kernel": f"{_FEEDFORWARD}.down_proj.weight",
        "moe/router/kernel": f"{_FEEDFORWARD}.router.weight",
        "moe/experts/gate_kernel": _FEEDFORWARD + ".experts.{expert}.gate_proj.weight",
        "moe/experts/up_kernel": _FEEDFORWARD + ".experts.{expert}.up_proj.weight",
        "moe/experts/down_kernel": _FEEDFORWARD + ".experts.{expert}.down_proj.weight",
        "moe/shared_experts/gate_kernel": f"{_SHARED}.gate_proj.weight",
        "moe/shared_experts/up_kernel": f"{_SHARED}.up_proj.weight",
        "moe/shared_experts/down_kernel": f"{_SHARED}.down_proj.weight",
    }

    def uses_sliding_window(self, hf_config):
        return False  # Llama 4 has chunks, not windows.

    def _head_dim(self, text):
        head_dim = _field(text, "head_dim")
        if head_dim is None:
            hidden = config_fields.int_field(text, "hidden_size")
            return hidden // config_fields.int_field(text, "num_attention_heads")
        return config_fields.int_field(text, "head_dim")

    def open_checkpoint(self, directory):
        return Llama4Checkpoint(
            directory, self._head_dim(text_config(read_config(directory)))
        )

    def backbone_config(self, hf_config):
        text = text_config(hf_config)
        theta = config_fields.rope_theta(text, self.rope_theta)
        scaling = _rope_scaling(text)
        config = self.decoder_config(
            dict(text, rope_scaling=None, rope_parameters=None, rope_theta=theta)
        )
        num_layers = config["num_layers"]
        rope_layers = _rope_layers(text, num_layers)
        chunk_size = _field(text, "attention_chunk_size")
        if chunk_size is not None:
            chunk_size = config_fields.int_field(
                text, "attention_chunk_size", DEFAULTS["attention_chunk_size"]
            )
        layer_types = _layer_types(text, rope_layers, chunk_size)
        if "chunked_attention" not in layer_types:
            chunk_size, layer_types = None, None
        temperature = bool(_field(text, "attn_temperature_tuning"))
        attention_bias = bool(_field(text, "attention_bias"))
        moe_layers = _moe_layers(text, num_layers)
        expert_width = config_fields.int_field(
            text, "intermediate_size", DEFAULTS["intermediate_size"]
        )
        config.update(
            rope_scaling=scaling,
            layer_norm_epsilon=float(_field(text, "rms_norm_eps")),
            num_key_value_heads=_field(text, "num_key_value_heads"),
            head_dim=self._head_dim(text),
            attention_bias=attention_bias,
            attention_output_bias=attention_bias,
            attention_chunk_size=chunk_size,
            attention_layer_types=layer_types,
            nope_layers=[i for i, rope in enumerate(rope_layers) if not rope] or None,
            use_qk_l2_norm=bool(_field(text, "use_qk_norm")),
            attention_temperature_floor_scale=(
                config_fields.int_field(text, "floor_scale", DEFAULTS["floor_scale"])
                if temperature
                else None
            ),
            attention_temperature_scale=float(_field(text, "attn_scale")),
            intermediate_dim=config_fields.int_field(
                text, "intermediate_size_mlp", DEFAULTS["intermediate_size_mlp"]
            ),
            num_experts=config_fields.num_experts(
                {"num_local_experts": DEFAULTS["num_local_experts"], **text}
            ),
            top_k=config_fields.int_field(
                text, "num_experts_per_tok", DEFAULTS["num_experts_per_tok"]
            ),
            moe_intermediate_dim=expert_width,
            num_shared_experts=1,
            shared_intermediate_dim=expert_width,
            moe_layers=None if len(moe_layers) == num_layers else moe_layers,
            moe_options=dict(
                capacity_factor=None,
                score_function="sigmoid",
                normalize_top_k=False,
                routing_weights_on="inputs",
                aux_loss_weight=float(_field(text, "router_aux_loss_coef")),
            ),
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) == "routing_weights_on_inputs"
        )

    def check_exportable(self, backbone, moe):
        if backbone.use_qk_norm:
            self.refuse("Llama 4's q/k norm has no weights (use_qk_l2_norm).")
        if backbone.attention_bias != backbone.attention_output_bias:
            self.refuse(
                "Llama 4 has biases on all four attention projections or none "
                "(attention_bias == attention_output_bias)."
            )
        if "sliding_attention" in attention_layer_types(backbone.get_config()):
            self.refuse("Llama 4 has chunked layers, not sliding windows.")
        if (
            backbone.num_shared_experts != 1
            or backbone.shared_expert_gate
            or moe["shared_intermediate_dim"] != backbone.moe_intermediate_dim
        ):
            self.refuse(
                "Llama 4 MoE layers have one ungated shared expert as wide "
                "as a routed expert."
            )
        if (
            moe["normalize_top_k"]
            or moe["routed_scaling_factor"] != 1.0
            or moe["expert_groups"] != 1
            or moe["bias_update_rate"] > 0
            or moe["router_bias"]
        ):
            self.refuse(
                "Llama 4 routers weigh each chosen expert by the sigmoid of "
                "its logit, without renormalisation, scaling, groups or biases."
            )

    def export_config(self, backbone, moe):
        config = backbone.get_config()
        nope = set(backbone.nope_layers or ())
        floor_scale = backbone.attention_temperature_floor_scale
        return dict(
            head_dim=backbone.head_dim
            or backbone.hidden_dim // backbone.num_query_heads,
            intermediate_size=backbone.moe_intermediate_dim,
            intermediate_size_mlp=backbone.intermediate_dim
            or backbone.moe_intermediate_dim,
            num_local_experts=backbone.num_experts,
            moe_layers=moe_layer_indices(backbone),
            interleave_moe_layer_step=1,
            use_qk_norm=backbone.use_qk_l2_norm,
            no_rope_layers=[int(i not in nope) for i in range(backbone.num_layers)],
            attention_chunk_size=backbone.attention_chunk_size,
            layer_types=attention_layer_types(config),
            attn_temperature_tuning=floor_scale is not None,
            floor_scale=floor_scale or DEFAULTS["floor_scale"],
            attn_scale=backbone.attention_temperature_scale,
            attention_bias=backbone.attention_bias,
            rope_scaling=(
                None if backbone.rope_scaling is None else dict(backbone.rope_scaling)
            ),
            router_aux_loss_coef=moe["aux_loss_weight"],
        )

    def weight_mappings(self, backbone):
        """The export mappings: stacked experts, q/k rows in pair order.

        Args:
            backbone: a `MoEBackbone` that passed `check_exportable`.

        Returns:
            A list of objects with `variable`, `names`, `kind` and
            `to_checkpoint(value)`, as `keras_moe.convert.to_transformers`
            writes them.
        """
        head_dim = backbone.head_dim or backbone.hidden_dim // backbone.num_query_heads
        mappings, experts = [], {}
        for mapping in weight_mappings(backbone, self):
            name = mapping.names[0]
            if mapping.kind == "experts":
                match = PER_EXPERT_WEIGHT.match(name)
                projection = match["projection"]
                experts.setdefault(match["prefix"], {})[projection] = mapping.variable
                if projection == "down_proj":
                    kernels = experts.pop(match["prefix"])
                    mappings.append(
                        StackedExport(
                            f"{match['prefix']}.gate_up_proj",
                            kernels["gate_proj"],
                            kernels["up_proj"],
                        )
                    )
                    mappings.append(
                        StackedExport(f"{match['prefix']}.down_proj", mapping.variable)
                    )
            elif ROTATED.search(name):
                mappings.append(RotatedExport(mapping, head_dim))
            else:
                mappings.append(mapping)
        return mappings


class Llama4(Llama4Text):
    """Llama 4 multimodal checkpoints (`"llama4"`): their text model.

    Reads the `text_config` and the `language_model.` tensors of a
    `Llama4ForConditionalGeneration` checkpoint; exports go to
    `"llama4_text"`.

    Example:

    >>> config = Llama4().backbone_config({"model_type": "llama4",
    ...     "text_config": {"vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 8,
    ...     "intermediate_size_mlp": 12, "num_local_experts": 4}})
    >>> config["num_experts"], config["top_k"]
    (4, 1)
    """

    model_type = "llama4"
    architecture = "Llama4ForConditionalGeneration"

    def describes(self, backbone, moe):
        return False  # Exports go to `llama4_text`.

    def check_exportable(self, backbone, moe):
        self.refuse(
            "keras-moe models hold Llama 4's text model only; export it with "
            "model_type='llama4_text' (Llama4ForCausalLM)."
        )


FAMILIES = (Llama4Text(), Llama4())
