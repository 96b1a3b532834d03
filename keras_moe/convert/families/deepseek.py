"""DeepSeek-V2 (`"deepseek_v2"`) and DeepSeek-V3 (`"deepseek_v3"`).

Multi-head latent attention (with YaRN RoPE when the config asks for it),
`first_k_dense_replace` dense layers then MoE layers with ungated shared
experts of the routed experts' width. DeepSeek-V2 routes with softmax
scores, top-k over all experts (`topk_method="greedy"`) or over the
`topk_group` groups whose best expert scores highest
(`"group_limited_greedy"`, the router's `group_score="max"`), renormalised
or scaled by `routed_scaling_factor`; DeepSeek-V3 with sigmoid scores,
group-limited selection over scores plus `e_score_correction_bias` (the
router's non-trainable `expert_bias`), groups scored by their two best
experts (`group_score="top2_sum"`), renormalised and scaled.
"""

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.family import DECODER_TENSOR_NAMES
from keras_moe.convert.family import Family
from keras_moe.convert.family import moe_layer_indices

# DeepSeek-V3's aux-loss-free balancing and sequence-wise loss, for
# fine-tuning (they do not change the forward pass).
DEEPSEEK_V3_BIAS_UPDATE_RATE = 0.001
DEEPSEEK_V3_SEQUENCE_AUX_LOSS_WEIGHT = 1e-4
# The multi-token prediction loss weight of DeepSeek-V3's last 4.8T
# pre-training tokens (0.3 before), for fine-tuning with its MTP layer.
DEEPSEEK_V3_MTP_LOSS_WEIGHT = 0.1

_ATTENTION = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"
_TENSOR_NAMES = {
    **DECODER_TENSOR_NAMES,
    "attention/q_proj/kernel": f"{_ATTENTION}.q_proj.weight",
    "attention/q_a_proj/kernel": f"{_ATTENTION}.q_a_proj.weight",
    "attention/q_a_norm/scale": f"{_ATTENTION}.q_a_layernorm.weight",
    "attention/q_b_proj/kernel": f"{_ATTENTION}.q_b_proj.weight",
    "attention/kv_a_proj_with_mqa/kernel": f"{_ATTENTION}.kv_a_proj_with_mqa.weight",
    "attention/kv_a_norm/scale": f"{_ATTENTION}.kv_a_layernorm.weight",
    "attention/kv_b_proj/kernel": f"{_ATTENTION}.kv_b_proj.weight",
    "attention/o_proj/kernel": f"{_ATTENTION}.o_proj.weight",
    "moe/shared_experts/gate_kernel": f"{_MLP}.shared_experts.gate_proj.weight",
    "moe/shared_experts/up_kernel": f"{_MLP}.shared_experts.up_proj.weight",
    "moe/shared_experts/down_kernel": f"{_MLP}.shared_experts.down_proj.weight",
}


# DeepSeek-V2's `topk_method`s: top-k of all experts, or of the best groups.
TOPK_METHODS_V2 = ("greedy", "group_limited_greedy")


