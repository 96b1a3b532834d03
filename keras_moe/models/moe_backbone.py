"""`MoEBackbone`: a decoder-only Mixture-of-Experts transformer.

One configuration covers Mixtral, Qwen-MoE / Qwen3-MoE, OLMoE, DBRX-style,
Llama 4 and DeepSeek-V2/V3-style decoders. The weights it holds follow from the
configuration alone: `keras_moe.models.weight_structure.backbone_weights`
lists them (variable paths and shapes), and `count_params()` equals their
sum.

Layer `i` (0-based) is dense when `i < first_k_dense` or
`(i + 1) % moe_layer_frequency != 0` (see `is_moe_layer`), and MoE
otherwise; an explicit `moe_layers` list replaces that rule (Qwen-MoE's
`mlp_only_layers`). The arguments are checked in
`keras_moe.models.backbone_config`.
"""


import keras
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_moe.backend.keras_internals import should_quantize_layer
from keras_moe.layers.feed_forward_weights import QUANTIZATION_MODES
from keras_moe.layers.feed_forward_weights import FeedForwardWeights
from keras_moe.layers.feed_forward_weights import unsupported_mode_error
from keras_moe.models.backbone_config import CONFIG_KEYS
from keras_moe.models.backbone_config import validated_config
from keras_moe.models.decoder_layers import make_attention
from keras_moe.models.decoder_layers import make_feedforward
from keras_moe.models.decoder_layers import make_multi_token_prediction
from keras_moe.models.layer_normalization import make_normalization
from keras_moe.models import lora_state
from keras_moe.models.moe_decoder_block import MoEDecoderBlock
from keras_moe.utils.argument_validation import check_int
from keras_moe.utils.weights_loading import load_weights_or_restore

# Saved in a `.lora.h5` file beside the rank: the adapted layers' names.


