"""`to_transformers`: write a model as a Hugging Face checkpoint."""

import json
import os
import warnings

import keras
import numpy as np

from keras_moe.convert.checkpoint import CONFIG_FILE
from keras_moe.convert.checkpoint import INDEX_FILE
from keras_moe.convert.checkpoint import SINGLE_FILE
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.families import ARCHITECTURES
from keras_moe.convert.families import SUPPORTED_MODEL_TYPES
from keras_moe.convert.weight_mapping import weight_mappings

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _moe_layers(backbone):
    return [
        i
        for i, block in enumerate(backbone.transformer_layers)
        if hasattr(block.feedforward, "router")
    ]


def _router_settings(backbone):
    moe = next(
        block.feedforward
        for block in backbone.transformer_layers
        if hasattr(block.feedforward, "router")
    )
    router = moe.router
    return moe, router


def infer_model_type(backbone):
    """The transformers `model_type` that can hold a `MoEBackbone`.

    MLA attention is DeepSeek (`deepseek_v3` with sigmoid routing,
    `deepseek_v2` with softmax); GQA with per-head q/k norm is `qwen3_moe`;
    GQA with one gated shared expert is `qwen2_moe`; plain GQA with every
    layer MoE and renormalised top-k is `mixtral`, otherwise `qwen3_moe`
    needs q/k norm and is refused.

    Example:

    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=2, top_k=1, moe_intermediate_dim=4)
    >>> infer_model_type(backbone)
    'mixtral'
    """
    _, router = _router_settings(backbone)
    if backbone.attention_type == "mla":
        if router.score_function == "sigmoid":
            return "deepseek_v3"
        return "deepseek_v2"
    if backbone.use_qk_norm:
        return "qwen3_moe"
    if backbone.num_shared_experts:
        return "qwen2_moe"
    return "mixtral"


def _refuse(model_type, reason):
    raise ConversionError(
        f"This model cannot be written as a {model_type!r} checkpoint: {reason}"
    )


def _check_exportable(backbone, model_type):
    moe, router = _router_settings(backbone)
    if not backbone.ffn_gated:
        _refuse(model_type, "its feed-forward layers are not gated (ffn_gated=False).")
    if backbone.ffn_activation not in ("silu", "gelu", "relu"):
        _refuse(model_type, f"ffn_activation={backbone.ffn_activation!r}.")
    if moe.routing != "token_choice" or moe.experts.use_bias:
        _refuse(model_type, "only token-choice routing without expert biases exists there.")
    if router.noisy_gating:
        warnings.warn(
            "Noisy gating is a training-time option that transformers models "
            "do not have: the exported router has no noise kernel.",
            stacklevel=3,
        )
    is_mla = backbone.attention_type == "mla"
    if is_mla != model_type.startswith("deepseek"):
        _refuse(model_type, f"its attention is {backbone.attention_type!r}.")
    sigmoid = router.score_function == "sigmoid"
    if sigmoid != (model_type == "deepseek_v3"):
        _refuse(model_type, f"its router uses score_function={router.score_function!r}.")
    if model_type != "deepseek_v3" and (
        router.expert_groups != 1 or router.bias_update_rate > 0
    ):
        _refuse(model_type, "group-limited routing and balancing biases are DeepSeek-V3's.")
    if model_type == "deepseek_v3" and router.bias_update_rate == 0:
        _refuse(
            model_type,
            "DeepSeek-V3 routers hold a balancing bias (set "
            "`moe_options={'bias_update_rate': ...}`).",
        )
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe") and (
        router.routed_scaling_factor != 1.0
    ):
        _refuse(model_type, "its router scales weights (routed_scaling_factor).")
    if model_type == "mixtral":
        if not router.normalize_top_k:
            _refuse(model_type, "Mixtral renormalises the top-k weights.")
        if len(_moe_layers(backbone)) != backbone.num_layers:
            _refuse(model_type, "every Mixtral layer is a MoE layer.")
        if backbone.attention_bias or backbone.num_shared_experts:
            _refuse(model_type, "Mixtral has no attention biases or shared experts.")
    if model_type == "qwen2_moe" and not (
        backbone.num_shared_experts and backbone.shared_expert_gate
    ):
        _refuse(model_type, "Qwen2-MoE layers have one gated shared expert.")
    if model_type == "qwen3_moe" and (
        not backbone.use_qk_norm or backbone.attention_bias or backbone.num_shared_experts
    ):
        _refuse(model_type, "Qwen3-MoE has q/k norm, no attention bias and no shared expert.")
    if model_type.startswith("deepseek"):
        moe_layers = _moe_layers(backbone)
        expected = list(range(backbone.first_k_dense, backbone.num_layers))
        if moe_layers != expected:
            _refuse(model_type, "DeepSeek models are dense for `first_k_dense_replace` layers, then MoE.")
        if backbone.num_shared_experts and backbone.shared_intermediate_dim not in (
            None,
            backbone.num_shared_experts * backbone.moe_intermediate_dim,
        ):
            _refuse(model_type, "DeepSeek shared experts have the routed experts' width.")
        if backbone.shared_expert_gate:
            _refuse(model_type, "DeepSeek shared experts have no gate.")
        if model_type == "deepseek_v2" and router.normalize_top_k and (
            router.routed_scaling_factor != 1.0
        ):
            _refuse(model_type, "DeepSeek-V2 renormalises or scales the weights, not both.")
        if model_type == "deepseek_v2" and backbone.rope_interleave is False:
            _refuse(model_type, "DeepSeek-V2 rotates interleaved pairs.")


