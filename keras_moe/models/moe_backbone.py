"""`MoEBackbone`: a decoder-only Mixture-of-Experts transformer.

One configuration covers Mixtral, Qwen-MoE / Qwen3-MoE, OLMoE, DBRX-style
and DeepSeek-V2/V3-style decoders. The weights it holds are exactly these
(variable paths as in `model.weights`; `d` = hidden_dim,
`V` = vocabulary_size), so that `count_params()` follows from the
configuration alone:

Embedding, final norm and head:
- `token_embedding/embeddings [V, d]`
- `token_embedding/reverse_embeddings [d, V]`, unless `tie_word_embeddings`
- `final_norm/scale [d]`

In each of the `num_layers` blocks, under `decoder_block_{i}/`:
- `pre_attention_norm/scale [d]`, `pre_feedforward_norm/scale [d]`
- `attention_type="gqa"` (`H` = num_query_heads, `K` = num_key_value_heads
  or H, `h` = head_dim or d // H):
  `attention/query/kernel [d, H, h]`, `attention/key/kernel [d, K, h]`,
  `attention/value/kernel [d, K, h]`, `attention/attention_output/kernel
  [H, h, d]`; with `attention_bias`: `attention/query/bias [H, h]`,
  `attention/key/bias [K, h]`, `attention/value/bias [K, h]`; with
  `use_qk_norm`: `attention/query_norm/scale [h]`,
  `attention/key_norm/scale [h]`.
- `attention_type="mla"` (`H` = num_query_heads, `n` = qk_nope_head_dim,
  `r` = qk_rope_head_dim, `v` = v_head_dim): with `q_lora_rank`:
  `attention/q_a_proj/kernel [d, q_lora_rank]`,
  `attention/q_a_norm/scale [q_lora_rank]`,
  `attention/q_b_proj/kernel [q_lora_rank, H, n + r]`; without:
  `attention/q_proj/kernel [d, H, n + r]`; always
  `attention/kv_a_proj_with_mqa/kernel [d, kv_lora_rank + r]`,
  `attention/kv_a_norm/scale [kv_lora_rank]`,
  `attention/kv_b_proj/kernel [kv_lora_rank, H, n + v]`,
  `attention/o_proj/kernel [H, v, d]`.
- a dense layer (`f` = intermediate_dim), a `FeedForward`:
  `feedforward/gate_kernel [d, f]` (only if `ffn_gated`),
  `feedforward/up_kernel [d, f]`, `feedforward/down_kernel [f, d]`.
- a MoE layer (`E` = num_experts, `m` = moe_intermediate_dim), a
  `SparseMoE`: `moe/router/kernel [d, E]`,
  `moe/experts/gate_kernel [E, d, m]` (only if `ffn_gated`),
  `moe/experts/up_kernel [E, d, m]`, `moe/experts/down_kernel [E, m, d]`;
  plus what `moe_options` adds inside the MoE layer (for example the
  non-trainable `moe/router/expert_bias [E]` with `bias_update_rate > 0`,
  `moe/router/noise_kernel [d, E]` with `noisy_gating`, expert biases with
  `use_bias`).
- with `num_shared_experts > 0` the MoE layer is a `SharedExpertMoE`, which
  adds a `FeedForward` of width `s` = shared_intermediate_dim or
  `num_shared_experts * m`: `moe/shared_experts/gate_kernel [d, s]` (if
  `ffn_gated`), `moe/shared_experts/up_kernel [d, s]`,
  `moe/shared_experts/down_kernel [s, d]`; and with `shared_expert_gate`,
  `moe/shared_gate_kernel [d, 1]`.

Layer `i` (0-based) is dense when `i < first_k_dense` or
`(i + 1) % moe_layer_frequency != 0` (see `is_moe_layer`), and MoE
otherwise; an explicit `moe_layers` list replaces that rule (Qwen-MoE's
`mlp_only_layers`). There are no other weights: no biases except the optional q/k/v
ones, no position embeddings (RoPE has none), no extra head.
"""

import inspect

