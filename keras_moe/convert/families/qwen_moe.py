"""Qwen-MoE (`"qwen2_moe"`, Qwen1.5/Qwen2-MoE) and Qwen3-MoE (`"qwen3_moe"`).

Grouped-query attention, softmax top-k routing renormalised only with
`norm_topk_prob`, and dense layers where `mlp_only_layers` and
`decoder_sparse_step` put them. Qwen2-MoE adds q/k/v biases and one shared
expert behind a sigmoid gate; Qwen3-MoE has per-head q/k RMSNorm and no
shared expert.
"""

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.family import DECODER_TENSOR_NAMES
from keras_moe.convert.family import Family
from keras_moe.convert.family import moe_layer_indices
from keras_moe.models.backbone_config import attention_layer_types

_ATTENTION = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"


def _moe_layers(hf_config, num_layers):
    """The MoE layer indices (`mlp_only_layers`, sparse step), or None when
    every layer is MoE."""
    num_experts = config_fields.num_experts(hf_config)
    step = config_fields.int_field(hf_config, "decoder_sparse_step", 1)
    dense = set(config_fields.field(hf_config, "mlp_only_layers", None) or [])
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


class _QwenMoE(Family):
    """What Qwen2-MoE and Qwen3-MoE share."""

    attention_options = ("sliding_window",)

    def uses_sliding_window(self, hf_config):
        # transformers drops `sliding_window` without `use_sliding_window`.
        return bool(hf_config.get("use_sliding_window", False))

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
        config = self.decoder_config(hf_config)
        config.update(
            num_key_value_heads=field(hf_config, "num_key_value_heads"),
            head_dim=field(hf_config, "head_dim"),
            intermediate_dim=field(hf_config, "intermediate_size"),
            num_experts=config_fields.num_experts(hf_config),
            top_k=int_field(hf_config, "num_experts_per_tok"),
            moe_intermediate_dim=int_field(hf_config, "moe_intermediate_size"),
            moe_layers=_moe_layers(hf_config, config["num_layers"]),
            moe_options=dict(
                capacity_factor=None,
                normalize_top_k=bool(field(hf_config, "norm_topk_prob", False)),
                aux_loss_weight=float(
                    field(hf_config, "router_aux_loss_coef", 0.001)
                ),
            ),
        )
        return config

    def check_exportable(self, backbone, moe):
        if moe["expert_groups"] != 1 or moe["bias_update_rate"] > 0:
            self.refuse("Qwen-MoE routers have no expert groups or balancing bias.")
        if moe["routed_scaling_factor"] != 1.0:
            self.refuse("its router scales weights (routed_scaling_factor).")

    def export_config(self, backbone, moe):
        moe_layers = moe_layer_indices(backbone)
        return dict(
            intermediate_size=backbone.intermediate_dim
            or backbone.moe_intermediate_dim,
            moe_intermediate_size=backbone.moe_intermediate_dim,
            num_experts=backbone.num_experts,
            norm_topk_prob=moe["normalize_top_k"],
            decoder_sparse_step=1,
            mlp_only_layers=[
                i for i in range(backbone.num_layers) if i not in moe_layers
            ],
            router_aux_loss_coef=moe["aux_loss_weight"],
            use_sliding_window=backbone.sliding_window is not None,
            sliding_window=backbone.sliding_window,
        )


