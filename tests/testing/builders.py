"""Tiny models shared by the tests: one place for their sizes."""

import keras
import numpy as np

from keras_moe import presets
from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import SharedExpertMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE

# Every preset at tiny widths of the same structure: attention kind, dense
# and MoE layers, shared experts, routing options.
PRESET_SHRINK = dict(
    vocabulary_size=64, hidden_dim=16, num_query_heads=2, intermediate_dim=16,
    moe_intermediate_dim=8,
)
MLA_SHRINK = dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
TINY_PRESET_OVERRIDES = {
    "deepseek_small": dict(num_layers=2, q_lora_rank=8, num_experts=8, top_k=2, **MLA_SHRINK),
    "deepseek_v2_lite": dict(num_layers=2, num_experts=8, top_k=2, **MLA_SHRINK),
    "deepseek_v3": dict(num_layers=2, first_k_dense=1, q_lora_rank=8, num_experts=16,
                        top_k=4, **MLA_SHRINK),
    "mixtral_8x22b": dict(num_layers=1, num_key_value_heads=1, head_dim=8),
    "mixtral_8x7b": dict(num_layers=1, num_key_value_heads=1, head_dim=8),
    "mixtral_small": dict(num_layers=1, num_key_value_heads=1),
    "switch_decoder_base_8": dict(num_layers=2, num_key_value_heads=2, head_dim=8),
    "switch_decoder_small": dict(num_layers=2, num_key_value_heads=2),
    "dbrx": dict(num_layers=1, num_key_value_heads=1, num_experts=4, top_k=2),
    "deepseek_v2": dict(num_layers=2, q_lora_rank=8, num_experts=16, **MLA_SHRINK),
    "glm_4_5": dict(num_layers=2, first_k_dense=1, num_key_value_heads=1, head_dim=8,
                    num_experts=8, top_k=2),
    "glm_4_5_air": dict(num_layers=2, first_k_dense=1, num_key_value_heads=1, head_dim=8,
                        num_experts=8, top_k=2),
    "gpt_oss_20b": dict(num_layers=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                        attention_layer_types=["sliding_attention", "full_attention"]),
    "gpt_oss_120b": dict(num_layers=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         attention_layer_types=["sliding_attention", "full_attention"]),
    "gpt_oss_small": dict(num_layers=2, num_key_value_heads=1),
    "grok_1": dict(num_layers=1, num_key_value_heads=1, head_dim=8),
    "llama4_maverick": dict(num_layers=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                            shared_intermediate_dim=8, nope_layers=[1]),
    "llama4_scout": dict(num_layers=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         shared_intermediate_dim=8, nope_layers=[1]),
    "olmoe_1b_7b": dict(num_layers=1, num_key_value_heads=1, num_experts=8),
}

# A small backbone (dropless MoE layers) that runs in well under a second
# on every backend.
TINY_BACKBONE = dict(
    vocabulary_size=32, num_layers=2, hidden_dim=16, num_query_heads=4,
    num_key_value_heads=2, intermediate_dim=24, num_experts=4, top_k=2,
    moe_intermediate_dim=8, moe_options={"capacity_factor": None},
)


def load_preset(name="mixtral_small", *, seed=0, **overrides):
    """`presets.load(name)` without preprocessor, seeded, at the preset's
    own widths unless overridden."""
    keras.utils.set_random_seed(seed)
    return presets.load(name, preprocessor=None, **overrides)


def tiny_preset(name="mixtral_small", *, seed=0, **overrides):
    """Preset `name` at tiny widths of the same structure (a causal LM)."""
    return load_preset(
        name, seed=seed, **dict(PRESET_SHRINK, **TINY_PRESET_OVERRIDES[name], **overrides)
    )


def tiny_backbone_config(**overrides):
    """`MoEBackbone` arguments of a two-layer model, updated by `overrides`."""
    config = dict(TINY_BACKBONE, moe_options=dict(TINY_BACKBONE["moe_options"]))
    config.update(overrides)
    return config


def token_batch(batch=2, length=7, vocabulary_size=64, seed=0, padding=2, padded_row=-1):
    """Random token ids and a padding mask whose row `padded_row` ends in
    `padding` padding positions."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocabulary_size, size=(batch, length)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[padded_row, length - padding :] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def token_moe_model(vocabulary_size=64, length=7):
    """Embeddings, a DeepSeek-style MoE layer named "moe" (gated shared
    expert, sigmoid scores, balancing bias, auxiliary losses) with a
    residual, then logits."""
    token_ids = keras.Input((length,), dtype="int32")
    hidden = keras.layers.Embedding(vocabulary_size, 16)(token_ids)
    moe = SharedExpertMoE(
        8, 8, top_k=2, score_function="sigmoid", expert_groups=4, top_groups=2,
        bias_update_rate=0.01, shared_expert_gate=True, z_loss_weight=0.01,
        sequence_aux_loss_weight=0.01, name="moe",
    )
    hidden = keras.layers.Add()([hidden, moe(hidden)])
    return keras.Model(token_ids, keras.layers.Dense(vocabulary_size)(hidden))


# One MoE layer of each routing kind, on 4 experts of hidden width 4.
ROUTED_LAYER_CASES = {
    "softmax_capacity": lambda: SparseMoE(4, 4, top_k=2, capacity_factor=1.0,
                                          z_loss_weight=0.01),
    "sigmoid_groups_bias": lambda: SparseMoE(
        4, 4, top_k=2, score_function="sigmoid", expert_groups=2, top_groups=1,
        bias_update_rate=0.01, sequence_aux_loss_weight=0.01, capacity_factor=None),
    "expert_choice": lambda: SparseMoE(4, 4, routing="expert_choice", z_loss_weight=0.01),
    "shared": lambda: SharedExpertMoE(4, 4, top_k=2, shared_expert_gate=True),
    "hierarchical": lambda: HierarchicalMoE(2, 2, 4, top_groups=1, top_k=2, z_loss_weight=0.01),
    "soft": lambda: SoftMoE(4, 4),
}
