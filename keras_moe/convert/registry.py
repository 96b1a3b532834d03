"""The registry of model families, by Hugging Face `model_type`.

Loading, export and weight mapping ask it for the `Family` of a
`model_type` (`lookup`), or for the family that describes a backbone
(`family_of`); they never name a family themselves. The modules of
`keras_moe.convert.families` are registered on import; `register` adds
another one.
"""

from keras_moe.convert import families
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.family import moe_settings

_FAMILIES = {}


def register(family):
    """Register a `Family` under its `model_type`.

    A family registered under a `model_type` that is already known replaces
    the previous one.

    Args:
        family: a `keras_moe.convert.family.Family` instance.

    Returns:
        The family.

    Example:

    >>> from keras_moe.convert import registry
    >>> family = registry.lookup("mixtral")
    >>> registry.register(family) is family
    True
    """
    _FAMILIES[family.model_type] = family
    return family


def model_types():
    """The registered `model_type`s, in registration order.

    Returns:
        A tuple of str.

    Example:

    >>> "deepseek_v3" in model_types()
    True
    """
    return tuple(_FAMILIES)


def lookup(model_type):
    """The `Family` registered for `model_type`.

    Args:
        model_type: str, a transformers `model_type`.

    Returns:
        A `Family`.

    Raises:
        ConversionError: for a `model_type` no family converts (the message
            lists those that are registered).

    Example:

    >>> lookup("qwen2_moe").architecture
    'Qwen2MoeForCausalLM'
    """
    if model_type not in _FAMILIES:
        raise ConversionError(
            f"`model_type`={model_type!r} is not supported. Supported model "
            f"types: {', '.join(model_types())}."
        )
    return _FAMILIES[model_type]


def family_of(backbone):
    """The family a `MoEBackbone` exports to when no `model_type` is given.

    Each family says whether it describes a backbone (by its attention,
    router scoring, q/k norm and shared experts); exactly one does.

    Args:
        backbone: a `MoEBackbone`.

    Returns:
        A `Family`.

    Raises:
        ConversionError: if no registered family describes the backbone.

    Example:

    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=2, top_k=1, moe_intermediate_dim=4, use_qk_norm=True)
    >>> family_of(backbone).model_type
    'qwen3_moe'
    """
    for family in _FAMILIES.values():
        # Families of their own backbone class (Switch Transformer's
        # encoder-decoder) are found by it.
        backbone_class = getattr(family, "backbone_class", None)
        if backbone_class is not None and isinstance(backbone, backbone_class):
            return family
    moe = moe_settings(backbone)
    for family in _FAMILIES.values():
        if family.describes(backbone, moe):
            return family
    raise ConversionError(
        "No supported model type describes this model (attention "
        f"{backbone.attention_type!r}, router scores "
        f"{moe['score_function']!r}); pass `model_type` (one of "
        f"{', '.join(model_types())}) to see what it cannot express."
    )


for _module in families.MODULES:
    for _family in _module.FAMILIES:
        register(_family)
