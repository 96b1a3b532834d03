"""How Llama 4 checkpoints store their tensors, read and written.

Llama 4 stores each layer's experts stacked, `experts.gate_up_proj
[E, d, 2f]` (gate columns first) and `experts.down_proj [E, f, d]`, and
rotates adjacent feature pairs (complex RoPE) where keras-moe rotates the
two halves of each head. `Llama4Checkpoint` serves the per-expert `[out,
in]` tensors and rotate-half `q_proj`/`k_proj` rows that loading expects;
`StackedExport` and `RotatedExport` write them back in Llama 4's layout.
The family itself (config, mappings, what export refuses) is
`keras_moe.convert.families.llama4`.
"""

import re

import keras
import numpy as np

from keras_moe.convert.checkpoint import SafetensorsCheckpoint

PER_EXPERT_WEIGHT = re.compile(
    r"^(?P<prefix>.*\.feed_forward\.experts)\.(?P<expert>\d+)\."
    r"(?P<projection>gate_proj|up_proj|down_proj)\.weight$"
)
ROTATED = re.compile(r"\.self_attn\.(q_proj|k_proj)\.(weight|bias)$")
# Tensors of the multimodal checkpoints that the text model does not use.
_NOT_TEXT = ("vision_model.", "multi_modal_projector.")


def interleaved_to_halves(rows, head_dim):
    """Reorder each head's rows from adjacent pairs to two halves.

    Row `2i + j` of a head (`j` in {0, 1}: the pair of frequency `i` in
    Llama 4's complex RoPE) moves to row `j * head_dim / 2 + i`, where
    rotate-half RoPE pairs it with the same frequency.

    Args:
        rows: array `[heads * head_dim, ...]` (a `q_proj`/`k_proj` weight
            or bias).
        head_dim: int, the (even) width of each head.

    Returns:
        An array of the same shape.

    Example:

    >>> interleaved_to_halves(np.arange(8), 4).tolist()
    [0, 2, 1, 3, 4, 6, 5, 7]
    """
    rows = np.asarray(rows)
    grouped = rows.reshape((-1, head_dim // 2, 2) + rows.shape[1:])
    return np.ascontiguousarray(np.swapaxes(grouped, 1, 2)).reshape(rows.shape)


def halves_to_interleaved(rows, head_dim):
    """The inverse of `interleaved_to_halves`.

    Args:
        rows: array `[heads * head_dim, ...]` in rotate-half order.
        head_dim: int, the (even) width of each head.

    Returns:
        An array of the same shape, in adjacent-pair order.

    Example:

    >>> halves_to_interleaved(interleaved_to_halves(np.arange(8), 4), 4).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    rows = np.asarray(rows)
    grouped = rows.reshape((-1, 2, head_dim // 2) + rows.shape[1:])
    return np.ascontiguousarray(np.swapaxes(grouped, 1, 2)).reshape(rows.shape)


class Llama4Checkpoint(SafetensorsCheckpoint):
    """A Llama 4 checkpoint: stacked experts, complex-RoPE query/key rows.

    Besides the stored tensors, serves one expert's `[out, in]` projection
    under `...feed_forward.experts.{j}.gate_proj.weight` (and `up_proj`,
    `down_proj`), sliced from the stacked `gate_up_proj [E, d, 2f]` and
    `down_proj [E, f, d]`; returns `q_proj`/`k_proj` weights and biases
    with each head's rows in rotate-half order (`interleaved_to_halves`);
    finds the text model's tensors of a multimodal checkpoint under their
    `language_model.` prefix, and leaves its vision tensors out of `keys()`.

    Args:
        directory: the checkpoint directory.
        head_dim: int, the width of each attention head.

    Example:

    >>> import pathlib, tempfile
    >>> from safetensors.numpy import save_file
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> gate_up = np.arange(2 * 3 * 4, dtype="float32").reshape(2, 3, 4)
    >>> save_file({"language_model.model.layers.0.feed_forward.experts."
    ...     "gate_up_proj": gate_up}, directory / "model.safetensors")
    >>> checkpoint = Llama4Checkpoint(directory, head_dim=4)
    >>> checkpoint.get(
    ...     "model.layers.0.feed_forward.experts.1.up_proj.weight").tolist()
    [[14.0, 18.0, 22.0], [15.0, 19.0, 23.0]]
    """

    def __init__(self, directory, head_dim):
        super().__init__(
            directory,
            aliases=(
                ("model.", "language_model.model."),
                ("lm_head.", "language_model.lm_head."),
            ),
        )
        self.head_dim = head_dim

    def _fused_source(self, name):
        # Per-expert names are served by `_expert_source` (the base reads
        # transformers' `[E, 2f, d]` layout, transposed from Llama 4's).
        return None

    def _expert_source(self, name):
        """`(stored stacked name, expert, projection)`, or None."""
        match = PER_EXPERT_WEIGHT.match(name)
        if match is None:
            return None
        stacked = "down_proj" if match["projection"] == "down_proj" else "gate_up_proj"
        source = self._source(f"{match['prefix']}.{stacked}")
        if source is None:
            return None
        return source[0], int(match["expert"]), match["projection"]

    def __contains__(self, name):
        if PER_EXPERT_WEIGHT.match(name):
            return self._expert_source(name) is not None
        return super().__contains__(name)

    def keys(self):
        return [name for name in super().keys() if not name.startswith(_NOT_TEXT)]

    def shape(self, name):
        expert = self._expert_source(name)
        if expert is None:
            return super().shape(name)
        stored, _, projection = expert
        _, inputs, outputs = self._shape_of(stored)
        if projection != "down_proj":
            outputs //= 2
        return (outputs, inputs)

    def get(self, name):
        expert = self._expert_source(name)
        if expert is None:
            tensor = super().get(name)
            if ROTATED.search(name):
                tensor = interleaved_to_halves(tensor, self.head_dim)
            return tensor
        stored, index, projection = expert
        self.read_names.add(stored)
        kernel = self._open(self.file_of(stored)).read(stored, index)  # [in, out]
        if projection != "down_proj":
            width = kernel.shape[1] // 2
            start = 0 if projection == "gate_proj" else width
            kernel = kernel[:, start : start + width]
        return np.ascontiguousarray(kernel.T)


class RotatedExport:
    """Export of a `q_proj`/`k_proj` mapping, rows back in pair order."""

    def __init__(self, mapping, head_dim):
        self.variable, self.names, self.kind = (
            mapping.variable,
            mapping.names,
            mapping.kind,
        )
        self._mapping, self._head_dim = mapping, head_dim

    def to_checkpoint(self, value):
        return halves_to_interleaved(
            self._mapping.to_checkpoint(value), self._head_dim
        )


class StackedExport:
    """Export of one layer's stacked experts: `gate_up_proj [E, d, 2f]`
    (the gate kernel, then the up kernel) or `down_proj [E, f, d]`."""

    kind = "stacked_experts"

    def __init__(self, name, variable, up_variable=None):
        self.names, self.variable, self._up = (name,), variable, up_variable

    def to_checkpoint(self, value):
        if self._up is None:
            return value
        return np.concatenate([value, keras.ops.convert_to_numpy(self._up)], axis=-1)
