"""Which checkpoint tensor holds each `MoEBackbone` weight, and how.

The backbone's weights come from its config
(`keras_moe.models.weight_structure.backbone_weights`); the family names
the tensor of each (`Family.tensor_name`). A `WeightMapping` ties one Keras
variable to its tensor(s) and knows the layout change between them:
- `"copy"`: same shape (embeddings, norm scales, balancing biases);
- `"vector"`: a flat vector reshaped to the variable (q/k/v biases
  `[H * h]` -> `[H, h]`);
- `"linear"`: a `torch.nn.Linear` weight `[out, in]` stored in Keras as a
  kernel `[*in_dims, *out_dims]` (transposed, then split into heads);
- `"experts"`: one `[out, in]` weight per expert, stacked in Keras as
  `[E, in, out]`.
"""

from typing import NamedTuple

import numpy as np

from keras_moe.convert.checkpoint import ConversionError
from keras_moe.models.weight_structure import backbone_weights


class WeightMapping(NamedTuple):
    """One Keras variable and the checkpoint tensor(s) it comes from.

    Attributes:
        variable: the `keras.Variable`.
        names: tuple of checkpoint tensor names: one, or one per expert.
        kind: `"copy"`, `"vector"`, `"linear"` or `"experts"`.
        input_rank: for `"linear"`, how many leading kernel axes are the
            input (1, or 2 for output projections `[H, h, d]`).
    """

    variable: object
    names: tuple
    kind: str
    input_rank: int = 1

    def checkpoint_shape(self):
        """The shape each checkpoint tensor must have."""
        shape = tuple(self.variable.shape)
        if self.kind == "copy":
            return shape
        if self.kind == "vector":
            return (int(np.prod(shape)),)
        if self.kind == "linear":
            inputs = int(np.prod(shape[: self.input_rank]))
            outputs = int(np.prod(shape[self.input_rank :]))
            return (outputs, inputs)
        return (shape[2], shape[1])  # "experts": one [out, in] per expert

    def to_keras(self, tensor):
        """A checkpoint tensor in the variable's layout (one expert's slice
        for `"experts"`)."""
        shape = tuple(self.variable.shape)
        if self.kind == "copy":
            return tensor
        if self.kind == "vector":
            return tensor.reshape(shape)
        if self.kind == "linear":
            return tensor.T.reshape(shape)
        return tensor.T

    def to_checkpoint(self, value):
        """The variable's value (or one expert's slice) in checkpoint layout."""
        if self.kind == "copy":
            return value
        if self.kind == "vector":
            return value.reshape(-1)
        if self.kind == "linear":
            inputs = int(np.prod(value.shape[: self.input_rank]))
            return value.reshape(inputs, -1).T
        return value.T


def _layout(weight):
    """`(kind, input_rank)` of a backbone weight in a transformers checkpoint."""
    if weight.kind == "kernel":
        if weight.routed:
            return "experts", 1
        return "linear", weight.input_axes
    if weight.kind == "bias":
        return "vector", 1
    return "copy", 1


def weight_mappings(backbone, family):
    """Every weight of `backbone` with its tensor in a `family` checkpoint.

    Args:
        backbone: a built `MoEBackbone`.
        family: a `keras_moe.convert.family.Family` (see
            `keras_moe.convert.registry.lookup`); it names the tensors.

    Returns:
        A list of `WeightMapping`, in checkpoint order.

    Raises:
        ConversionError: if the backbone has weights that the family's
            checkpoints have no tensor for (their paths are named).

    Example:

    >>> from keras_moe.convert import registry
    >>> from keras_moe.models import MoEBackbone
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=32, num_layers=1, hidden_dim=8, num_query_heads=2,
    ...     num_experts=2, top_k=1, moe_intermediate_dim=4)
    >>> mappings = weight_mappings(backbone, registry.family_of(backbone))
    >>> [m.names[0] for m in mappings][:2]
    ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
    >>> mappings[-1].names[0], mappings[-1].checkpoint_shape()
    ('lm_head.weight', (32, 8))
    """
    variables = _variables_by_path(backbone)
    mappings = []
    for weight in backbone_weights(backbone.get_config()):
        variable = variables.get(weight.path)
        name = family.tensor_name(weight)
        if variable is None or name is None:
            continue
        kind, input_rank = _layout(weight)
        if kind == "experts":
            names = tuple(
                name.replace("{expert}", str(j)) for j in range(weight.shape[0])
            )
        else:
            names = (name,)
        mappings.append(WeightMapping(variable, names, kind, input_rank))
    _check_covered(backbone, mappings, family)
    return mappings


def _variables_by_path(backbone):
    """`{path: variable}`, paths relative to the backbone (as
    `backbone_weights` writes them) even when it was built in a name
    scope."""
    embeddings = backbone.token_embedding.embeddings
    scope = embeddings.path[: -len("token_embedding/embeddings")]
    return {variable.path[len(scope) :]: variable for variable in backbone.weights}


def _check_covered(backbone, mappings, family):
    mapped = {id(mapping.variable) for mapping in mappings}
    unmapped = [
        variable.path for variable in backbone.weights if id(variable) not in mapped
    ]
    if unmapped:
        raise ConversionError(
            f"{family.model_type} checkpoints have no tensor for these weights: "
            f"{', '.join(unmapped)}. The model uses options (expert biases, "
            "noisy gating, balancing biases, ...) that this family does not "
            "have."
        )
