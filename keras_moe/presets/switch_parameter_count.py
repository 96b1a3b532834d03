"""Total and active parameter counts of a Switch encoder-decoder config."""

import inspect

from keras_moe.models.switch_encoder_decoder_backbone import CONFIG_KEYS
from keras_moe.models.switch_encoder_decoder_backbone import (
    SwitchEncoderDecoderBackbone,
)
from keras_moe.models.switch_transformer_block import is_sparse_layer

_PARAMETERS = inspect.signature(SwitchEncoderDecoderBackbone.__init__).parameters
_DEFAULTS = {
    name: parameter.default
    for name, parameter in _PARAMETERS.items()
    if name in CONFIG_KEYS and parameter.default is not inspect.Parameter.empty
}
# A key only `SwitchEncoderDecoderBackbone` configs have.
_MARKER = "encoder_sparse_step"


def is_switch_config(config):
    """Whether a backbone config dict is a `SwitchEncoderDecoderBackbone`'s.

    Args:
        config: dict of backbone constructor arguments.

    Returns:
        bool.

    Example:

    >>> is_switch_config({"encoder_sparse_step": 2}), is_switch_config({})
    (True, False)
    """
    return _MARKER in config


def switch_count_params(config, active_embedding=True, active_head=True):
    """Count a `SwitchEncoderDecoderBackbone`'s weights from its config.

    `total` is what the built `SwitchSeq2SeqLM` has: the shared embedding
    (and an untied output head), each stack's relative position bias table
    and final norm, and per block its norms, attention projections
    (`4 * d * H * h`; decoder blocks twice, with cross-attention) and
    feed-forward layer (a dense block, or a router `d * E` and `E`
    experts). `active` is what one token uses: a Switch layer's router and
    the one expert it picks, and everything else (the embedding and head
    unless left out, as in `count_params`).

    Args:
        config: dict of `SwitchEncoderDecoderBackbone` arguments (missing
            ones take the backbone's defaults).
        active_embedding: bool, whether `active` counts the embedding.
        active_head: bool, whether `active` counts an untied output head
            (a tied table is left out only when neither is counted).

    Returns:
        A dict `{"total": int, "active": int}`.

    Example:

    >>> counts = switch_count_params({
    ...     "vocabulary_size": 32128, "num_layers": 12, "hidden_dim": 768,
    ...     "num_heads": 12, "intermediate_dim": 3072, "num_experts": 8,
    ...     "encoder_sparse_step": 2, "decoder_sparse_step": 2})
    >>> print(f"{counts['total'] / 1e6:.1f}M, {counts['active'] / 1e6:.1f}M")
    619.3M, 223.0M
    """
    missing = [
        name for name in CONFIG_KEYS if name not in config and name not in _DEFAULTS
    ]
    if missing:
        raise ValueError(
            f"The config has no {', '.join(f'`{name}`' for name in missing)}, "
            "which the parameter count needs. Received keys: "
            f"{sorted(config)}"
        )
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in CONFIG_KEYS}}
    d = c["hidden_dim"]
    key_value_dim = c["key_value_dim"] or d // c["num_heads"]
    inner = c["num_heads"] * key_value_dim
    num_decoder_layers = c["num_decoder_layers"] or c["num_layers"]
    experts = c["num_experts"]
    expert_dim = c["expert_intermediate_dim"] or c["intermediate_dim"]
    projections = 3 if c["gated_feedforward"] else 2
    attention = 4 * d * inner + d  # projections and the pre-attention norm
    dense = projections * d * c["intermediate_dim"] + d
    expert = projections * d * expert_dim
    router_and_norm = d * experts + d

    total = active = 0
    for count, step, attentions in (
        (c["num_layers"], c["encoder_sparse_step"], 1),
        (num_decoder_layers, c["decoder_sparse_step"], 2),
    ):
        stack = c["relative_attention_num_buckets"] * c["num_heads"] + d
        stack_active = stack
        for i in range(count):
            stack += attentions * attention
            stack_active += attentions * attention
            if is_sparse_layer(i, step):
                stack += router_and_norm + experts * expert
                stack_active += router_and_norm + expert
            else:
                stack += dense
                stack_active += dense
        total += stack
        active += stack_active

    table = c["vocabulary_size"] * d
    tied = c["tie_word_embeddings"]
    total += table if tied else 2 * table
    if tied:
        active += table if (active_embedding or active_head) else 0
    else:
        active += table * (int(active_embedding) + int(active_head))
    return {"total": int(total), "active": int(active)}