class Qwen2MoE(_QwenMoE):
    """Qwen1.5-MoE and Qwen2-MoE: q/k/v biases and a gated shared expert.

    Example:

    >>> config = Qwen2MoE().backbone_config({
    ...     "model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 2,
    ...     "intermediate_size": 32, "moe_intermediate_size": 8,
    ...     "shared_expert_intermediate_size": 24, "num_experts": 4,
    ...     "num_experts_per_tok": 2})
    >>> config["num_shared_experts"], config["shared_expert_gate"]
    (1, True)
    """

    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    attention_options = ("sliding_window", "attention_layer_types")
    tensor_names = {
        **DECODER_TENSOR_NAMES,
        "attention/query/bias": f"{_ATTENTION}.q_proj.bias",
        "attention/key/bias": f"{_ATTENTION}.k_proj.bias",
        "attention/value/bias": f"{_ATTENTION}.v_proj.bias",
        "moe/shared_experts/gate_kernel": f"{_MLP}.shared_expert.gate_proj.weight",
        "moe/shared_experts/up_kernel": f"{_MLP}.shared_expert.up_proj.weight",
        "moe/shared_experts/down_kernel": f"{_MLP}.shared_expert.down_proj.weight",
        "moe/shared_gate_kernel": f"{_MLP}.shared_expert_gate.weight",
    }

    def attention_window(self, hf_config):
        """Qwen2-MoE slides on the layers `layer_types` names, by default
        the even-indexed ones below `max_window_layers` (transformers 5)."""
        window = None
        if self.uses_sliding_window(hf_config):
            window = config_fields.sliding_window(hf_config)
        if window is None:
            return dict(sliding_window=None, attention_layer_types=None)
        num_layers = config_fields.int_field(hf_config, "num_hidden_layers")
        layer_types = hf_config.get("layer_types")
        if layer_types is None:
            max_window_layers = config_fields.int_field(
                hf_config, "max_window_layers", 28
            )
            layer_types = [
                "sliding_attention"
                if i % 2 == 0 and i < max_window_layers
                else "full_attention"
                for i in range(num_layers)
            ]
        if "sliding_attention" not in layer_types:
            window = None
        return dict(
            sliding_window=window,
            attention_layer_types=list(layer_types) if window else None,
        )

    def backbone_config(self, hf_config):
        config = super().backbone_config(hf_config)
        config.update(
            attention_bias=bool(config_fields.field(hf_config, "qkv_bias", True)),
            num_shared_experts=1,
            shared_intermediate_dim=config_fields.int_field(
                hf_config, "shared_expert_intermediate_size"
            ),
            shared_expert_gate=True,
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) is None
            and not backbone.use_qk_norm
            and bool(backbone.num_shared_experts)
        )

    def check_exportable(self, backbone, moe):
        super().check_exportable(backbone, moe)
        if not (backbone.num_shared_experts and backbone.shared_expert_gate):
            self.refuse("Qwen2-MoE layers have one gated shared expert.")

    def export_config(self, backbone, moe):
        config = super().export_config(backbone, moe)
        config.update(
            qkv_bias=backbone.attention_bias,
            shared_expert_intermediate_size=moe["shared_intermediate_dim"],
        )
        if backbone.sliding_window is not None:
            config["max_window_layers"] = backbone.num_layers
            config["layer_types"] = attention_layer_types(backbone.get_config())
        if backbone.head_dim is not None:
            config["head_dim"] = backbone.head_dim
        return config


class Qwen3MoE(_QwenMoE):
    """Qwen3-MoE: per-head q/k RMSNorm, no biases, no shared expert.

    Example:

    >>> config = Qwen3MoE().backbone_config({
    ...     "model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 8,
    ...     "intermediate_size": 32, "moe_intermediate_size": 8,
    ...     "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True})
    >>> config["use_qk_norm"], config["moe_options"]["normalize_top_k"]
    (True, True)
    """

    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    tensor_names = {
        **DECODER_TENSOR_NAMES,
        "attention/query_norm/scale": f"{_ATTENTION}.q_norm.weight",
        "attention/key_norm/scale": f"{_ATTENTION}.k_norm.weight",
    }

    def backbone_config(self, hf_config):
        if hf_config.get("attention_bias"):
            raise ConversionError(
                "config.json sets `attention_bias`=true: Qwen3-MoE then has a "
                "bias on the attention output projection too, which keras-moe "
                "attention does not have."
            )
        config = super().backbone_config(hf_config)
        config.update(use_qk_norm=True)
        return config

    def describes(self, backbone, moe):
        # Per-head q/k norm: OLMoE's is projection-wide.
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) is None
            and bool(backbone.use_qk_norm)
            and bool(backbone.qk_norm_per_head)
        )

    def check_exportable(self, backbone, moe):
        super().check_exportable(backbone, moe)
        if (
            not backbone.use_qk_norm
            or backbone.attention_bias
            or backbone.num_shared_experts
        ):
            self.refuse(
                "Qwen3-MoE has q/k norm, no attention bias and no shared expert."
            )

    def export_config(self, backbone, moe):
        config = super().export_config(backbone, moe)
        config.update(
            head_dim=backbone.head_dim
            or backbone.hidden_dim // backbone.num_query_heads,
            attention_bias=False,
        )
        return config


FAMILIES = (Qwen2MoE(), Qwen3MoE())
