"""OLMoE (`model_type="olmoe"`): every layer a softmax top-k MoE.

Grouped-query attention whose queries and keys are RMS-normalized over the
whole projection (one `[H * h]` and one `[K * h]` scale, not one per head
as in Qwen3: `MoEBackbone(qk_norm_per_head=False)`), optionally clamped to
`[-clip_qkv, clip_qkv]` after the norm, then rotated. Every layer is a
`SparseMoE` whose router takes the top-k of the softmax without
renormalising it (`norm_topk_prob`, False in the released models), and
there are no shared experts. Tensor names are Llama's.
"""

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.family import DECODER_TENSOR_NAMES
from keras_moe.convert.family import Family
from keras_moe.convert.family import moe_layer_indices

_ATTENTION = "model.layers.{layer}.self_attn"


class OLMoE(Family):
    """OLMoE-1B-7B and its fine-tunes (allenai/OLMoE-*).

    Example:

    >>> config = OLMoE().backbone_config({
    ...     "model_type": "olmoe", "vocab_size": 64, "hidden_size": 16,
    ...     "intermediate_size": 8, "num_hidden_layers": 2,
    ...     "num_attention_heads": 4, "num_experts": 8,
    ...     "num_experts_per_tok": 2, "clip_qkv": 8.0})
    >>> config["qk_norm_per_head"], config["clip_qkv"]
    (False, 8.0)
    >>> config["moe_options"]["normalize_top_k"]
    False
    """

    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    tensor_names = {
        **DECODER_TENSOR_NAMES,
        "attention/query_norm/scale": f"{_ATTENTION}.q_norm.weight",
        "attention/key_norm/scale": f"{_ATTENTION}.k_norm.weight",
    }
    attention_options = ("qk_norm_per_head", "clip_qkv")

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
        if hf_config.get("attention_bias"):
            raise ConversionError(
                "config.json sets `attention_bias`=true: OLMoE then has a "
                "bias on the attention output projection too, which keras-moe "
                "attention does not have."
            )
        config = self.decoder_config(hf_config)
        head_dim = hf_config.get("head_dim")
        natural = config["hidden_dim"] // config["num_query_heads"]
        if head_dim is not None and head_dim != natural:
            raise ConversionError(
                f"config.json sets `head_dim`={head_dim!r}; OLMoE's query "
                "norm spans `hidden_size` features, so only head_dim = "
                f"hidden_size // num_attention_heads = {natural} is supported."
            )
        clip_qkv = field(hf_config, "clip_qkv", None)
        config.update(
            num_key_value_heads=field(hf_config, "num_key_value_heads"),
            use_qk_norm=True,
            qk_norm_per_head=False,
            clip_qkv=None if clip_qkv is None else float(clip_qkv),
            num_experts=config_fields.num_experts(hf_config),
            top_k=int_field(hf_config, "num_experts_per_tok", 8),
            moe_intermediate_dim=int_field(hf_config, "intermediate_size"),
            moe_options=dict(
                capacity_factor=None,
                normalize_top_k=bool(field(hf_config, "norm_topk_prob", False)),
                aux_loss_weight=float(
                    field(hf_config, "router_aux_loss_coef", 0.01)
                ),
            ),
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) is None
            and bool(backbone.use_qk_norm)
            and not backbone.qk_norm_per_head
        )

    def check_exportable(self, backbone, moe):
        if moe["expert_groups"] != 1 or moe["bias_update_rate"] > 0:
            self.refuse("OLMoE routers have no expert groups or balancing bias.")
        if moe["routed_scaling_factor"] != 1.0:
            self.refuse("its router scales weights (routed_scaling_factor).")
        if len(moe_layer_indices(backbone)) != backbone.num_layers:
            self.refuse("every OLMoE layer is a MoE layer.")
        if backbone.attention_bias or backbone.num_shared_experts:
            self.refuse("OLMoE has no attention biases or shared experts.")
        if not backbone.use_qk_norm or backbone.qk_norm_per_head:
            self.refuse(
                "OLMoE normalizes the whole query and key projections "
                "(use_qk_norm=True, qk_norm_per_head=False)."
            )
        if backbone.head_dim not in (
            None,
            backbone.hidden_dim // backbone.num_query_heads,
        ):
            self.refuse("OLMoE heads are hidden_dim // num_query_heads wide.")

    def export_config(self, backbone, moe):
        return dict(
            intermediate_size=backbone.moe_intermediate_dim,
            num_experts=backbone.num_experts,
            norm_topk_prob=moe["normalize_top_k"],
            router_aux_loss_coef=moe["aux_loss_weight"],
            clip_qkv=backbone.clip_qkv,
            attention_bias=False,
        )


FAMILIES = (OLMoE(),)