import keras
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.models.grouped_query_attention import GroupedQueryAttention
from keras_moe.models.moe_decoder_block import MoEDecoderBlock
from keras_moe.models.multi_head_latent_attention import (
    MultiHeadLatentAttention,
)
from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.models.yarn import normalize_rope_scaling
from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_float
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.weights_loading import load_weights_or_restore

ATTENTION_TYPES = ("gqa", "mla")
_MLA_ARGUMENTS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
# Arguments the backbone sets on its MoE layers; `moe_options` cannot.
_RESERVED_MOE_OPTIONS = (
    "num_experts",
    "intermediate_dim",
    "top_k",
    "activation",
    "gated",
    "causal",
    "num_shared_experts",
    "shared_intermediate_dim",
    "shared_expert_gate",
    "name",
    "dtype",
)


def is_moe_layer(layer_index, first_k_dense=0, moe_layer_frequency=1):
    """Whether decoder layer `layer_index` (0-based) is a MoE layer.

    The first `first_k_dense` layers are dense (DeepSeek's
    `first_k_dense_replace`); after them, layer `i` is MoE iff
    `(i + 1) % moe_layer_frequency == 0` (Qwen-MoE's `decoder_sparse_step`).

    Example:

    >>> [is_moe_layer(i, first_k_dense=1, moe_layer_frequency=2) for i in range(5)]
    [False, True, False, True, False]
    """
    return (
        layer_index >= first_k_dense
        and (layer_index + 1) % moe_layer_frequency == 0
    )


def moe_layer_flags(
    num_layers, first_k_dense=0, moe_layer_frequency=1, moe_layers=None
):
    """Whether each decoder layer is a MoE layer, as a list of bools.

    With `moe_layers` (a list of 0-based layer indices) exactly those layers
    are MoE; without it, `is_moe_layer` decides from `first_k_dense` and
    `moe_layer_frequency`.

    Example:

    >>> moe_layer_flags(4, first_k_dense=1)
    [False, True, True, True]
    >>> moe_layer_flags(4, moe_layers=[0, 3])
    [True, False, False, True]
    """
    if moe_layers is not None:
        chosen = set(moe_layers)
        return [i in chosen for i in range(num_layers)]
    return [
        is_moe_layer(i, first_k_dense, moe_layer_frequency)
        for i in range(num_layers)
    ]


def _moe_layer_accepts(argument):
    return argument in inspect.signature(SparseMoE.__init__).parameters


def _shared_expert_moe_class():
    try:
        from keras_moe.layers.shared_expert_moe import SharedExpertMoE
    except ImportError as error:
        raise ValueError(
            "`num_shared_experts > 0` needs `keras_moe.layers.SharedExpertMoE`, "
            f"which could not be imported: {error}"
        ) from error
    return SharedExpertMoE


def _embedding_initializer():
    return keras.initializers.RandomNormal(stddev=0.02)


