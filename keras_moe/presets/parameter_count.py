"""Total and active parameter counts of a `MoEBackbone` config, by formula."""

from keras_moe.utils.argument_validation import check_bool

# Keys of a keras-hub preset `config.json` (a serialized backbone) around the
# constructor arguments.
_SERIALIZED_KEYS = ("class_name", "config")


def count_params(name_or_config, *, active_embedding=True):
    """Count a model's parameters from its config, without building it.

    `total` is every weight of the `MoECausalLM` built from the config (what
    `model.count_params()` returns, the non-trainable balancing biases
    included). `active` is what one token uses on its way through the
    model: the token embedding, the LM head, every attention block, norm
    and dense feed-forward layer, and in each MoE layer the router, the
    `top_k` routed experts it picks and the shared experts. Routed experts
    it does not pick are the only weights left out.

    Published "active" counts differ on one point, the embedding table: a
    token reads a single row of it. Mistral counts it (Mixtral 8x7B: 12.9B
    active of 46.7B), DeepSeek does not (DeepSeek-V3: 37B active, "36.6B
    including 0.9B for the output head"; DeepSeek-V2-Lite: 2.4B).
    `active_embedding=False` leaves it out. With tied embeddings the table
    is also the LM head, so it stays in.

    Args:
        name_or_config: a preset name (see `names()`), a `MoEBackbone`
            config dict (`config(name)`, or `backbone.get_config()`), a
            whole preset record (a dict with a `"backbone"` entry), or the
            contents of a keras-hub preset's `config.json`.
        active_embedding: bool, whether `active` counts the token embedding
            table. Defaults to True.

    Returns:
        A dict `{"total": int, "active": int}`.

    Raises:
        ValueError: if the preset name is unknown or the config lacks a
            required key.

    Example:

    >>> from keras_moe import presets
    >>> counts = presets.count_params("mixtral_8x7b")
    >>> print(f"{counts['total'] / 1e9:.1f}B, {counts['active'] / 1e9:.1f}B")
    46.7B, 12.9B
    >>> counts = presets.count_params("deepseek_v3", active_embedding=False)
    >>> print(f"{counts['total'] / 1e9:.0f}B, {counts['active'] / 1e9:.1f}B")
    671B, 36.6B
    """
    check_bool("active_embedding", active_embedding)
    config = _backbone_config(name_or_config)
    get = _Getter(config)

    vocabulary_size = get.int("vocabulary_size")
    hidden_dim = get.int("hidden_dim")
    num_layers = get.int("num_layers", min_value=0)
    tied = get.bool("tie_word_embeddings", False)
    embedding = vocabulary_size * hidden_dim
    head = 0 if tied else hidden_dim * vocabulary_size
    final_norm = hidden_dim

    attention = _attention_params(get, hidden_dim)
    norms = 2 * hidden_dim  # Before attention and before the feed-forward.

    moe_layers = _num_moe_layers(get, num_layers)
    dense_layers = num_layers - moe_layers

    gated = get.bool("ffn_gated", True)
    projections = 3 if gated else 2
    dense_ffn = 0
    if dense_layers:
        dense_ffn = projections * hidden_dim * get.int("intermediate_dim")

    moe_total = moe_active = 0
    if moe_layers:
        moe_total, moe_active = _moe_params(get, hidden_dim, gated)

    total = (
        embedding
        + head
        + final_norm
        + num_layers * (attention + norms)
        + dense_layers * dense_ffn
        + moe_layers * moe_total
    )
    active = total - moe_layers * (moe_total - moe_active)
    if not active_embedding and not tied:
        active -= embedding
    return {"total": int(total), "active": int(active)}


def _num_moe_layers(get, num_layers):
    """MoE layers: those listed in `moe_layers`, else the first_k_dense and
    moe_layer_frequency rule (layer `i` is MoE iff `i >= first_k_dense` and
    `(i + 1) % moe_layer_frequency == 0`)."""
    listed = get.config.get("moe_layers")
    if listed is not None:
        if not isinstance(listed, (list, tuple)):
            raise ValueError(
                "`moe_layers` must be None or a list of layer indices. "
                f"Received: moe_layers={listed!r}"
            )
        return len({index for index in listed if 0 <= index < num_layers})
    first_k_dense = get.int("first_k_dense", 0, min_value=0)
    moe_layer_frequency = get.int("moe_layer_frequency", 1, min_value=1)
    return sum(
        1
        for index in range(num_layers)
        if index >= first_k_dense and (index + 1) % moe_layer_frequency == 0
    )