def check_quantization_mode(model, mode, filters=None):
    """Refuse, before anything changes, a mode the feed-forward layers lack.

    `keras.Model.quantize` quantizes layer after layer, and skips with a
    warning a layer that raises `NotImplementedError`: a mode the expert
    kernels cannot take would leave most of a MoE model's memory float, or
    fail halfway with the attention already quantized.

    Args:
        model: a `keras.Model`.
        mode: the quantization mode asked for.
        filters: the `filters` of `Model.quantize`; layers they leave out
            are not checked.

    Raises:
        ValueError: if a feed-forward layer (`Experts`, `FeedForward`) that
            `model.quantize(mode, filters=filters)` would reach does not
            support `mode`.

    Example:

    >>> import keras
    >>> from keras_moe.layers import FeedForward
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, FeedForward(8, name="ffn")(inputs))
    >>> check_quantization_mode(model, "int4")
    >>> check_quantization_mode(model, "gptq", filters="attention")
    >>> check_quantization_mode(model, "gptq")
    Traceback (most recent call last):
    ...
    ValueError: The expert and feed-forward layers ...
    """
    if mode in QUANTIZATION_MODES:
        return
    for layer in model._flatten_layers():
        if isinstance(layer, FeedForwardWeights) and should_quantize_layer(
            layer, filters
        ):
            raise unsupported_mode_error(mode)


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
    in `moe_layers`).
    `keras_moe.models.weight_structure.backbone_weights(config)` lists
    every weight. `token_embedding` is a
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
        qk_norm_per_head: bool, with `use_qk_norm`: True (the default)
            normalizes each head; False normalizes the whole query and key
            projections, with `[H * h]` and `[K * h]` scales (OLMoE). GQA
            only.
        clip_qkv: positive float or `None`: clamp queries, keys and values
            to `[-clip_qkv, clip_qkv]` after their projections (DBRX,
            OLMoE). GQA only.
        partial_rotary_factor: float in `(0, 1]`, the fraction of each
            head's features RoPE rotates, the first ones (GLM-4.5: 0.5).
            GQA only.
        sliding_window: int or `None`: the number of most recent positions
            (its own included) a query of a sliding-window layer sees
            (Mistral, Qwen, GPT-OSS). GQA only.
        attention_layer_types: `None` or a list of `num_layers` entries,
            `"sliding_attention"` (a layer with the `sliding_window`) or
            `"full_attention"`, as transformers' `layer_types` (GPT-OSS
            alternates them); a shorter list whose length divides
            `num_layers` is a pattern, repeated over the layers. `None`: every layer slides when
            `sliding_window` is set. GQA only.
        attention_sinks: bool, a learned sink logit per query head in each
            attention softmax (GPT-OSS). GQA only.
        attention_output_bias: bool, a bias on the attention output
            projection (GPT-OSS). GQA only.
        attention_chunk_size: int or `None`: the length of the chunks a
            query of a `"chunked_attention"` layer is confined to (Llama
            4). Without `attention_layer_types`, the layers with RoPE are
            chunked and the `nope_layers` see the whole prefix. GQA only.
        nope_layers: list of int or `None`: the 0-based indices of the
            layers without RoPE (Llama 4's NoPE layers). GQA only.
        use_qk_l2_norm: bool, RMS-normalize each query and key head
            without a weight, after RoPE, on the layers with RoPE (Llama
            4). GQA only.
        attention_temperature_floor_scale: int or `None`: with an int,
            attention temperature tuning on the `nope_layers`: the query at
            position `p` is multiplied by `1 + attention_temperature_scale
            * log(1 + floor((p + 1) / attention_temperature_floor_scale))`
            (Llama 4: 8192). GQA only.
        attention_temperature_scale: float >= 0, that tuning's strength
            (Llama 4: 0.1).
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
            `original_max_position_embeddings`, ...): DeepSeek's and
            GPT-OSS's long-context RoPE.
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
        swiglu_alpha: float or `None`; with `swiglu_limit`, GPT-OSS's
            clamped SwiGLU (`keras_moe.layers.clamped_swiglu.ClampedSwiGLU`)
            replaces SwiGLU in the FFNs and experts.
        swiglu_limit: float or `None`, where that SwiGLU clamps.
        moe_options: dict of extra keyword arguments for the MoE layers
            (`capacity_factor`, `aux_loss_weight`, `score_function`, ...),
            passed through verbatim.
        layer_norm_epsilon: float, the epsilon of every normalization.
        norm_type: `"rms"` (RMSNorm, the default) or `"layer"`: LayerNorm
            without bias (DBRX) for the block and final normalizations (q/k
            norms stay RMSNorm). Either has one `scale` weight.
        tie_word_embeddings: bool, share the input embedding and the output
            projection.
        dropout: float in `[0, 1)`, residual and attention dropout.
        num_mtp_layers: int >= 0, DeepSeek-V3's multi-token prediction
            modules (`keras_moe.models.multi_token_prediction`): module `k`
            predicts the token `k + 1` positions ahead from the previous
            depth's representation and the embedding of the token `k`
            ahead, through one decoder block of the type of the last MoE
            layer (the last layer without MoE) and the shared embedding and
            output head. They add their loss in training only; inference
            and `generate()` use the main model alone. 0 (the default): none.
        mtp_loss_weight: float >= 0, the weight `lambda` of the
            multi-token prediction loss, `lambda / D * sum_k L_k` (0.3,
            then 0.1, in DeepSeek-V3's pre-training).
        dtype: dtype policy of the model.
        **kwargs: `keras_hub.models.Backbone` arguments (`name`, ...), and
            `lora_rank` with `lora_target_layer_names`, which `get_config`
            adds after `enable_lora`: the backbone is then built with LoRA
            enabled on those layers (what a saved model needs before its
            weights and optimizer state load).

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
        qk_norm_per_head=True,
        clip_qkv=None,
        partial_rotary_factor=1.0,
        sliding_window=None,
        attention_layer_types=None,
        attention_sinks=False,
        attention_output_bias=False,
        attention_chunk_size=None,
        nope_layers=None,
        use_qk_l2_norm=False,
        attention_temperature_floor_scale=None,
        attention_temperature_scale=0.1,
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
        swiglu_alpha=None,
        swiglu_limit=None,
        moe_options=None,
        layer_norm_epsilon=1e-6,
        norm_type="rms",
        tie_word_embeddings=False,
        dropout=0.0,
        num_mtp_layers=0,
        mtp_loss_weight=0.3,
        dtype=None,
        **kwargs,
    ):
        lora_rank = kwargs.pop("lora_rank", None)
        lora_target_layer_names = kwargs.pop("lora_target_layer_names", None)
        config = validated_config(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            hidden_dim=hidden_dim,
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            attention_type=attention_type,
            attention_bias=attention_bias,
            use_qk_norm=use_qk_norm,
            qk_norm_per_head=qk_norm_per_head,
            clip_qkv=clip_qkv,
            partial_rotary_factor=partial_rotary_factor,
            sliding_window=sliding_window,
            attention_layer_types=attention_layer_types,
            attention_sinks=attention_sinks,
            attention_output_bias=attention_output_bias,
            attention_chunk_size=attention_chunk_size,
            nope_layers=nope_layers,
            use_qk_l2_norm=use_qk_l2_norm,
            attention_temperature_floor_scale=attention_temperature_floor_scale,
            attention_temperature_scale=attention_temperature_scale,
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
            swiglu_alpha=swiglu_alpha,
            swiglu_limit=swiglu_limit,
            moe_options=moe_options,
            layer_norm_epsilon=layer_norm_epsilon,
            norm_type=norm_type,
            tie_word_embeddings=tie_word_embeddings,
            dropout=dropout,
            num_mtp_layers=num_mtp_layers,
            mtp_loss_weight=mtp_loss_weight,
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
                attention=make_attention(config, i, dtype),
                feedforward=make_feedforward(config, i, dtype),
                layer_norm_epsilon=config["layer_norm_epsilon"],
                dropout=config["dropout"],
                norm_type=config["norm_type"],
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            self.transformer_layers.append(block)
        self.layer_norm = make_normalization(
            config["norm_type"],
            config["layer_norm_epsilon"],
            dtype=dtype,
            name="final_norm",
        )
        self.multi_token_prediction = make_multi_token_prediction(
            config, self.token_embedding, dtype
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
        if self.multi_token_prediction is not None:
            # Returns `sequence_output`; in training, adds its loss.
            sequence_output = self.multi_token_prediction(
                x, sequence_output, token_id_input, padding_mask_input
            )
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

        # === LoRA, from a saved config ===
        # Before the weights load, and before `compile_from_config` builds
        # the optimizer on the trainable variables: the LoRA factors and the
        # frozen flags are then those of the model that was saved.
        if lora_rank is not None:
            self.enable_lora(
                lora_rank, target_layer_names=lora_target_layer_names
            )

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in CONFIG_KEYS})
        if getattr(self, "_lora_enabled_layers", []):
            config["lora_rank"] = self._lora_rank
            config["lora_target_layer_names"] = list(
                self._lora_target_layer_names
            )
        if config["moe_options"] is not None:
            config["moe_options"] = dict(config["moe_options"])
        if config["moe_layers"] is not None:
            config["moe_layers"] = list(config["moe_layers"])
        if config["rope_scaling"] is not None:
            config["rope_scaling"] = dict(config["rope_scaling"])
        if config["attention_layer_types"] is not None:
            config["attention_layer_types"] = list(config["attention_layer_types"])
        if config["nope_layers"] is not None:
            config["nope_layers"] = list(config["nope_layers"])
        return config

    def load_weights(self, filepath, *args, **kwargs):
        # A truncated or corrupt file fails naming itself and leaves the
        # weights as they were, instead of half-loaded.
        return load_weights_or_restore(
            self, super().load_weights, filepath, *args, **kwargs
        )

    def multi_token_logits(self, inputs, training=False):
        """The multi-token prediction modules' logits (`num_mtp_layers > 0`).

        Args:
            inputs: dict with `"token_ids"` and `"padding_mask"`
                `[batch, length]`.
            training: bool.

        Returns:
            A list of `num_mtp_layers` float tensors
            `[batch, length, vocabulary_size]`: position `i` of the `k`-th
            (1-based) predicts token `i + k + 1`.
        """
        if self.multi_token_prediction is None:
            raise ValueError(
                "This backbone has no multi-token prediction modules. "
                f"Received: num_mtp_layers={self.num_mtp_layers}"
            )
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        x = self.token_embedding(token_ids)
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask, training=training)
        mtp = self.multi_token_prediction
        return mtp.logits(
            mtp.depth_outputs(x, token_ids, padding_mask, training=training)
        )

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        # A mode the expert kernels cannot take is refused before any layer
        # changes (Keras would quantize the attention, then warn and skip
        # the experts).
        check_quantization_mode(self, mode, filters)
        super().quantize(mode, config=config, filters=filters, **kwargs)

    def default_lora_layer_names(self):
        """The layers `enable_lora(rank)` adapts: queries and values.

        Grouped-query attention: `query` and `value`. Latent attention:
        the query projection (`q_b_proj` with `q_lora_rank`, else
        `q_proj`) and `kv_b_proj`, which expands the latent into each
        head's keys and values. Add `"experts"` to `target_layer_names` to
        adapt the routed experts too.
        """
        if self.attention_type == "gqa":
            return ["query", "value"]
        query = "q_proj" if self.q_lora_rank is None else "q_b_proj"
        return [query, "kv_b_proj"]

    def enable_lora(self, rank, target_layer_names=None):
        """Freeze the backbone and train low-rank adaptations of some layers.

        Args:
            rank: int >= 1, the rank of the adaptations.
            target_layer_names: list of layer names, or `None` for
                `default_lora_layer_names()`. Every name must be a layer
                with LoRA support: the attention projections
                (`query`, `key`, `value`, `attention_output`; `q_proj`,
                `q_a_proj`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`,
                `o_proj`) and the feed-forward blocks (`experts`,
                `shared_experts`, `feedforward`).

        Raises:
            ValueError: for a name that matches no such layer (the message
                lists them) or an invalid `rank`.
        """
        rank = check_int("rank", rank, min_value=1)
        if target_layer_names is None:
            target_layer_names = self.default_lora_layer_names()
        if isinstance(target_layer_names, str) or not all(
            isinstance(name, str) for name in target_layer_names
        ):
            raise ValueError(
                "`target_layer_names` must be a list of layer names. "
                f"Received: target_layer_names={target_layer_names!r}"
            )
        target_layer_names = list(target_layer_names)
        adaptable = sorted(
            {
                layer.name
                for layer in self._flatten_layers(include_self=False)
                if layer.weights and hasattr(layer, "enable_lora")
            }
        )
        unknown = [name for name in target_layer_names if name not in adaptable]
        if unknown or not target_layer_names:
            raise ValueError(
                f"`target_layer_names` names no layer with LoRA support: "
                f"{unknown or target_layer_names}. Layers of this "
                f"{self.attention_type.upper()} backbone that support LoRA: "
                f"{adaptable}. Received: target_layer_names="
                f"{target_layer_names}"
            )
        super().enable_lora(rank, target_layer_names=target_layer_names)
        self._lora_target_layer_names = target_layer_names
        # Saving (`save`, `save_weights`, presets) then also stores the
        # adapted layers unmerged; see `LoRAState`.
        self._lora_state = lora_state.LoRAState(self)

    def save_lora_weights(self, filepath):
        """Save the LoRA factors of every adapted layer to a `.lora.h5` file.

        keras-hub's layout, with each layer's own variable names and the
        target layer names (see `keras_moe.models.lora_state`).

        Args:
            filepath: str, a path ending in `.lora.h5`.
        """
        lora_state.save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath):
        """Load LoRA factors saved by `save_lora_weights`.

        A backbone without LoRA first enables it on the layers the file was
        saved from; one with LoRA must have the file's rank and layers.

        Args:
            filepath: str, a `.lora.h5` file.
        """
        lora_state.load_lora_weights(self, filepath)

    def _weighted_layers(self):
        # keras-hub identifies adapted layers by their index in this list.
        return [
            layer
            for layer in self._flatten_layers(include_self=False)
            if layer.weights
        ]