@keras.saving.register_keras_serializable(package="keras_moe")
class MoEBackbone(Backbone):
    """A decoder-only Mixture-of-Experts transformer backbone.

    Token embedding, `num_layers` pre-norm decoder blocks (RMSNorm ->
    attention -> residual, RMSNorm -> feed-forward -> residual) and a final
    RMSNorm. Attention is grouped-query attention with RoPE (Mixtral, Qwen,
    OLMoE) or DeepSeek's Multi-head Latent Attention. Feed-forward layers are
    dense `FeedForward` blocks or `SparseMoE` / `SharedExpertMoE` layers, in
    the pattern set by `first_k_dense` and `moe_layer_frequency` (or listed
    in `moe_layers`). The module
    docstring lists every weight. `token_embedding` is a
    `ReversibleEmbedding`, so `MoECausalLM` computes logits with it (tied to
    the input embedding when `tie_word_embeddings`).

    MoE layers run with the padding mask (padding is not routed, takes no
    capacity and counts in no loss) and add their router losses with
    `add_loss`, so `fit()` optimizes them.

    Args:
        vocabulary_size: int, the number of token ids.
        num_layers: int, the number of decoder blocks.
        hidden_dim: int, the model width `d`.
        num_query_heads: int, attention heads (query heads for GQA).
        num_key_value_heads: int dividing `num_query_heads`, or `None` for
            `num_query_heads`. GQA only (`None` or `num_query_heads` for MLA).
        head_dim: int, per-head width, or `None` for
            `hidden_dim // num_query_heads`. GQA only.
        attention_type: `"gqa"` or `"mla"`.
        attention_bias: bool, biases on the q, k, v projections (Qwen1.5);
            never on the output projection. GQA only.
        use_qk_norm: bool, RMSNorm over `head_dim` on each query and key
            head before RoPE (Qwen3), one `[head_dim]` scale each. GQA only.
            (OLMoE checkpoints normalize the whole query and key
            projections instead, with `[H * h]` and `[K * h]` scales.)
        q_lora_rank: int or `None` (plain query projection). MLA only.
        kv_lora_rank: int, the key/value latent width. MLA only (required).
        qk_nope_head_dim: int, per-head query/key width without RoPE. MLA.
        qk_rope_head_dim: even int, the rotary query/key width. MLA.
        v_head_dim: int, the per-head value width. MLA.
        rope_interleave: bool or `None`. MLA only: `True` (what `None`
            means) rotates adjacent feature pairs, the layout of DeepSeek's
            checkpoints; `False` rotates the two halves (rotate-half). GQA
            always uses rotate-half RoPE and takes only `None`.
        rope_scaling: `None` (plain RoPE) or a YaRN dict as in a
            transformers config (`rope_type` `"yarn"`, `factor`,
            `original_max_position_embeddings`, ...): DeepSeek checkpoints'
            long-context RoPE. MLA only.
        rope_max_wavelength: float, the RoPE base (`rope_theta`).
        intermediate_dim: int, the width of the dense FFN layers (required if
            any layer is dense).
        num_experts: int, routed experts per MoE layer.
        top_k: int, experts per token.
        moe_intermediate_dim: int, the width of each routed expert (required
            if any layer is MoE).
        num_shared_experts: int >= 0, always-on shared experts (DeepSeek,
            Qwen-MoE); 0 gives `SparseMoE` layers.
        shared_intermediate_dim: int or `None`, the total width of the shared
            expert(s); `None` means `num_shared_experts * moe_intermediate_dim`.
        shared_expert_gate: bool, a sigmoid gate on the shared expert output
            (Qwen-MoE).
        first_k_dense: int, the number of leading dense layers.
        moe_layer_frequency: int >= 1; after the first `first_k_dense` layers,
            layer `i` is MoE iff `(i + 1) % moe_layer_frequency == 0`.
        moe_layers: list of int or `None`. The 0-based indices of the MoE
            layers, every other layer being dense; replaces the
            `first_k_dense` / `moe_layer_frequency` rule, which must then
            keep its defaults (0 and 1). `None` (the default) uses the rule.
        ffn_activation: the activation of the dense FFNs and the experts.
        ffn_gated: bool, GLU (SwiGLU with `"silu"`) FFNs and experts.
        moe_options: dict of extra keyword arguments for the MoE layers
            (`capacity_factor`, `aux_loss_weight`, `score_function`, ...),
            passed through verbatim.
        layer_norm_epsilon: float, the epsilon of every RMSNorm.
        tie_word_embeddings: bool, share the input embedding and the output
            projection.
        dropout: float in `[0, 1)`, residual and attention dropout.
        dtype: dtype policy of the model.
        **kwargs: `keras_hub.models.Backbone` arguments (`name`, ...).

    Example:

    >>> import numpy as np
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=64, num_layers=2, hidden_dim=16, num_query_heads=4,
    ...     num_key_value_heads=2, intermediate_dim=32, num_experts=4, top_k=2,
    ...     moe_intermediate_dim=8, first_k_dense=1)
    >>> inputs = {
    ...     "token_ids": np.array([[5, 9, 3, 0]], "int32"),
    ...     "padding_mask": np.array([[1, 1, 1, 0]], "int32"),
    ... }
    >>> tuple(backbone(inputs).shape)
    (1, 4, 16)
    >>> [type(block.feedforward).__name__ for block in backbone.transformer_layers]
    ['FeedForward', 'SparseMoE']
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        num_query_heads,
        num_key_value_heads=None,
        head_dim=None,
        attention_type="gqa",
        attention_bias=False,
        use_qk_norm=False,
        q_lora_rank=None,
        kv_lora_rank=None,
        qk_nope_head_dim=None,
        qk_rope_head_dim=None,
        v_head_dim=None,
        rope_interleave=None,
        rope_scaling=None,
        rope_max_wavelength=10000.0,
        intermediate_dim=None,
        num_experts=8,
        top_k=2,
        moe_intermediate_dim=None,
        num_shared_experts=0,
        shared_intermediate_dim=None,
        shared_expert_gate=False,
        first_k_dense=0,
        moe_layer_frequency=1,
        moe_layers=None,
        ffn_activation="silu",
        ffn_gated=True,
        moe_options=None,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        dropout=0.0,
        dtype=None,
        **kwargs,
    ):
        config = _validated_config(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            hidden_dim=hidden_dim,
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            attention_type=attention_type,
            attention_bias=attention_bias,
            use_qk_norm=use_qk_norm,
            q_lora_rank=q_lora_rank,
            kv_lora_rank=kv_lora_rank,
            qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim,
            v_head_dim=v_head_dim,
            rope_interleave=rope_interleave,
            rope_scaling=rope_scaling,
            rope_max_wavelength=rope_max_wavelength,
            intermediate_dim=intermediate_dim,
            num_experts=num_experts,
            top_k=top_k,
            moe_intermediate_dim=moe_intermediate_dim,
            num_shared_experts=num_shared_experts,
            shared_intermediate_dim=shared_intermediate_dim,
            shared_expert_gate=shared_expert_gate,
            first_k_dense=first_k_dense,
            moe_layer_frequency=moe_layer_frequency,
            moe_layers=moe_layers,
            ffn_activation=ffn_activation,
            ffn_gated=ffn_gated,
            moe_options=moe_options,
            layer_norm_epsilon=layer_norm_epsilon,
            tie_word_embeddings=tie_word_embeddings,
            dropout=dropout,
        )

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=config["vocabulary_size"],
            output_dim=config["hidden_dim"],
            tie_weights=config["tie_word_embeddings"],
            embeddings_initializer=_embedding_initializer(),
            dtype=dtype,
            name="token_embedding",
        )
        self.transformer_layers = []
        for i in range(config["num_layers"]):
            block = MoEDecoderBlock(
                attention=_make_attention(config, dtype),
                feedforward=_make_feedforward(config, i, dtype),
                layer_norm_epsilon=config["layer_norm_epsilon"],
                dropout=config["dropout"],
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            self.transformer_layers.append(block)
        self.layer_norm = RMSNormalization(
            config["layer_norm_epsilon"], dtype=dtype, name="final_norm"
        )

        # === Functional model ===
        token_id_input = keras.Input(
            shape=(None,), dtype="int32", name="token_ids"
        )
        padding_mask_input = keras.Input(
            shape=(None,), dtype="int32", name="padding_mask"
        )
        x = self.token_embedding(token_id_input)
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask_input)
        sequence_output = self.layer_norm(x)
        super().__init__(
            inputs={
                "token_ids": token_id_input,
                "padding_mask": padding_mask_input,
            },
            outputs=sequence_output,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        for key, value in config.items():
            setattr(self, key, value)

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in _CONFIG_KEYS})
        if config["moe_options"] is not None:
            config["moe_options"] = dict(config["moe_options"])
        if config["moe_layers"] is not None:
            config["moe_layers"] = list(config["moe_layers"])
        if config["rope_scaling"] is not None:
            config["rope_scaling"] = dict(config["rope_scaling"])
        return config

    def load_weights(self, filepath, *args, **kwargs):
        # A truncated or corrupt file fails naming itself and leaves the
        # weights as they were, instead of half-loaded.
        return load_weights_or_restore(
            self, super().load_weights, filepath, *args, **kwargs
        )


_CONFIG_KEYS = (
    "vocabulary_size",
    "num_layers",
    "hidden_dim",
    "num_query_heads",
    "num_key_value_heads",
    "head_dim",
    "attention_type",
    "attention_bias",
    "use_qk_norm",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "rope_interleave",
    "rope_scaling",
    "rope_max_wavelength",
    "intermediate_dim",
    "num_experts",
    "top_k",
    "moe_intermediate_dim",
    "num_shared_experts",
    "shared_intermediate_dim",
    "shared_expert_gate",
    "first_k_dense",
    "moe_layer_frequency",
    "moe_layers",
    "ffn_activation",
    "ffn_gated",
    "moe_options",
    "layer_norm_epsilon",
    "tie_word_embeddings",
    "dropout",
)


def _optional_int(name, value, min_value=1):
    return None if value is None else check_int(name, value, min_value=min_value)


def _validated_config(**config):
    """Check every argument; return them normalized (ints, floats, dicts)."""
    c = dict(config)
    for name in ("vocabulary_size", "num_layers", "hidden_dim", "num_query_heads"):
        c[name] = check_int(name, c[name], min_value=1)
    if c["attention_type"] not in ATTENTION_TYPES:
        raise ValueError(
            f"`attention_type` must be one of {ATTENTION_TYPES}. "
            f"Received: attention_type={c['attention_type']!r}"
        )
    c["attention_bias"] = check_bool("attention_bias", c["attention_bias"])
    c["use_qk_norm"] = check_bool("use_qk_norm", c["use_qk_norm"])
    c["num_key_value_heads"] = _optional_int(
        "num_key_value_heads", c["num_key_value_heads"]
    )
    c["head_dim"] = _optional_int("head_dim", c["head_dim"])
    for name in _MLA_ARGUMENTS:
        c[name] = _optional_int(name, c[name])
    if c["attention_type"] == "gqa":
        _check_gqa(c)
    else:
        _check_mla(c)
    c["rope_max_wavelength"] = check_float(
        "rope_max_wavelength", c["rope_max_wavelength"], positive=True
    )

    c["num_experts"] = check_int("num_experts", c["num_experts"], min_value=1)
    c["top_k"] = check_int(
        "top_k", c["top_k"], min_value=1, max_value=c["num_experts"]
    )
    c["num_shared_experts"] = check_int(
        "num_shared_experts", c["num_shared_experts"], min_value=0
    )
    c["shared_intermediate_dim"] = _optional_int(
        "shared_intermediate_dim", c["shared_intermediate_dim"]
    )
    c["shared_expert_gate"] = check_bool(
        "shared_expert_gate", c["shared_expert_gate"]
    )
    if c["num_shared_experts"] == 0:
        if c["shared_intermediate_dim"] is not None or c["shared_expert_gate"]:
            raise ValueError(
                "`shared_intermediate_dim` and `shared_expert_gate` need "
                "`num_shared_experts > 0`. Received: num_shared_experts=0, "
                f"shared_intermediate_dim={c['shared_intermediate_dim']}, "
                f"shared_expert_gate={c['shared_expert_gate']}"
            )
    c["first_k_dense"] = check_int(
        "first_k_dense", c["first_k_dense"], min_value=0, max_value=c["num_layers"]
    )
    c["moe_layer_frequency"] = check_int(
        "moe_layer_frequency", c["moe_layer_frequency"], min_value=1
    )
    c["moe_layers"] = _checked_moe_layers(c)
    c["intermediate_dim"] = _optional_int("intermediate_dim", c["intermediate_dim"])
    c["moe_intermediate_dim"] = _optional_int(
        "moe_intermediate_dim", c["moe_intermediate_dim"]
    )
    moe_layers = _moe_layer_flags(c)
    if not all(moe_layers) and c["intermediate_dim"] is None:
        dense = [i for i, moe in enumerate(moe_layers) if not moe]
        raise ValueError(
            f"`intermediate_dim` is required: layers {dense} are dense "
            f"(first_k_dense={c['first_k_dense']}, "
            f"moe_layer_frequency={c['moe_layer_frequency']}, "
            f"moe_layers={c['moe_layers']}). "
            "Received: intermediate_dim=None"
        )
    if any(moe_layers) and c["moe_intermediate_dim"] is None:
        raise ValueError(
            "`moe_intermediate_dim` (the width of each expert) is required "
            "when some layer is a MoE layer. Received: moe_intermediate_dim=None"
        )
    c["ffn_gated"] = check_bool("ffn_gated", c["ffn_gated"])
    if not isinstance(c["ffn_activation"], str):
        raise ValueError(
            "`ffn_activation` must be an activation name. "
            f"Received: ffn_activation={c['ffn_activation']!r}"
        )
    keras.activations.get(c["ffn_activation"])

    moe_options = c["moe_options"]
    if moe_options is None:
        moe_options = {}
    if not isinstance(moe_options, dict):
        raise ValueError(
            "`moe_options` must be a dict of MoE layer arguments or None. "
            f"Received: moe_options={moe_options!r}"
        )
    reserved = sorted(set(moe_options) & set(_RESERVED_MOE_OPTIONS))
    if reserved:
        raise ValueError(
            f"`moe_options` cannot set {reserved}: the backbone sets them "
            "from its own arguments. "
            f"Received: moe_options={moe_options!r}"
        )
    c["moe_options"] = dict(moe_options) if c["moe_options"] is not None else None

    c["layer_norm_epsilon"] = check_float(
        "layer_norm_epsilon", c["layer_norm_epsilon"], positive=True
    )
    c["tie_word_embeddings"] = check_bool(
        "tie_word_embeddings", c["tie_word_embeddings"]
    )
    c["dropout"] = check_float("dropout", c["dropout"])
    if c["dropout"] >= 1:
        raise ValueError(
            f"`dropout` must be in [0, 1). Received: dropout={c['dropout']}"
        )
    return c


def _moe_layer_flags(c):
    return moe_layer_flags(
        c["num_layers"], c["first_k_dense"], c["moe_layer_frequency"],
        c["moe_layers"],
    )


def _checked_moe_layers(c):
    moe_layers = c["moe_layers"]
    if moe_layers is None:
        return None
    num_layers = c["num_layers"]
    if not isinstance(moe_layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers
        for i in moe_layers
    ):
        raise ValueError(
            "`moe_layers` must be None or a list of layer indices in "
            f"[0, num_layers={num_layers}). Received: moe_layers={moe_layers!r}"
        )
    if len(set(moe_layers)) != len(moe_layers):
        raise ValueError(
            "`moe_layers` lists a layer more than once. "
            f"Received: moe_layers={moe_layers!r}"
        )
    if c["first_k_dense"] != 0 or c["moe_layer_frequency"] != 1:
        raise ValueError(
            "`moe_layers` replaces `first_k_dense` and `moe_layer_frequency`, "
            "which must keep their defaults (0 and 1) when it is given. "
            f"Received: moe_layers={moe_layers!r}, "
            f"first_k_dense={c['first_k_dense']}, "
            f"moe_layer_frequency={c['moe_layer_frequency']}"
        )
    return sorted(moe_layers)


def _check_gqa(c):
    given = [name for name in _MLA_ARGUMENTS if c[name] is not None]
    for name in ("rope_interleave", "rope_scaling"):
        if c[name] is not None:
            given.append(name)
    if given:
        raise ValueError(
            f"{given} only apply to `attention_type='mla'`. "
            "Received: attention_type='gqa'"
        )
    num_heads, num_kv_heads = c["num_query_heads"], c["num_key_value_heads"]
    if num_kv_heads is not None and num_heads % num_kv_heads:
        raise ValueError(
            f"`num_query_heads` ({num_heads}) must be divisible by "
            f"`num_key_value_heads`. Received: num_key_value_heads={num_kv_heads}"
        )
    head_dim = c["head_dim"]
    if head_dim is None:
        if c["hidden_dim"] % num_heads:
            raise ValueError(
                f"`hidden_dim` ({c['hidden_dim']}) must be divisible by "
                f"`num_query_heads` ({num_heads}) when `head_dim` is None. "
                f"Received: hidden_dim={c['hidden_dim']}"
            )
        head_dim = c["hidden_dim"] // num_heads
    if head_dim % 2:
        raise ValueError(
            f"The head width must be even for RoPE; got {head_dim} "
            f"(hidden_dim={c['hidden_dim']}, num_query_heads={num_heads}). "
            f"Received: head_dim={c['head_dim']}"
        )


def _check_mla(c):
    missing = [
        name
        for name in _MLA_ARGUMENTS[1:]
        if c[name] is None
    ]
    if missing:
        raise ValueError(
            f"`attention_type='mla'` requires {missing}. Received: "
            + ", ".join(f"{name}=None" for name in missing)
        )
    if c["qk_rope_head_dim"] % 2:
        raise ValueError(
            "`qk_rope_head_dim` must be even (RoPE rotates pairs of features). "
            f"Received: qk_rope_head_dim={c['qk_rope_head_dim']}"
        )
    num_kv_heads = c["num_key_value_heads"]
    if num_kv_heads is not None and num_kv_heads != c["num_query_heads"]:
        raise ValueError(
            "Multi-head latent attention has one key/value per query head: "
            "`num_key_value_heads` must be None or equal to `num_query_heads` "
            f"({c['num_query_heads']}). Received: num_key_value_heads={num_kv_heads}"
        )
    if c["rope_interleave"] is not None:
        c["rope_interleave"] = check_bool("rope_interleave", c["rope_interleave"])
    c["rope_scaling"] = normalize_rope_scaling(c["rope_scaling"])
    for name in ("head_dim", "attention_bias", "use_qk_norm"):
        if c[name]:
            raise ValueError(
                f"`{name}` only applies to `attention_type='gqa'` (MLA sets its "
                "head widths with qk_nope_head_dim, qk_rope_head_dim and "
                f"v_head_dim, and has no q/k/v biases or q/k norm). "
                f"Received: {name}={c[name]!r}"
            )


def _make_attention(c, dtype):
    if c["attention_type"] == "gqa":
        return GroupedQueryAttention(
            num_query_heads=c["num_query_heads"],
            num_key_value_heads=c["num_key_value_heads"],
            head_dim=c["head_dim"],
            rope_max_wavelength=c["rope_max_wavelength"],
            use_bias=c["attention_bias"],
            use_qk_norm=c["use_qk_norm"],
            layer_norm_epsilon=c["layer_norm_epsilon"],
            dropout=c["dropout"],
            dtype=dtype,
            name="attention",
        )
    return MultiHeadLatentAttention(
        num_heads=c["num_query_heads"],
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        q_lora_rank=c["q_lora_rank"],
        rope_max_wavelength=c["rope_max_wavelength"],
        rope_interleave=c["rope_interleave"] is not False,
        rope_scaling=c["rope_scaling"],
        layer_norm_epsilon=c["layer_norm_epsilon"],
        dropout=c["dropout"],
        dtype=dtype,
        name="attention",
    )


def _make_feedforward(c, layer_index, dtype):
    if not _moe_layer_flags(c)[layer_index]:
        return FeedForward(
            c["intermediate_dim"],
            activation=c["ffn_activation"],
            gated=c["ffn_gated"],
            dtype=dtype,
            name="feedforward",
        )
    options = dict(c["moe_options"] or {})
    if _moe_layer_accepts("causal"):
        options["causal"] = True
    common = dict(
        top_k=c["top_k"],
        activation=c["ffn_activation"],
        gated=c["ffn_gated"],
        dtype=dtype,
        name="moe",
        **options,
    )
    if c["num_shared_experts"] == 0:
        return SparseMoE(c["num_experts"], c["moe_intermediate_dim"], **common)
    return _shared_expert_moe_class()(
        c["num_experts"],
        c["moe_intermediate_dim"],
        num_shared_experts=c["num_shared_experts"],
        shared_intermediate_dim=c["shared_intermediate_dim"],
        shared_expert_gate=c["shared_expert_gate"],
        **common,
    )