def _backbone_config(name_or_config):
    if isinstance(name_or_config, str):
        from keras_moe.presets.preset_registry import config

        return config(name_or_config)
    if not isinstance(name_or_config, dict):
        raise ValueError(
            "`name_or_config` must be a preset name or a config dict. "
            f"Received: {type(name_or_config).__name__}"
        )
    if "backbone" in name_or_config and isinstance(
        name_or_config["backbone"], dict
    ):
        return name_or_config["backbone"]
    if all(key in name_or_config for key in _SERIALIZED_KEYS) and isinstance(
        name_or_config["config"], dict
    ):
        return name_or_config["config"]
    return name_or_config


class _Getter:
    """Reads config values with the backbone's defaults and clear errors."""

    def __init__(self, config):
        self.config = config

    def _value(self, key, default):
        value = self.config.get(key, default)
        if value is _REQUIRED:
            raise ValueError(
                f"The config has no `{key}`, which the parameter count needs. "
                f"Received keys: {sorted(self.config)}"
            )
        return value

    def int(self, key, default=None, min_value=1):
        value = self._value(key, _REQUIRED if default is None else default)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or value < min_value:
            raise ValueError(
                f"`{key}` must be an integer >= {min_value}. "
                f"Received: {key}={value!r}"
            )
        return value

    def optional_int(self, key):
        value = self.config.get(key)
        return None if value is None else self.int(key)

    def bool(self, key, default):
        value = self._value(key, default)
        return check_bool(key, value)


_REQUIRED = object()


def _attention_params(get, hidden_dim):
    num_heads = get.int("num_query_heads")
    attention_type = get.config.get("attention_type", "gqa")
    if attention_type == "mla":
        q_lora_rank = get.optional_int("q_lora_rank")
        kv_lora_rank = get.int("kv_lora_rank")
        nope = get.int("qk_nope_head_dim")
        rope = get.int("qk_rope_head_dim")
        value_dim = get.int("v_head_dim")
        query_width = num_heads * (nope + rope)
        if q_lora_rank:
            query = (
                hidden_dim * q_lora_rank  # Down-projection.
                + q_lora_rank  # Its RMSNorm.
                + q_lora_rank * query_width  # Up-projection.
            )
        else:
            query = hidden_dim * query_width
        key_value = (
            hidden_dim * (kv_lora_rank + rope)
            + kv_lora_rank
            + kv_lora_rank * num_heads * (nope + value_dim)
        )
        output = num_heads * value_dim * hidden_dim
        return query + key_value + output
    if attention_type != "gqa":
        raise ValueError(
            "`attention_type` must be 'gqa' or 'mla'. "
            f"Received: attention_type={attention_type!r}"
        )
    num_kv_heads = get.optional_int("num_key_value_heads") or num_heads
    head_dim = get.optional_int("head_dim") or hidden_dim // num_heads
    query_width = num_heads * head_dim
    kv_width = num_kv_heads * head_dim
    params = 2 * hidden_dim * query_width + 2 * hidden_dim * kv_width
    if get.bool("attention_bias", False):
        params += query_width + 2 * kv_width
    if get.bool("use_qk_norm", False):
        params += 2 * head_dim
    return params


def _moe_params(get, hidden_dim, gated):
    """`(total, active)` parameters of one MoE feed-forward layer."""
    num_experts = get.int("num_experts", 8)
    top_k = get.int("top_k", 2)
    expert_dim = get.int("moe_intermediate_dim")
    options = get.config.get("moe_options") or {}
    if not isinstance(options, dict):
        raise ValueError(
            "`moe_options` must be a dict or None. "
            f"Received: moe_options={options!r}"
        )
    use_bias = bool(options.get("use_bias", False))

    def feed_forward(width):
        params = (3 if gated else 2) * hidden_dim * width
        if use_bias:
            params += (2 if gated else 1) * width + hidden_dim
        return params

    router = hidden_dim * num_experts
    if options.get("noisy_gating", False):
        router += hidden_dim * num_experts  # The noise kernel.
    if (options.get("bias_update_rate") or 0) > 0:
        router += num_experts  # The non-trainable balancing bias.
    expert = feed_forward(expert_dim)

    shared = 0
    num_shared = get.int("num_shared_experts", 0, min_value=0)
    if num_shared:
        shared_dim = get.optional_int("shared_intermediate_dim")
        shared = feed_forward(shared_dim or num_shared * expert_dim)
        if get.bool("shared_expert_gate", False):
            shared += hidden_dim

    total = router + num_experts * expert + shared
    active = router + min(top_k, num_experts) * expert + shared
    return total, active
