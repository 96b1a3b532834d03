"""DBRX (`model_type="dbrx"`): fused tensors, clipped q/k/v, LayerNorm.

Grouped-query attention whose query, key and value projections are one
fused `Wqkv` `[H*h + 2*K*h, d]` (rows: queries, keys, values), clamped to
`[-clip_qkv, clip_qkv]` after the projection (`MoEBackbone(clip_qkv=...)`),
with no biases; LayerNorm without bias in place of RMSNorm
(`norm_type="layer"`, epsilon 1e-5); every layer a `SparseMoE` routed by a
softmax top-k whose weights are divided by their p-norm,
`p = moe_normalize_expert_weights` (1, the default, is renormalisation;
None leaves them as they are). The experts of a layer are stored fused too:
`w1` (gate) and `v1` (up) `[E*f, d]`, expert `j` in rows `j*f:(j+1)*f`,
and `w2` (down) `[E*f, d]` holding each expert's `[f, d]` down projection
as it multiplies (not transposed). The config nests the attention and
feed-forward settings in `attn_config` and `ffn_config`.

Loading reads each Keras weight's rows of a fused tensor straight from the
file (`DbrxCheckpoint`); export writes the fused tensors back.
"""

import re

import keras
import numpy as np

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import SafetensorsCheckpoint
from keras_moe.convert.checkpoint import read_config
from keras_moe.convert.family import Family
from keras_moe.convert.family import moe_layer_indices
from keras_moe.convert.weight_mapping import weight_mappings

_BLOCK = "transformer.blocks.{layer}"
_WQKV = f"{_BLOCK}.norm_attn_norm.attn.Wqkv.weight"
_EXPERTS = f"{_BLOCK}.ffn.experts.mlp"
# The default of `DbrxAttentionConfig.rope_theta` and of `nn.LayerNorm`.
DEFAULT_ROPE_THETA = 10000.0
LAYER_NORM_EPSILON = 1e-5
# A Keras weight's part of a fused tensor is named `{fused}:{part}`: `query`,
# `key` or `value` of `Wqkv`, or an expert's index in `w1`, `v1` or `w2`.
_PART = re.compile(r"^(?P<fused>.+):(?P<part>query|key|value|\d+)$")


def _sub_config(hf_config, name):
    value = hf_config.get(name) or {}
    if not isinstance(value, dict):
        raise ConversionError(
            f"config.json field `{name}` must be an object. "
            f"Received: {name}={value!r}"
        )
    return value


class DbrxCheckpoint(SafetensorsCheckpoint):
    """A DBRX checkpoint that serves each Keras weight's part of a fused tensor.

    Besides the stored tensors, `...attn.Wqkv.weight:query` (`:key`,
    `:value`) is that projection's rows of `Wqkv`, and `...mlp.w1:{j}`
    (`v1`, `w2`) expert `j`'s `[out, in]` kernel (`w2`'s rows transposed).
    Only those rows are read from the file.

    Args:
        directory: the checkpoint directory.
        qkv_rows: `(query rows, key rows, value rows)` of `Wqkv`.
        expert_rows: int, the rows of one expert in `w1`, `v1` and `w2`.

    Example:

    >>> import pathlib, tempfile
    >>> from safetensors.numpy import save_file
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> w1 = np.arange(2 * 3 * 4, dtype="float32").reshape(2 * 3, 4)
    >>> save_file({"transformer.blocks.0.ffn.experts.mlp.w1": w1},
    ...     directory / "model.safetensors")
    >>> checkpoint = DbrxCheckpoint(directory, (4, 2, 2), expert_rows=3)
    >>> checkpoint.shape("transformer.blocks.0.ffn.experts.mlp.w1:1")
    (3, 4)
    >>> checkpoint.get("transformer.blocks.0.ffn.experts.mlp.w1:1")[0].tolist()
    [12.0, 13.0, 14.0, 15.0]
    """

    def __init__(self, directory, qkv_rows, expert_rows):
        super().__init__(directory)
        query, key, value = qkv_rows
        self._qkv_rows = {
            "query": (0, query),
            "key": (query, query + key),
            "value": (query + key, query + key + value),
        }
        self._expert_rows = expert_rows

    def _part(self, name):
        """`(stored name, first row, end row, transposed)`, or None."""
        match = _PART.match(name)
        if match is None or match["fused"] not in self._weight_map:
            return None
        part = match["part"]
        if part in self._qkv_rows:
            start, stop = self._qkv_rows[part]
            return match["fused"], start, stop, False
        start = int(part) * self._expert_rows
        return (
            match["fused"],
            start,
            start + self._expert_rows,
            match["fused"].endswith(".w2"),
        )

    def __contains__(self, name):
        if _PART.match(name):
            part = self._part(name)
            return part is not None and part[2] <= self._shape_of(part[0])[0]
        return super().__contains__(name)

    def shape(self, name):
        part = self._part(name)
        if part is None:
            return super().shape(name)
        _, start, stop, transposed = part
        shape = (stop - start, self._shape_of(part[0])[1])
        return shape[::-1] if transposed else shape

    def dtype(self, name):
        part = self._part(name)
        if part is None:
            return super().dtype(name)
        return self._info(part[0]).dtype

    def get(self, name):
        part = self._part(name)
        if part is None:
            return super().get(name)
        stored, start, stop, transposed = part
        self.read_names.add(stored)
        info = self._info(stored)
        file = self._open(self._weight_map[stored])
        columns = info.shape[1]
        rows = np.empty((stop - start, columns), dtype=info.dtype)
        # Rows are contiguous: read only this part's bytes.
        file._read_into(
            rows.reshape(-1).view(np.uint8),
            info.offset + start * columns * info.dtype.itemsize,
        )
        return np.ascontiguousarray(rows.T) if transposed else rows