def transformers_config(backbone, model_type=None):
    """The transformers `config.json` dict describing a `MoEBackbone`.

    Args:
        backbone: a `MoEBackbone`.
        model_type: one of `SUPPORTED_MODEL_TYPES`, or `None` to infer it
            (`infer_model_type`).

    Returns:
        A JSON-serializable dict.

    Raises:
        ConversionError: if the family cannot express the model (the
            message says which setting).

    Example:

    >>> from keras_moe import presets
    >>> config = transformers_config(presets.load("mixtral_small").backbone)
    >>> config["model_type"], config["architectures"]
    ('mixtral', ['MixtralForCausalLM'])
    """
    if model_type is None:
        model_type = infer_model_type(backbone)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"`model_type`={model_type!r} is not supported. Supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    _check_exportable(backbone, model_type)
    moe, router = _router_settings(backbone)
    dtype = keras.backend.standardize_dtype(backbone.dtype_policy.variable_dtype)
    hidden_act = backbone.ffn_activation
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads
        or backbone.num_query_heads,
        "hidden_act": hidden_act,
        "rms_norm_eps": backbone.layer_norm_epsilon,
        "rope_theta": backbone.rope_max_wavelength,
        "rope_scaling": None,
        "tie_word_embeddings": backbone.tie_word_embeddings,
        "num_experts_per_tok": backbone.top_k,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": _TORCH_DTYPES.get(dtype, "float32"),
        "use_cache": True,
    }
    if model_type == "mixtral":
        config.update(
            head_dim=backbone.head_dim,
            intermediate_size=backbone.moe_intermediate_dim,
            num_local_experts=backbone.num_experts,
            router_aux_loss_coef=moe.aux_loss_weight,
            router_jitter_noise=router.jitter,
            sliding_window=None,
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        moe_layers = _moe_layers(backbone)
        config.update(
            intermediate_size=backbone.intermediate_dim
            or backbone.moe_intermediate_dim,
            moe_intermediate_size=backbone.moe_intermediate_dim,
            num_experts=backbone.num_experts,
            norm_topk_prob=router.normalize_top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[
                i for i in range(backbone.num_layers) if i not in moe_layers
            ],
            router_aux_loss_coef=moe.aux_loss_weight,
            use_sliding_window=False,
            sliding_window=None,
        )
        if model_type == "qwen2_moe":
            config.update(
                qkv_bias=backbone.attention_bias,
                shared_expert_intermediate_size=moe.shared_intermediate_dim,
            )
            if backbone.head_dim is not None:
                config["head_dim"] = backbone.head_dim
        else:
            config.update(
                head_dim=backbone.head_dim
                or backbone.hidden_dim // backbone.num_query_heads,
                attention_bias=False,
            )
    else:
        num_heads = backbone.num_query_heads
        config.update(
            num_key_value_heads=num_heads,
            q_lora_rank=backbone.q_lora_rank,
            kv_lora_rank=backbone.kv_lora_rank,
            qk_nope_head_dim=backbone.qk_nope_head_dim,
            qk_rope_head_dim=backbone.qk_rope_head_dim,
            v_head_dim=backbone.v_head_dim,
            intermediate_size=backbone.intermediate_dim
            or backbone.moe_intermediate_dim,
            moe_intermediate_size=backbone.moe_intermediate_dim,
            n_routed_experts=backbone.num_experts,
            n_shared_experts=backbone.num_shared_experts,
            first_k_dense_replace=backbone.first_k_dense,
            moe_layer_freq=1,
            routed_scaling_factor=router.routed_scaling_factor,
            norm_topk_prob=router.normalize_top_k,
            attention_bias=False,
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
        if model_type == "deepseek_v3":
            config.update(
                n_group=router.expert_groups,
                topk_group=router.top_groups,
                topk_method="noaux_tc",
                scoring_func="sigmoid",
                rope_interleave=backbone.rope_interleave is not False,
                num_nextn_predict_layers=0,
            )
        else:
            config.update(
                topk_method="greedy",
                n_group=None,
                topk_group=None,
                aux_loss_alpha=moe.aux_loss_weight,
                scoring_func="softmax",
            )
    return config


def _tensors(mapping):
    """`(name, array)` pairs of one mapping, in checkpoint layout."""
    value = keras.ops.convert_to_numpy(mapping.variable)
    if mapping.kind == "experts":
        for j, name in enumerate(mapping.names):
            yield name, np.ascontiguousarray(mapping.to_checkpoint(value[j]))
    else:
        yield mapping.names[0], np.ascontiguousarray(mapping.to_checkpoint(value))


def to_transformers(
    model, directory, *, model_type=None, max_shard_size=DEFAULT_MAX_SHARD_BYTES
):
    """Write a model as a Hugging Face checkpoint that transformers loads.

    Writes `config.json` and the weights as safetensors (one
    `model.safetensors`, or shards of at most `max_shard_size` bytes with a
    `model.safetensors.index.json`), in the layout of the family's
    checkpoints on the Hub (one tensor per expert), so
    `AutoModelForCausalLM.from_pretrained(directory)` computes the same
    logits. With a `HuggingFaceTokenizer` in the preprocessor, its
    `tokenizer.json` and a `tokenizer_config.json` are written too.

    Weights are written in their dtype. Shards are written one at a time:
    at most one shard's tensors are held in memory in checkpoint layout.
    Transformers routes dropless: a model trained with a `capacity_factor`
    gives the logits of its dropless routing once exported.

    Args:
        model: a `MoECausalLM` or a `MoEBackbone`.
        directory: the output directory (created if needed).
        model_type: one of `SUPPORTED_MODEL_TYPES`, or `None` to infer it
            from the architecture (see `infer_model_type`).
        max_shard_size: int, the most bytes of tensors per file.

    Raises:
        ConversionError: if the model uses settings the family cannot
            express (the message names them).

    Example:

    >>> import json, os, tempfile
    >>> from keras_moe import convert, presets
    >>> model = presets.load("mixtral_small", preprocessor=None, num_layers=1)
    >>> directory = tempfile.mkdtemp()
    >>> convert.to_transformers(model, directory)
    >>> sorted(os.listdir(directory))
    ['config.json', 'model.safetensors']
    """
    from safetensors.numpy import save_file

    backbone = getattr(model, "backbone", model)
    config = transformers_config(backbone, model_type)
    mappings = weight_mappings(backbone, config["model_type"])
    os.makedirs(directory, exist_ok=True)

    shards, current, current_bytes = [], {}, 0
    weight_map = {}
    total_bytes = 0

    def flush():
        nonlocal current, current_bytes
        if current:
            index = len(shards) + 1
            file_name = f"model-{index:05d}.safetensors"
            save_file(current, os.path.join(directory, file_name), {"format": "pt"})
            shards.append(file_name)
            for name in current:
                weight_map[name] = file_name
        current, current_bytes = {}, 0

    for mapping in mappings:
        for name, tensor in _tensors(mapping):
            if current and current_bytes + tensor.nbytes > max_shard_size:
                flush()
            current[name] = tensor
            current_bytes += tensor.nbytes
            total_bytes += tensor.nbytes
    flush()
    if len(shards) == 1:
        os.replace(
            os.path.join(directory, shards[0]), os.path.join(directory, SINGLE_FILE)
        )
    else:
        count = len(shards)
        renamed = {}
        for index, file_name in enumerate(shards, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(directory, file_name), os.path.join(directory, final))
            renamed[file_name] = final
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {name: renamed[file] for name, file in weight_map.items()},
        }
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as file:
            json.dump(index, file, indent=2)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    _write_tokenizer(getattr(model, "preprocessor", None), directory)


def _write_tokenizer(preprocessor, directory):
    from keras_moe.convert.tokenizer import HuggingFaceTokenizer

    tokenizer = getattr(preprocessor, "tokenizer", None)
    if not isinstance(tokenizer, HuggingFaceTokenizer):
        return
    tokenizer.save_assets(directory)
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.start_token,
        "eos_token": tokenizer.end_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": tokenizer.start_token is not None,
    }
    with open(
        os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8"
    ) as file:
        json.dump(settings, file, indent=2)