def _expert_groups(hf_config, config):
    """`expert_groups` and `top_groups` from `n_group` and `topk_group`."""
    num_experts, top_k = config["num_experts"], config["top_k"]
    groups = config_fields.field(hf_config, "n_group", None) or 1
    top_groups = config_fields.field(hf_config, "topk_group", None) or 1
    for name, value in (("n_group", groups), ("topk_group", top_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(
                f"config.json field `{name}` must be a positive integer. "
                f"Received: {name}={value!r}"
            )
    if num_experts % groups:
        raise ConversionError(
            f"config.json sets `n_group`={groups}, which does not divide "
            f"`n_routed_experts`={num_experts}."
        )
    if top_groups > groups or top_k > top_groups * (num_experts // groups):
        raise ConversionError(
            f"config.json sets `topk_group`={top_groups}: it must be at most "
            f"`n_group`={groups}, and its groups must hold at least "
            f"`num_experts_per_tok`={top_k} experts "
            f"({num_experts // groups} per group)."
        )
    return dict(expert_groups=groups, top_groups=top_groups)


def check_deepseek_moe_layout(family, backbone, name):
    """Refuse what DeepSeekMoE's layout (DeepSeek, GLM-4.5) cannot hold.

    Dense layers come first (`first_k_dense_replace` of them), then MoE
    layers only; shared experts have the routed experts' width.

    Args:
        family: the exporting `Family` (it refuses).
        backbone: the `MoEBackbone` being exported.
        name: the model family's name, for the message.

    Raises:
        ConversionError: naming what differs.
    """
    expected = list(range(backbone.first_k_dense, backbone.num_layers))
    if moe_layer_indices(backbone) != expected:
        family.refuse(
            f"{name} models are dense for `first_k_dense_replace` layers, "
            "then MoE."
        )
    if backbone.num_shared_experts and backbone.shared_intermediate_dim not in (
        None,
        backbone.num_shared_experts * backbone.moe_intermediate_dim,
    ):
        family.refuse(f"{name} shared experts have the routed experts' width.")


def deepseek_moe_fields(backbone, moe):
    """The `config.json` fields of DeepSeekMoE's layout (DeepSeek, GLM-4.5).

    Args:
        backbone: the `MoEBackbone` being exported.
        moe: its MoE layers' settings (`moe_settings`).

    Returns:
        A dict of config fields.
    """
    return dict(
        intermediate_size=backbone.intermediate_dim or backbone.moe_intermediate_dim,
        moe_intermediate_size=backbone.moe_intermediate_dim,
        n_routed_experts=backbone.num_experts,
        n_shared_experts=backbone.num_shared_experts,
        first_k_dense_replace=backbone.first_k_dense,
        routed_scaling_factor=moe["routed_scaling_factor"],
        norm_topk_prob=moe["normalize_top_k"],
    )


class _DeepSeek(Family):
    """What DeepSeek-V2 and DeepSeek-V3 share."""

    attention_type = "mla"
    yarn = True
    tensor_names = _TENSOR_NAMES

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
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
        config = self.decoder_config(hf_config)
        config.update(
            attention_type="mla",
            q_lora_rank=field(hf_config, "q_lora_rank"),
            kv_lora_rank=int_field(hf_config, "kv_lora_rank"),
            qk_nope_head_dim=int_field(hf_config, "qk_nope_head_dim"),
            qk_rope_head_dim=int_field(hf_config, "qk_rope_head_dim"),
            v_head_dim=int_field(hf_config, "v_head_dim"),
            intermediate_dim=field(hf_config, "intermediate_size"),
            num_experts=config_fields.num_experts(hf_config),
            top_k=int_field(hf_config, "num_experts_per_tok"),
            moe_intermediate_dim=int_field(hf_config, "moe_intermediate_size"),
            num_shared_experts=field(hf_config, "n_shared_experts", 0) or 0,
            first_k_dense=min(
                int_field(hf_config, "first_k_dense_replace", 0),
                config["num_layers"],
            ),
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and moe["score_function"] == self.score_function
        )

    def check_exportable(self, backbone, moe):
        check_deepseek_moe_layout(self, backbone, "DeepSeek")
        if backbone.shared_expert_gate:
            self.refuse("DeepSeek shared experts have no gate.")

    def export_config(self, backbone, moe):
        config = dict(
            num_key_value_heads=backbone.num_query_heads,
            q_lora_rank=backbone.q_lora_rank,
            kv_lora_rank=backbone.kv_lora_rank,
            qk_nope_head_dim=backbone.qk_nope_head_dim,
            qk_rope_head_dim=backbone.qk_rope_head_dim,
            v_head_dim=backbone.v_head_dim,
            moe_layer_freq=1,
            attention_bias=False,
            **deepseek_moe_fields(backbone, moe),
        )
        if backbone.rope_scaling is not None:
            scaling = {
                key: value
                for key, value in backbone.rope_scaling.items()
                if value is not None
            }
            config["rope_scaling"] = {"type": "yarn", **scaling}
            config["max_position_embeddings"] = int(
                scaling["factor"] * scaling["original_max_position_embeddings"]
            )
        return config


class DeepSeekV2(_DeepSeek):
    """DeepSeek-V2 and V2-Lite: softmax top-k, renormalised or scaled.

    `topk_method="greedy"` (V2-Lite) picks the top-k of all experts;
    `"group_limited_greedy"` (DeepSeek-V2, its device-limited routing) first
    keeps the `topk_group` of `n_group` expert groups whose best expert
    scores highest.

    Example:

    >>> config = DeepSeekV2().backbone_config({
    ...     "model_type": "deepseek_v2", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 2,
    ...     "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
    ...     "v_head_dim": 4, "intermediate_size": 32,
    ...     "moe_intermediate_size": 8, "n_routed_experts": 4,
    ...     "num_experts_per_tok": 2, "routed_scaling_factor": 2.0})
    >>> config["moe_options"]["routed_scaling_factor"]
    2.0
    >>> config = DeepSeekV2().backbone_config({
    ...     "model_type": "deepseek_v2", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 2,
    ...     "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
    ...     "v_head_dim": 4, "intermediate_size": 32,
    ...     "moe_intermediate_size": 8, "n_routed_experts": 8,
    ...     "num_experts_per_tok": 2, "topk_method": "group_limited_greedy",
    ...     "n_group": 4, "topk_group": 2})
    >>> options = config["moe_options"]
    >>> options["expert_groups"], options["top_groups"], options["group_score"]
    (4, 2, 'max')
    """

    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"

    def backbone_config(self, hf_config):
        field = config_fields.field
        topk_method = field(hf_config, "topk_method", "greedy")
        if topk_method not in TOPK_METHODS_V2:
            raise ConversionError(
                f"config.json sets `topk_method`={topk_method!r}; deepseek_v2 "
                f"supports {TOPK_METHODS_V2}."
            )
        config = super().backbone_config(hf_config)
        config["rope_interleave"] = True
        scaling = float(field(hf_config, "routed_scaling_factor", 1.0))
        # DeepSeek-V2's gate either renormalises the k weights or scales them.
        normalize = bool(field(hf_config, "norm_topk_prob", False)) and (
            config["top_k"] > 1
        )
        config["moe_options"] = dict(
            capacity_factor=None,
            score_function="softmax",
            normalize_top_k=normalize,
            routed_scaling_factor=1.0 if normalize else scaling,
            aux_loss_weight=float(field(hf_config, "aux_loss_alpha", 0.001)),
        )
        if topk_method == "group_limited_greedy":
            config["moe_options"].update(
                _expert_groups(hf_config, config), group_score="max"
            )
        return config

    def check_exportable(self, backbone, moe):
        if moe["bias_update_rate"] > 0:
            self.refuse("balancing biases are DeepSeek-V3's.")
        if backbone.num_mtp_layers:
            self.refuse("multi-token prediction layers are DeepSeek-V3's.")
        if moe["expert_groups"] != 1 and moe.get("group_score") != "max":
            self.refuse(
                "DeepSeek-V2's group-limited routing scores a group by its "
                "best expert (`group_score='max'`); the sum of the two best "
                "is DeepSeek-V3's."
            )
        super().check_exportable(backbone, moe)
        if moe["normalize_top_k"] and moe["routed_scaling_factor"] != 1.0:
            self.refuse("DeepSeek-V2 renormalises or scales the weights, not both.")
        if backbone.rope_interleave is False:
            self.refuse("DeepSeek-V2 rotates interleaved pairs.")

    def export_config(self, backbone, moe):
        config = super().export_config(backbone, moe)
        grouped = moe["expert_groups"] != 1
        config.update(
            topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=moe["expert_groups"] if grouped else None,
            topk_group=moe["top_groups"] if grouped else None,
            aux_loss_alpha=moe["aux_loss_weight"],
            scoring_func="softmax",
        )
        return config


class DeepSeekV3(_DeepSeek):
    """DeepSeek-V3 (and R1): sigmoid, group-limited, bias-balanced routing.

    Fine-tuning gets aux-loss-free bias balancing (`bias_update_rate=0.001`)
    and a 1e-4 sequence-wise balance loss, as in the paper.

    Example:

    >>> config = DeepSeekV3().backbone_config({
    ...     "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 2,
    ...     "q_lora_rank": 12, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
    ...     "qk_rope_head_dim": 4, "v_head_dim": 4, "intermediate_size": 32,
    ...     "moe_intermediate_size": 8, "n_routed_experts": 8,
    ...     "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2})
    >>> options = config["moe_options"]
    >>> options["score_function"], options["expert_groups"], options["top_groups"]
    ('sigmoid', 4, 2)
    """

    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    score_function = "sigmoid"
    tensor_names = {
        **_TENSOR_NAMES,
        "moe/router/expert_bias": f"{_MLP}.gate.e_score_correction_bias",
        # The multi-token prediction layer, stored as layer
        # `num_hidden_layers` (README_WEIGHTS.md of deepseek-ai/DeepSeek-V3);
        # its decoder block has the names above.
        "enorm/scale": "model.layers.{layer}.enorm.weight",
        "hnorm/scale": "model.layers.{layer}.hnorm.weight",
        "eh_proj/kernel": "model.layers.{layer}.eh_proj.weight",
        "head_norm/scale": "model.layers.{layer}.shared_head.norm.weight",
    }

    def backbone_config(self, hf_config):
        field = config_fields.field
        config = super().backbone_config(hf_config)
        config["rope_interleave"] = bool(field(hf_config, "rope_interleave", True))
        groups = _expert_groups(hf_config, config)
        config["moe_options"] = dict(
            capacity_factor=None,
            score_function="sigmoid",
            normalize_top_k=bool(field(hf_config, "norm_topk_prob", True)),
            routed_scaling_factor=float(
                field(hf_config, "routed_scaling_factor", 1.0)
            ),
            **groups,
            group_score="top2_sum",
            bias_update_rate=DEEPSEEK_V3_BIAS_UPDATE_RATE,
            aux_loss_weight=0.0,
            sequence_aux_loss_weight=DEEPSEEK_V3_SEQUENCE_AUX_LOSS_WEIGHT,
        )
        # `from_transformers` keeps those the checkpoint holds (transformers
        # saves none: its model ignores them).
        config["num_mtp_layers"] = config_fields.int_field(
            hf_config, "num_nextn_predict_layers", 0
        )
        config["mtp_loss_weight"] = DEEPSEEK_V3_MTP_LOSS_WEIGHT
        return config

    def tensor_copies(self, backbone):
        """Tensors the checkpoints store again under other names.

        Each multi-token prediction layer holds its own copy of the
        embedding (`embed_tokens`) and output head (`shared_head.head`),
        which the model shares with the main one.

        Args:
            backbone: the `MoEBackbone` being exported.

        Returns:
            A dict, tensor name -> list of the names of its copies.
        """
        copies = {"model.embed_tokens.weight": [], "lm_head.weight": []}
        for k in range(backbone.num_mtp_layers):
            layer = f"model.layers.{backbone.num_layers + k}"
            copies["model.embed_tokens.weight"].append(f"{layer}.embed_tokens.weight")
            copies["lm_head.weight"].append(f"{layer}.shared_head.head.weight")
        return copies

    def check_exportable(self, backbone, moe):
        if moe["bias_update_rate"] == 0:
            self.refuse(
                "DeepSeek-V3 routers hold a balancing bias (set "
                "`moe_options={'bias_update_rate': ...}`)."
            )
        if moe["expert_groups"] != 1 and moe.get("group_score") == "max":
            self.refuse(
                "DeepSeek-V3's group-limited routing scores a group by the sum "
                "of its two best experts (`group_score='top2_sum'`)."
            )
        super().check_exportable(backbone, moe)

    def export_config(self, backbone, moe):
        config = super().export_config(backbone, moe)
        config.update(
            n_group=moe["expert_groups"],
            topk_group=moe["top_groups"],
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            rope_interleave=backbone.rope_interleave is not False,
            num_nextn_predict_layers=backbone.num_mtp_layers,
        )
        return config


FAMILIES = (DeepSeekV2(), DeepSeekV3())
