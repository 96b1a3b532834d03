"""GLM-4.5 and GLM-4.5-Air (`model_type="glm4_moe"`).

Grouped-query attention with q/k/v biases (`attention_bias`), optional
per-head q/k RMSNorm (`use_qk_norm`) and partial RoPE: only the first
`int(head_dim * partial_rotary_factor)` features of each head are rotated,
rotate-half within them (transformers' `Glm4MoeRotaryEmbedding`; the
factor defaults to 0.5 when the config leaves it out, as transformers
does). `first_k_dense_replace` dense layers, then MoE layers routed as
DeepSeek-V3 routes: sigmoid scores, group-limited selection (`n_group`,
`topk_group`) over scores plus `e_score_correction_bias` (the router's
non-trainable `expert_bias`), renormalised (`norm_topk_prob`) and scaled
by `routed_scaling_factor`, plus ungated shared experts of the routed
experts' width.

The released checkpoints also hold a multi-token prediction (MTP) layer
(`num_nextn_predict_layers`, stored as decoder layer `num_hidden_layers`):
it is used only for speculative decoding, is not part of the causal LM,
and its tensors are skipped on load (without a warning); an exported
checkpoint has none (`num_nextn_predict_layers=0`).
"""

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.families.deepseek import DEEPSEEK_V3_BIAS_UPDATE_RATE
from keras_moe.convert.families.deepseek import (
    DEEPSEEK_V3_SEQUENCE_AUX_LOSS_WEIGHT,
)
from keras_moe.convert.families.deepseek import check_deepseek_moe_layout
from keras_moe.convert.families.deepseek import deepseek_moe_fields
from keras_moe.convert.family import DECODER_TENSOR_NAMES
from keras_moe.convert.family import Family

_ATTENTION = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"
# transformers' default when a config has no `partial_rotary_factor`.
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5


class Glm4MoE(Family):
    """GLM-4.5 (355B) and GLM-4.5-Air (106B), zai-org/GLM-4.5*.

    Fine-tuning gets the aux-loss-free bias balancing (update rate 0.001)
    and 1e-4 sequence-wise balance loss of the GLM-4.5 report.

    Example:

    >>> config = Glm4MoE().backbone_config({
    ...     "model_type": "glm4_moe", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32,
    ...     "moe_intermediate_size": 8, "n_routed_experts": 8,
    ...     "n_shared_experts": 1, "num_experts_per_tok": 2,
    ...     "first_k_dense_replace": 1, "attention_bias": True,
    ...     "use_qk_norm": True, "routed_scaling_factor": 2.5})
    >>> config["partial_rotary_factor"], config["attention_bias"]
    (0.5, True)
    >>> config["moe_options"]["score_function"]
    'sigmoid'
    """

    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    score_function = "sigmoid"
    tensor_names = {
        **DECODER_TENSOR_NAMES,
        "attention/query/bias": f"{_ATTENTION}.q_proj.bias",
        "attention/key/bias": f"{_ATTENTION}.k_proj.bias",
        "attention/value/bias": f"{_ATTENTION}.v_proj.bias",
        "attention/query_norm/scale": f"{_ATTENTION}.q_norm.weight",
        "attention/key_norm/scale": f"{_ATTENTION}.k_norm.weight",
        "moe/router/expert_bias": f"{_MLP}.gate.e_score_correction_bias",
        "moe/shared_experts/gate_kernel": f"{_MLP}.shared_experts.gate_proj.weight",
        "moe/shared_experts/up_kernel": f"{_MLP}.shared_experts.up_proj.weight",
        "moe/shared_experts/down_kernel": f"{_MLP}.shared_experts.down_proj.weight",
    }
    attention_options = ("partial_rotary_factor",)

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
        config = self.decoder_config(hf_config)
        num_shared = int_field(hf_config, "n_shared_experts", 1)
        if num_shared < 1:
            raise ConversionError(
                f"config.json sets `n_shared_experts`={num_shared}; GLM-4.5 "
                "MoE layers have at least one shared expert."
            )
        config.update(
            num_key_value_heads=field(hf_config, "num_key_value_heads"),
            head_dim=field(hf_config, "head_dim"),
            attention_bias=bool(field(hf_config, "attention_bias", False)),
            use_qk_norm=bool(field(hf_config, "use_qk_norm", False)),
            partial_rotary_factor=config_fields.partial_rotary_factor(
                hf_config, DEFAULT_PARTIAL_ROTARY_FACTOR
            ),
            intermediate_dim=field(hf_config, "intermediate_size"),
            num_experts=config_fields.num_experts(hf_config),
            top_k=int_field(hf_config, "num_experts_per_tok"),
            moe_intermediate_dim=int_field(hf_config, "moe_intermediate_size"),
            num_shared_experts=num_shared,
            first_k_dense=min(
                int_field(hf_config, "first_k_dense_replace", 1),
                config["num_layers"],
            ),
            moe_options=dict(
                capacity_factor=None,
                score_function="sigmoid",
                normalize_top_k=bool(field(hf_config, "norm_topk_prob", True)),
                routed_scaling_factor=float(
                    field(hf_config, "routed_scaling_factor", 1.0)
                ),
                expert_groups=field(hf_config, "n_group", None) or 1,
                top_groups=field(hf_config, "topk_group", None) or 1,
                bias_update_rate=DEEPSEEK_V3_BIAS_UPDATE_RATE,
                aux_loss_weight=0.0,
                sequence_aux_loss_weight=DEEPSEEK_V3_SEQUENCE_AUX_LOSS_WEIGHT,
            ),
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) == "sigmoid_routing"
        )

    def check_exportable(self, backbone, moe):
        if moe["bias_update_rate"] == 0:
            self.refuse(
                "GLM-4.5 routers hold a balancing bias (set "
                "`moe_options={'bias_update_rate': ...}`)."
            )
        if moe.get("group_score", "top2_sum") != "top2_sum":
            self.refuse("GLM-4.5 scores a group by its two best experts.")
        if not backbone.num_shared_experts or backbone.shared_expert_gate:
            self.refuse("GLM-4.5 MoE layers have ungated shared experts.")
        check_deepseek_moe_layout(self, backbone, "GLM-4.5")

    def export_config(self, backbone, moe):
        return dict(
            head_dim=backbone.head_dim
            or backbone.hidden_dim // backbone.num_query_heads,
            attention_bias=backbone.attention_bias,
            use_qk_norm=backbone.use_qk_norm,
            partial_rotary_factor=backbone.partial_rotary_factor,
            n_group=moe["expert_groups"],
            topk_group=moe["top_groups"],
            num_nextn_predict_layers=0,
            **deepseek_moe_fields(backbone, moe),
        )


FAMILIES = (Glm4MoE(),)
