"""Hugging Face model families and their `MoEBackbone` configurations.

Each supported `model_type` maps a transformers `config.json` onto
`MoEBackbone` arguments (and back, for export). Routing is always dropless
(`capacity_factor=None`), as in transformers, and uses the family's scoring
and renormalisation, so a converted model computes what the source model
computes.
"""

import warnings

from keras_moe.convert.checkpoint import ConversionError
from keras_moe.models.yarn import YARN_KEYS
from keras_moe.models.yarn import normalize_rope_scaling

SUPPORTED_MODEL_TYPES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
)
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
# transformers' defaults for fields a config.json may leave out.
_DEFAULT_ROPE_THETA = {
    "mixtral": 1e6,
    "qwen2_moe": 10000.0,
    "qwen3_moe": 10000.0,
    "deepseek_v2": 10000.0,
    "deepseek_v3": 10000.0,
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
# DeepSeek-V3's aux-loss-free balancing and sequence-wise loss, for
# fine-tuning (they do not change the forward pass).
DEEPSEEK_V3_BIAS_UPDATE_RATE = 0.001
DEEPSEEK_V3_SEQUENCE_AUX_LOSS_WEIGHT = 1e-4


def _field(hf_config, name, default=None, required=False):
    value = hf_config.get(name, default)
    if required and value is None:
        raise ConversionError(
            f"config.json has no `{name}`, which model_type="
            f"{hf_config.get('model_type')!r} needs."
        )
    return value


def _int_field(hf_config, name, default=None):
    value = _field(hf_config, name, default, required=True)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConversionError(
            f"config.json field `{name}` must be an integer. "
            f"Received: {name}={value!r}"
        )
    return value


def _rope_theta(hf_config, model_type):
    rope_parameters = hf_config.get("rope_parameters") or {}
    theta = hf_config.get("rope_theta", rope_parameters.get("rope_theta"))
    return float(_DEFAULT_ROPE_THETA[model_type] if theta is None else theta)


def _rope_scaling(hf_config, model_type):
    """The YaRN `rope_scaling` of a DeepSeek config, or None for plain RoPE.

    Reads transformers 4's `rope_scaling` or transformers 5's
    `rope_parameters`; refuses every other scaling.
    """
    scaling = hf_config.get("rope_scaling")
    field = "rope_scaling"
    if scaling is None:
        scaling = hf_config.get("rope_parameters")
        field = "rope_parameters"
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "yarn" or not model_type.startswith("deepseek"):
        raise ConversionError(
            f"config.json field `{field}` asks for rope_type={rope_type!r}; "
            "keras-moe converts plain RoPE, and YaRN for DeepSeek models "
            "only, so this checkpoint would not give the same outputs."
        )
    scaling = {
        key: value
        for key, value in scaling.items()
        if key in YARN_KEYS and value is not None
    }
    max_positions = hf_config.get("max_position_embeddings")
    scaling.setdefault("original_max_position_embeddings", max_positions)
    if scaling.get("factor") is None and max_positions:
        scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    try:
        return normalize_rope_scaling({"rope_type": "yarn", **scaling})
    except ValueError as error:
        raise ConversionError(f"config.json field `{field}`: {error}") from None


def _activation(hf_config):
    name = _field(hf_config, "hidden_act", "silu")
    if name not in _ACTIVATIONS:
        raise ConversionError(
            f"config.json field `hidden_act`={name!r} is not supported; "
            f"supported: {', '.join(sorted(_ACTIVATIONS))}."
        )
    return _ACTIVATIONS[name]


def _warn_sliding_window(hf_config, model_type):
    window = hf_config.get("sliding_window")
    if model_type in ("qwen2_moe", "qwen3_moe"):
        layer_types = hf_config.get("layer_types") or []
        uses_window = hf_config.get("use_sliding_window", False) or (
            "sliding_attention" in layer_types
        )
        if not uses_window:
            return
    if window:
        warnings.warn(
            f"config.json sets `sliding_window`={window}: keras-moe attention "
            "sees the whole sequence, so outputs match the checkpoint's only "
            f"for sequences of at most {window} tokens.",
            stacklevel=3,
        )


def _common(hf_config, model_type):
    rope_scaling = _rope_scaling(hf_config, model_type)
    _warn_sliding_window(hf_config, model_type)
    return dict(
        vocabulary_size=_int_field(hf_config, "vocab_size"),
        num_layers=_int_field(hf_config, "num_hidden_layers"),
        hidden_dim=_int_field(hf_config, "hidden_size"),
        num_query_heads=_int_field(hf_config, "num_attention_heads"),
        rope_max_wavelength=_rope_theta(hf_config, model_type),
        layer_norm_epsilon=float(_field(hf_config, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(_field(hf_config, "tie_word_embeddings", False)),
        ffn_activation=_activation(hf_config),
        ffn_gated=True,
        rope_scaling=rope_scaling,
    )


def _qwen_moe_layers(hf_config, num_layers):
    """The MoE layer indices of Qwen-MoE (`mlp_only_layers`, sparse step)."""
    num_experts = _experts(hf_config)
    step = _int_field(hf_config, "decoder_sparse_step", 1)
    dense = set(_field(hf_config, "mlp_only_layers", None) or [])
    moe_layers = [
        i
        for i in range(num_layers)
        if i not in dense and num_experts > 0 and (i + 1) % step == 0
    ]
    if not moe_layers:
        raise ConversionError(
            "This checkpoint has no MoE layer (`num_experts`, "
            "`mlp_only_layers` and `decoder_sparse_step` make every layer "
            "dense); load it as a dense model instead."
        )
    return None if len(moe_layers) == num_layers else moe_layers


def _experts(hf_config):
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf_config.get(name) is not None:
            return _int_field(hf_config, name)
    raise ConversionError(
        "config.json gives no number of experts (`num_experts`, "
        "`num_local_experts` or `n_routed_experts`)."
    )


def _mixtral(hf_config):
    config = _common(hf_config, "mixtral")
    config.update(
        num_key_value_heads=_field(hf_config, "num_key_value_heads"),
        head_dim=_field(hf_config, "head_dim"),
        num_experts=_experts(hf_config),
        top_k=_int_field(hf_config, "num_experts_per_tok", 2),
        moe_intermediate_dim=_int_field(hf_config, "intermediate_size"),
        moe_options=dict(
            capacity_factor=None,
            normalize_top_k=True,
            aux_loss_weight=float(_field(hf_config, "router_aux_loss_coef", 0.02)),
            jitter=float(_field(hf_config, "router_jitter_noise", 0.0) or 0.0),
        ),
    )
    return config


def _qwen_common(hf_config, model_type):
    config = _common(hf_config, model_type)
    config.update(
        num_key_value_heads=_field(hf_config, "num_key_value_heads"),
        head_dim=_field(hf_config, "head_dim"),
        intermediate_dim=_field(hf_config, "intermediate_size"),
        num_experts=_experts(hf_config),
        top_k=_int_field(hf_config, "num_experts_per_tok"),
        moe_intermediate_dim=_int_field(hf_config, "moe_intermediate_size"),
        moe_layers=_qwen_moe_layers(hf_config, config["num_layers"]),
        moe_options=dict(
            capacity_factor=None,
            normalize_top_k=bool(_field(hf_config, "norm_topk_prob", False)),
            aux_loss_weight=float(_field(hf_config, "router_aux_loss_coef", 0.001)),
        ),
    )
    return config


def _qwen2_moe(hf_config):
    config = _qwen_common(hf_config, "qwen2_moe")
    config.update(
        attention_bias=bool(_field(hf_config, "qkv_bias", True)),
        num_shared_experts=1,
        shared_intermediate_dim=_int_field(
            hf_config, "shared_expert_intermediate_size"
        ),
        shared_expert_gate=True,
    )
    return config


def _qwen3_moe(hf_config):
    if hf_config.get("attention_bias"):
        raise ConversionError(
            "config.json sets `attention_bias`=true: Qwen3-MoE then has a "
            "bias on the attention output projection too, which keras-moe "
            "attention does not have."
        )
    config = _qwen_common(hf_config, "qwen3_moe")
    config.update(use_qk_norm=True)
    return config


def _deepseek_common(hf_config, model_type):
    if hf_config.get("attention_bias"):
        raise ConversionError(
            "config.json sets `attention_bias`=true; keras-moe's multi-head "
            "latent attention has no projection biases."
        )
    moe_layer_freq = hf_config.get("moe_layer_freq", 1)
    if moe_layer_freq != 1:
        raise ConversionError(
            f"config.json sets `moe_layer_freq`={moe_layer_freq!r}; only 1 "
            "(every layer after `first_k_dense_replace` is MoE) is supported."
        )
    config = _common(hf_config, model_type)
    num_shared = _field(hf_config, "n_shared_experts", 0) or 0
    config.update(
        attention_type="mla",
        q_lora_rank=_field(hf_config, "q_lora_rank"),
        kv_lora_rank=_int_field(hf_config, "kv_lora_rank"),
        qk_nope_head_dim=_int_field(hf_config, "qk_nope_head_dim"),
        qk_rope_head_dim=_int_field(hf_config, "qk_rope_head_dim"),
        v_head_dim=_int_field(hf_config, "v_head_dim"),
        intermediate_dim=_field(hf_config, "intermediate_size"),
        num_experts=_experts(hf_config),
        top_k=_int_field(hf_config, "num_experts_per_tok"),
        moe_intermediate_dim=_int_field(hf_config, "moe_intermediate_size"),
        num_shared_experts=num_shared,
        first_k_dense=min(
            _int_field(hf_config, "first_k_dense_replace", 0), config["num_layers"]
        ),
    )
    return config


def _deepseek_v3(hf_config):
    config = _deepseek_common(hf_config, "deepseek_v3")
    config["rope_interleave"] = bool(_field(hf_config, "rope_interleave", True))
    config["moe_options"] = dict(
        capacity_factor=None,
        score_function="sigmoid",
        normalize_top_k=bool(_field(hf_config, "norm_topk_prob", True)),
        routed_scaling_factor=float(_field(hf_config, "routed_scaling_factor", 1.0)),
        expert_groups=_field(hf_config, "n_group", None) or 1,
        top_groups=_field(hf_config, "topk_group", None) or 1,
        bias_update_rate=DEEPSEEK_V3_BIAS_UPDATE_RATE,
        aux_loss_weight=0.0,
        sequence_aux_loss_weight=DEEPSEEK_V3_SEQUENCE_AUX_LOSS_WEIGHT,
    )
    return config


def _deepseek_v2(hf_config):
    topk_method = _field(hf_config, "topk_method", "greedy")
    if topk_method != "greedy":
        raise ConversionError(
            f"config.json sets `topk_method`={topk_method!r}; only 'greedy' "
            "is supported for deepseek_v2 (group-limited greedy routing "
            "scores a group by its best expert, which keras-moe routers do "
            "not implement)."
        )
    config = _deepseek_common(hf_config, "deepseek_v2")
    config["rope_interleave"] = True
    top_k = config["top_k"]
    scaling = float(_field(hf_config, "routed_scaling_factor", 1.0))
    # DeepSeek-V2's gate either renormalises the k weights or scales them.
    normalize = bool(_field(hf_config, "norm_topk_prob", False)) and top_k > 1
    config["moe_options"] = dict(
        capacity_factor=None,
        score_function="softmax",
        normalize_top_k=normalize,
        routed_scaling_factor=1.0 if normalize else scaling,
        aux_loss_weight=float(_field(hf_config, "aux_loss_alpha", 0.001)),
    )
    return config


_IMPORTERS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
}


def check_model_type(hf_config):
    """The `model_type` of a transformers config, if keras-moe converts it.

    Raises:
        ConversionError: naming the `model_type` field and the supported
            values.
    """
    model_type = hf_config.get("model_type")
    if model_type not in _IMPORTERS:
        raise ConversionError(
            f"config.json field `model_type`={model_type!r} is not supported. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return model_type


def backbone_config_from_transformers(hf_config):
    """The `MoEBackbone` arguments equivalent to a transformers config.

    Routing is dropless (`capacity_factor=None`, as in transformers) with
    the family's scoring: softmax then renormalised top-k (Mixtral), softmax
    top-k renormalised only with `norm_topk_prob` (Qwen-MoE), greedy softmax
    top-k times `routed_scaling_factor` (DeepSeek-V2), sigmoid scores with
    group-limited selection over scores plus `e_score_correction_bias`
    (DeepSeek-V3, whose bias is the router's non-trainable `expert_bias`).
    DeepSeek's YaRN `rope_scaling` is kept (`MoEBackbone(rope_scaling=...)`);
    any other RoPE scaling is refused.
    Fine-tuning options are set from the config where it has them
    (`router_aux_loss_coef` -> `aux_loss_weight`); DeepSeek-V3 gets
    aux-loss-free bias balancing (`bias_update_rate=0.001`) and a 1e-4
    sequence-wise balance loss, as in its paper.

    Args:
        hf_config: dict, the contents of a transformers `config.json`.

    Returns:
        A dict of `MoEBackbone` keyword arguments.

    Raises:
        ConversionError: for an unsupported `model_type`, a missing field or
            a setting keras-moe models cannot reproduce (the message names
            the field).

    Example:

    >>> config = backbone_config_from_transformers({
    ...     "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    ...     "intermediate_size": 14336, "num_hidden_layers": 32,
    ...     "num_attention_heads": 32, "num_key_value_heads": 8,
    ...     "num_local_experts": 8, "num_experts_per_tok": 2,
    ...     "rope_theta": 1e6, "rms_norm_eps": 1e-5})
    >>> config["num_experts"], config["moe_intermediate_dim"], config["moe_options"]["capacity_factor"]
    (8, 14336, None)
    """
    return _IMPORTERS[check_model_type(hf_config)](hf_config)