class _FusedValue:
    """The fused tensor of several Keras weights, computed when read."""

    def __init__(self, parts):
        self._parts = parts  # (WeightMapping, expert index or None, transposed)

    def __array__(self, dtype=None, copy=None):
        rows = []
        for mapping, expert, transposed in self._parts:
            value = keras.ops.convert_to_numpy(mapping.variable)
            if expert is not None:
                value = value[expert]
            value = mapping.to_checkpoint(value)
            rows.append(value.T if transposed else value)
        fused = np.concatenate(rows, axis=0)
        return fused if dtype is None else fused.astype(dtype)


class _FusedMapping:
    """A stored fused tensor for export (read like a `"copy"` mapping)."""

    kind = "copy"

    def __init__(self, name, parts):
        self.names = (name,)
        self.variable = _FusedValue(parts)

    def to_checkpoint(self, value):
        return value


class Dbrx(Family):
    """DBRX (databricks/dbrx-base, dbrx-instruct) and its fine-tunes.

    Example:

    >>> config = Dbrx().backbone_config({
    ...     "model_type": "dbrx", "vocab_size": 64, "d_model": 16,
    ...     "n_heads": 4, "n_layers": 2,
    ...     "attn_config": {"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 5e5},
    ...     "ffn_config": {"ffn_hidden_size": 8, "moe_num_experts": 4,
    ...                    "moe_top_k": 2}})
    >>> config["norm_type"], config["clip_qkv"], config["rope_max_wavelength"]
    ('layer', 8.0, 500000.0)
    >>> config["moe_options"]["normalize_top_k"]
    True
    """

    model_type = "dbrx"
    architecture = "DbrxForCausalLM"
    rope_theta = DEFAULT_ROPE_THETA
    tensor_names = {
        "token_embedding/embeddings": "transformer.wte.weight",
        "final_norm/scale": "transformer.norm_f.weight",
        "token_embedding/reverse_embeddings": "lm_head.weight",
        "pre_attention_norm/scale": f"{_BLOCK}.norm_attn_norm.norm_1.weight",
        "pre_feedforward_norm/scale": f"{_BLOCK}.norm_attn_norm.norm_2.weight",
        "attention/query/kernel": f"{_WQKV}:query",
        "attention/key/kernel": f"{_WQKV}:key",
        "attention/value/kernel": f"{_WQKV}:value",
        "attention/attention_output/kernel": (
            f"{_BLOCK}.norm_attn_norm.attn.out_proj.weight"
        ),
        "moe/router/kernel": f"{_BLOCK}.ffn.router.layer.weight",
        "moe/experts/gate_kernel": _EXPERTS + ".w1:{expert}",
        "moe/experts/up_kernel": _EXPERTS + ".v1:{expert}",
        "moe/experts/down_kernel": _EXPERTS + ".w2:{expert}",
    }
    attention_options = ("clip_qkv", "norm_type")

    def open_checkpoint(self, directory):
        config = self.backbone_config(read_config(directory))
        head_dim = config["hidden_dim"] // config["num_query_heads"]
        kv_rows = config["num_key_value_heads"] * head_dim
        return DbrxCheckpoint(
            directory,
            (config["num_query_heads"] * head_dim, kv_rows, kv_rows),
            expert_rows=config["moe_intermediate_dim"],
        )

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
        attn = _sub_config(hf_config, "attn_config")
        ffn = _sub_config(hf_config, "ffn_config")
        activation = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
        rope_theta = attn.get("rope_theta")
        if rope_theta is None:
            rope_theta = config_fields.rope_theta(hf_config, DEFAULT_ROPE_THETA)
        # The nested fields under the names every decoder family reads.
        flat = {
            "model_type": self.model_type,
            "vocab_size": field(hf_config, "vocab_size", required=True),
            "num_hidden_layers": field(hf_config, "n_layers", required=True),
            "hidden_size": field(hf_config, "d_model", required=True),
            "num_attention_heads": field(hf_config, "n_heads", required=True),
            "rope_theta": rope_theta,
            "rope_scaling": hf_config.get("rope_scaling"),
            "rope_parameters": hf_config.get("rope_parameters"),
            "rms_norm_eps": LAYER_NORM_EPSILON,
            "tie_word_embeddings": field(hf_config, "tie_word_embeddings", False),
            "hidden_act": activation,
        }
        config = self.decoder_config(flat)
        p_norm = ffn.get("moe_normalize_expert_weights", 1.0)
        if p_norm not in (None, 1, 1.0):
            raise ConversionError(
                "config.json field `ffn_config.moe_normalize_expert_weights`="
                f"{p_norm!r} is not supported: keras-moe routers renormalise "
                "the top-k weights by their sum (p=1, DBRX's value) or leave "
                "them as they are (null)."
            )
        clip_qkv = attn.get("clip_qkv")
        jitter = ffn.get("moe_jitter_eps")
        config.update(
            num_key_value_heads=int_field(attn, "kv_n_heads", 1),
            norm_type="layer",
            clip_qkv=None if clip_qkv is None else float(clip_qkv),
            num_experts=int_field(ffn, "moe_num_experts", 4),
            top_k=int_field(ffn, "moe_top_k", 1),
            moe_intermediate_dim=int_field(ffn, "ffn_hidden_size", 3584),
            moe_options=dict(
                capacity_factor=None,
                normalize_top_k=p_norm is not None,
                aux_loss_weight=float(ffn.get("moe_loss_weight", 0.01)),
                jitter=float(jitter or 0.0),
            ),
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) == "layer_norm"
        )

    def check_exportable(self, backbone, moe):
        if moe["expert_groups"] != 1 or moe["bias_update_rate"] > 0:
            self.refuse("DBRX routers have no expert groups or balancing bias.")
        if moe["routed_scaling_factor"] != 1.0:
            self.refuse("its router scales weights (routed_scaling_factor).")
        if len(moe_layer_indices(backbone)) != backbone.num_layers:
            self.refuse("every DBRX layer is a MoE layer.")
        if (
            backbone.attention_bias
            or backbone.use_qk_norm
            or backbone.num_shared_experts
        ):
            self.refuse("DBRX has no attention biases, q/k norm or shared experts.")
        if backbone.norm_type != "layer":
            self.refuse("DBRX normalizes with LayerNorm (norm_type='layer').")
        if backbone.head_dim not in (
            None,
            backbone.hidden_dim // backbone.num_query_heads,
        ):
            self.refuse("DBRX heads are hidden_dim // num_query_heads wide.")
        if backbone.layer_norm_epsilon != LAYER_NORM_EPSILON:
            self.refuse(f"DBRX's LayerNorm epsilon is {LAYER_NORM_EPSILON}.")

    def transformers_config(self, backbone):
        config = super().transformers_config(backbone)
        # DBRX's own names (transformers maps the Llama ones onto them).
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "num_experts_per_tok",
            "attention_dropout",
        ):
            config.pop(name, None)
        return config

    def export_config(self, backbone, moe):
        return dict(
            d_model=backbone.hidden_dim,
            n_heads=backbone.num_query_heads,
            n_layers=backbone.num_layers,
            attn_config=dict(
                kv_n_heads=backbone.num_key_value_heads or backbone.num_query_heads,
                clip_qkv=backbone.clip_qkv,
                rope_theta=backbone.rope_max_wavelength,
                attn_pdrop=0.0,
            ),
            ffn_config=dict(
                ffn_hidden_size=backbone.moe_intermediate_dim,
                moe_num_experts=backbone.num_experts,
                moe_top_k=backbone.top_k,
                moe_jitter_eps=moe["jitter"] or None,
                moe_loss_weight=moe["aux_loss_weight"],
                moe_normalize_expert_weights=1.0 if moe["normalize_top_k"] else None,
                ffn_act_fn={"name": backbone.ffn_activation},
            ),
        )

    def weight_mappings(self, backbone):
        """The tensors to export, with the fused ones assembled.

        Args:
            backbone: a `MoEBackbone` DBRX checkpoints can hold.

        Returns:
            A list of mappings in checkpoint order: the plain ones of
            `keras_moe.convert.weight_mapping.weight_mappings`, and one per
            fused tensor (`Wqkv`, `w1`, `v1`, `w2`) in place of its parts.
        """
        mappings, fused = [], {}
        for mapping in weight_mappings(backbone, self):
            match = _PART.match(mapping.names[0])
            if match is None:
                mappings.append(mapping)
                continue
            stored = match["fused"]
            if stored not in fused:
                fused[stored] = []
                mappings.append(stored)
            if mapping.kind == "experts":
                transposed = stored.endswith(".w2")
                fused[stored].extend(
                    (mapping, j, transposed) for j in range(len(mapping.names))
                )
            else:
                fused[stored].append((mapping, None, False))
        return [
            _FusedMapping(m, fused[m]) if isinstance(m, str) else m for m in mappings
        ]


FAMILIES = (Dbrx(),)
