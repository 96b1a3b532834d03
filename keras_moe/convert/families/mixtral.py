"""Mixtral (`model_type="mixtral"`): every layer a softmax top-k MoE.

Grouped-query attention without biases (with the config's
`sliding_window` on every layer when it sets one), every layer a `SparseMoE` whose
router renormalises the top-k softmax weights, no shared experts. The
checkpoints name the MoE block `block_sparse_moe` and the expert
projections `w1` (gate), `w3` (up) and `w2` (down).
"""

from keras_moe.convert import config_fields
from keras_moe.convert.family import DECODER_TENSOR_NAMES
from keras_moe.convert.family import Family
from keras_moe.convert.family import moe_layer_indices

_MOE = "model.layers.{layer}.block_sparse_moe"


class Mixtral(Family):
    """Mixtral-8x7B, Mixtral-8x22B and their fine-tunes.

    Example:

    >>> config = Mixtral().backbone_config({
    ...     "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    ...     "intermediate_size": 14336, "num_hidden_layers": 32,
    ...     "num_attention_heads": 32, "num_key_value_heads": 8,
    ...     "num_local_experts": 8, "num_experts_per_tok": 2})
    >>> config["num_experts"], config["moe_options"]["normalize_top_k"]
    (8, True)
    """

    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    rope_theta = 1e6
    tensor_names = {
        **DECODER_TENSOR_NAMES,
        "moe/router/kernel": f"{_MOE}.gate.weight",
        "moe/experts/gate_kernel": _MOE + ".experts.{expert}.w1.weight",
        "moe/experts/up_kernel": _MOE + ".experts.{expert}.w3.weight",
        "moe/experts/down_kernel": _MOE + ".experts.{expert}.w2.weight",
    }
    # transformers >= 5 names the MoE block `mlp` in memory, so a state dict
    # saved as it is uses that name.
    checkpoint_aliases = ((".block_sparse_moe.", ".mlp."),)
    expert_projections = ("w1", "w3", "w2")
    attention_options = ("sliding_window",)

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
        config = self.decoder_config(hf_config)
        config.update(
            num_key_value_heads=field(hf_config, "num_key_value_heads"),
            head_dim=field(hf_config, "head_dim"),
            num_experts=config_fields.num_experts(hf_config),
            top_k=int_field(hf_config, "num_experts_per_tok", 2),
            moe_intermediate_dim=int_field(hf_config, "intermediate_size"),
            moe_options=dict(
                capacity_factor=None,
                normalize_top_k=True,
                aux_loss_weight=float(field(hf_config, "router_aux_loss_coef", 0.02)),
                jitter=float(field(hf_config, "router_jitter_noise", 0.0) or 0.0),
            ),
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) is None
            and not backbone.use_qk_norm
            and not backbone.num_shared_experts
        )

    def check_exportable(self, backbone, moe):
        if moe["expert_groups"] != 1 or moe["bias_update_rate"] > 0:
            self.refuse("Mixtral routers have no expert groups or balancing bias.")
        if moe["routed_scaling_factor"] != 1.0:
            self.refuse("its router scales weights (routed_scaling_factor).")
        if not moe["normalize_top_k"]:
            self.refuse("Mixtral renormalises the top-k weights.")
        if len(moe_layer_indices(backbone)) != backbone.num_layers:
            self.refuse("every Mixtral layer is a MoE layer.")
        if backbone.attention_bias or backbone.num_shared_experts:
            self.refuse("Mixtral has no attention biases or shared experts.")

    def export_config(self, backbone, moe):
        return dict(
            head_dim=backbone.head_dim,
            intermediate_size=backbone.moe_intermediate_dim,
            num_local_experts=backbone.num_experts,
            router_aux_loss_coef=moe["aux_loss_weight"],
            router_jitter_noise=moe["jitter"],
            sliding_window=backbone.sliding_window,
        )


FAMILIES = (Mixtral(),)
