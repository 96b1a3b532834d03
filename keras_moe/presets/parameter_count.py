"""Total and active parameter counts of a `MoEBackbone` config, by formula.

The count sums `keras_moe.models.weight_structure.backbone_weights`, the
description of a backbone's weights that checkpoint conversion uses too.
"""

import inspect

from keras_moe.models.backbone_config import CONFIG_KEYS
from keras_moe.models.backbone_config import validated_config
from keras_moe.models.moe_backbone import MoEBackbone
from keras_moe.models.weight_structure import EMBEDDING
from keras_moe.models.weight_structure import HEAD
from keras_moe.models.weight_structure import backbone_weights
from keras_moe.presets.preset_registry import config as preset_config
from keras_moe.presets.switch_parameter_count import is_switch_config
from keras_moe.presets.switch_parameter_count import switch_count_params
from keras_moe.utils.argument_validation import check_bool

# Keys of a keras-hub preset `config.json` (a serialized backbone) around the
# constructor arguments.
_SERIALIZED_KEYS = ("class_name", "config")
_PARAMETERS = inspect.signature(MoEBackbone.__init__).parameters
# The backbone's own defaults fill what a config leaves out.
_DEFAULTS = {
    name: parameter.default
    for name, parameter in _PARAMETERS.items()
    if name in CONFIG_KEYS and parameter.default is not inspect.Parameter.empty
}
_REQUIRED = tuple(
    name for name in CONFIG_KEYS if name in _PARAMETERS and name not in _DEFAULTS
)


def count_params(name_or_config, *, active_embedding=True, active_head=True):
    """Count a model's parameters from its config, without building it.

    `total` is every weight of the `MoECausalLM` built from the config (what
    `model.count_params()` returns, the non-trainable balancing biases
    included). `active` is what one token uses on its way through the
    model: the token embedding, the LM head, every attention block, norm
    and dense feed-forward layer, and in each MoE layer the router, the
    `top_k` routed experts it picks and the shared experts. Routed experts
    it does not pick are the only weights left out, besides the
    multi-token prediction modules (`num_mtp_layers`), which only training
    runs: they count in `total`, not in `active`.

    Published "active" counts differ on one point, the embedding table: a
    token reads a single row of it. Mistral counts it (Mixtral 8x7B: 12.9B
    active of 46.7B), DeepSeek does not (DeepSeek-V3: 37B active, "36.6B
    including 0.9B for the output head"; DeepSeek-V2-Lite: 2.4B), nor does
    OpenAI (gpt-oss-20b: 3.6B active, its output head included; attention
    sinks and biases and router biases count as active, expert biases with
    their experts).
    `active_embedding=False` leaves it out. With tied embeddings the table
    is also the LM head, so it stays in. GLM-4.5 leaves out the output head
    too (355B / 32B active, 106B / 12B for GLM-4.5-Air: the parameters of
    the decoder blocks a token uses): `active_head=False`.

    Args:
        name_or_config: a preset name (see `names()`), a `MoEBackbone`
            config dict (`config(name)`, or `backbone.get_config()`), a
            whole preset record (a dict with a `"backbone"` entry), or the
            contents of a keras-hub preset's `config.json`.
        active_embedding: bool, whether `active` counts the token embedding
            table. Defaults to True.
        active_head: bool, whether `active` counts the untied output head
            (with tied embeddings the table is left out only when both are
            False). Defaults to True.

    Returns:
        A dict `{"total": int, "active": int}`.

    Raises:
        ValueError: if the preset name is unknown, the config lacks a
            required key, or a `MoEBackbone` would refuse it.

    Example:

    >>> from keras_moe import presets
    >>> counts = presets.count_params("mixtral_8x7b")
    >>> print(f"{counts['total'] / 1e9:.1f}B, {counts['active'] / 1e9:.1f}B")
    46.7B, 12.9B
    >>> counts = presets.count_params("deepseek_v3", active_embedding=False)
    >>> print(f"{counts['total'] / 1e9:.0f}B, {counts['active'] / 1e9:.1f}B")
    671B, 36.6B
    >>> counts = presets.count_params(
    ...     "glm_4_5", active_embedding=False, active_head=False)
    >>> print(f"{counts['total'] / 1e9:.0f}B, {counts['active'] / 1e9:.1f}B")
    353B, 32.1B
    """
    check_bool("active_embedding", active_embedding)
    check_bool("active_head", active_head)
    backbone_config = _backbone_config(name_or_config)
    if is_switch_config(backbone_config):
        # Switch Transformer's encoder-decoder (`SwitchEncoderDecoderBackbone`).
        return switch_count_params(backbone_config, active_embedding, active_head)
    config = _checked_config(backbone_config)
    tied = config["tie_word_embeddings"]
    skip_embedding = not active_embedding and (not tied or not active_head)
    skip_head = not active_head and not tied
    total = active = 0
    for weight in backbone_weights(config):
        total += weight.size
        if weight.layer is not None and weight.layer >= config["num_layers"]:
            continue  # A multi-token prediction module: training only.
        if weight.routed:
            active += weight.size * config["top_k"] // config["num_experts"]
        elif not (
            (weight.part == EMBEDDING and skip_embedding)
            or (weight.part == HEAD and skip_head)
        ):
            active += weight.size
    return {"total": int(total), "active": int(active)}


def _checked_config(config):
    """The config with the backbone's defaults, checked as the backbone does."""
    moe_options = config.get("moe_options")
    if moe_options is not None and not isinstance(moe_options, dict):
        raise ValueError(
            "`moe_options` must be a dict or None. "
            f"Received: moe_options={moe_options!r}"
        )
    moe_layers = config.get("moe_layers")
    if moe_layers is not None and not isinstance(moe_layers, (list, tuple)):
        raise ValueError(
            "`moe_layers` must be None or a list of layer indices. "
            f"Received: moe_layers={moe_layers!r}"
        )
    for key in _REQUIRED:
        if key not in config:
            raise ValueError(
                f"The config has no `{key}`, which the parameter count needs. "
                f"Received keys: {sorted(config)}"
            )
    given = {key: value for key, value in config.items() if key in CONFIG_KEYS}
    return validated_config(**{**_DEFAULTS, **given})


def _backbone_config(name_or_config):
    if isinstance(name_or_config, str):
        return preset_config(name_or_config)
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
