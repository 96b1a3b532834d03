"""GPT-OSS (`model_type="gpt_oss"`): gpt-oss-20b and gpt-oss-120b.

Grouped-query attention with q/k/v/o biases, a learned sink logit per head,
YaRN RoPE, and layers that alternate between a sliding window
(`layer_types`) and full attention. Every layer is a MoE layer: the router
has a bias and weighs its top-k experts by a softmax over their logits (the
softmax of all logits renormalised over the top k, the same numbers), and
the experts, with biases, compute GPT-OSS's clamped SwiGLU.

The checkpoints store each layer's experts stacked: `gate_up_proj [E, d, 2f]`
with the gate and up columns interleaved (gate at even, up at odd),
`down_proj [E, f, d]`, and biases `gate_up_proj_bias [E, 2f]`,
`down_proj_bias [E, d]`. The released checkpoints store the expert kernels
in MXFP4 instead (`quantization_config.quant_method="mxfp4"`):
`gate_up_proj_blocks [E, 2f, d / 32, 16]` uint8, two 4-bit values per byte
(the low nibble first), and `gate_up_proj_scales [E, 2f, d / 32]` uint8, one
power-of-two exponent (biased by 127) per 32 values, as transformers'
`integrations/mxfp4.py` reads them. `GptOssCheckpoint` serves both as the
per-expert tensors of the other families, dequantizing one expert at a time;
`stack_expert_tensors` writes them back in the float layout.
"""

import re

import numpy as np

from keras_moe.convert import config_fields
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import SafetensorsCheckpoint
from keras_moe.convert.family import DECODER_TENSOR_NAMES
from keras_moe.convert.family import Family
from keras_moe.convert.family import moe_layer_indices

_ATTENTION = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"
# The values of the 16 FP4 (E2M1) codes, as transformers' `FP4_VALUES`.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    + [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype="float32",
)
MXFP4_BLOCK = 32
# transformers' defaults for a config.json that leaves them out.
_DEFAULT_YARN = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
_PER_EXPERT_WEIGHT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\."
    r"(?P<projection>gate_proj|up_proj|down_proj)\.weight$"
)
_EXPERT_BIAS = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<projection>gate_proj|up_proj|down_proj)_bias$"
)


def _per_expert_name(name):
    """`(match, is_bias)` for a per-expert kernel or flat bias name, else None."""
    match = _PER_EXPERT_WEIGHT.match(name)
    if match is not None:
        return match, False
    match = _EXPERT_BIAS.match(name)
    if match is not None:
        return match, True
    return None


def dequantize_mxfp4(blocks, scales):
    """MXFP4 blocks and scales to float32 values.

    Args:
        blocks: uint8 `[..., G, 16]`, two FP4 codes per byte, the low
            nibble first.
        scales: uint8 `[..., G]`, the exponent of each block of 32 values,
            biased by 127.

    Returns:
        float32 `[..., G * 32]`.

    Example:

    >>> blocks = np.array([[[0x21] + [0] * 15]], "uint8")  # codes 1, 2
    >>> scales = np.array([[128]], "uint8")  # 2 ** 1
    >>> dequantize_mxfp4(blocks, scales)[0, :3].tolist()
    [1.0, 2.0, 0.0]
    """
    blocks = np.asarray(blocks, dtype="uint8")
    scales = np.asarray(scales)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(
            "MXFP4 `blocks` must be [..., G, 16] and `scales` [..., G]. "
            f"Received: blocks {blocks.shape}, scales {scales.shape}"
        )
    values = np.stack(
        [FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1
    ).reshape(blocks.shape[:-1] + (MXFP4_BLOCK,))
    exponents = scales.astype("int32")[..., None] - 127
    values = np.ldexp(values, exponents).astype("float32")
    return values.reshape(blocks.shape[:-2] + (blocks.shape[-2] * MXFP4_BLOCK,))


def _stack_experts(kernels, num_experts):
    """`{expert: [out, in]}` -> `[E, out, in]`."""
    return np.stack([kernels[expert] for expert in range(num_experts)])


def _complete_stacks(prefix, parts, num_experts):
    """The stacked tensors of one layer's experts whose parts are all in."""
    gate_up = ("gate_proj", "up_proj", "gate_proj_bias", "up_proj_bias")
    if all(key in parts for key in gate_up) and all(
        len(parts[key]) == num_experts for key in gate_up[:2]
    ):
        # [E, out, in] per projection -> [E, in, 2 * out], gate at even.
        gate, up = (_stack_experts(parts.pop(key), num_experts) for key in gate_up[:2])
        experts, width, inputs = gate.shape
        kernel = np.empty((experts, inputs, 2 * width), gate.dtype)
        kernel[..., 0::2] = gate.transpose(0, 2, 1)
        kernel[..., 1::2] = up.transpose(0, 2, 1)
        gate_bias, up_bias = parts.pop("gate_proj_bias"), parts.pop("up_proj_bias")
        bias = np.empty((experts, 2 * width), gate_bias.dtype)
        bias[:, 0::2], bias[:, 1::2] = gate_bias, up_bias
        yield f"{prefix}.gate_up_proj", kernel
        yield f"{prefix}.gate_up_proj_bias", bias
    if (
        "down_proj_bias" in parts
        and len(parts.get("down_proj", ())) == num_experts
    ):
        down = _stack_experts(parts.pop("down_proj"), num_experts)
        yield f"{prefix}.down_proj", np.ascontiguousarray(down.transpose(0, 2, 1))
        yield f"{prefix}.down_proj_bias", parts.pop("down_proj_bias")


def stack_expert_tensors(tensors, num_experts):
    """Per-expert tensors regrouped in GPT-OSS's stacked float layout.

    The inverse of what `GptOssCheckpoint` serves: each layer's
    `...experts.{j}.gate_proj.weight` and `up_proj.weight` (`[f, d]`) and
    the flat `gate_proj_bias`, `up_proj_bias` (`[E * f]`) become
    `gate_up_proj [E, d, 2f]` and `gate_up_proj_bias [E, 2f]`, gate at
    even and up at odd columns; `down_proj.weight` (`[d, f]`) and
    `down_proj_bias` become `down_proj [E, f, d]` and `down_proj_bias
    [E, d]`. Other tensors pass through. A layer's stacks are written as
    soon as its parts are in, so at most one layer's experts wait here.

    Args:
        tensors: iterable of `(name, array)` pairs.
        num_experts: int, the number of routed experts per layer.

    Yields:
        `(name, array)` pairs in the stored layout.

    Raises:
        ConversionError: if a layer's experts lack a kernel or a bias.

    Example:

    >>> prefix = "model.layers.0.mlp.experts"
    >>> pairs = [
    ...     (f"{prefix}.{j}.{p}.weight", np.full((1, 2), 2.0 * j + (p == "up_proj")))
    ...     for p in ("gate_proj", "up_proj") for j in range(2)]
    >>> pairs += [(f"{prefix}.gate_proj_bias", np.zeros(2)),
    ...     (f"{prefix}.up_proj_bias", np.ones(2))]
    >>> stored = dict(stack_expert_tensors(pairs, num_experts=2))
    >>> stored[f"{prefix}.gate_up_proj"][1].tolist()
    [[2.0, 3.0], [2.0, 3.0]]
    >>> stored[f"{prefix}.gate_up_proj_bias"].tolist()
    [[0.0, 1.0], [0.0, 1.0]]
    """
    pending = {}
    for name, tensor in tensors:
        served = _per_expert_name(name)
        if served is None:
            yield name, tensor
            continue
        match, is_bias = served
        parts = pending.setdefault(match["prefix"], {})
        if is_bias:
            parts[f"{match['projection']}_bias"] = tensor.reshape(num_experts, -1)
        else:
            parts.setdefault(match["projection"], {})[int(match["expert"])] = tensor
        yield from _complete_stacks(match["prefix"], parts, num_experts)
    incomplete = sorted(prefix for prefix, parts in pending.items() if parts)
    if incomplete:
        raise ConversionError(
            "GPT-OSS stores every expert's gate, up and down kernels and "
            f"biases; {incomplete[0]} lacks some of them (has "
            f"{sorted(pending[incomplete[0]])})."
        )


class GptOssCheckpoint(SafetensorsCheckpoint):
    """A GPT-OSS checkpoint, its stacked experts read one expert at a time.

    Besides the stored tensors, it serves the names the weight mapping asks
    for: `...mlp.experts.{j}.gate_proj.weight` (and `up_proj`,
    `down_proj`), one expert's `[out, in]` kernel, taken from the stacked
    `gate_up_proj`/`down_proj` (gate and up de-interleaved) or dequantized
    from their MXFP4 `_blocks` and `_scales`; and `...mlp.experts.gate_proj_bias`
    (and `up_proj_bias`, `down_proj_bias`), every expert's bias flattened.

    Args:
        directory: the checkpoint directory.

    Example:

    >>> import pathlib, tempfile
    >>> from safetensors.numpy import save_file
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> gate_up = np.arange(2 * 3 * 4, dtype="float32").reshape(2, 3, 4)
    >>> save_file({"model.layers.0.mlp.experts.gate_up_proj": gate_up},
    ...     directory / "model.safetensors")
    >>> checkpoint = GptOssCheckpoint(directory)
    >>> checkpoint.get("model.layers.0.mlp.experts.1.up_proj.weight").tolist()
    [[13.0, 17.0, 21.0], [15.0, 19.0, 23.0]]
    """

    def _stored(self, prefix, projection):
        """`(name, blocks name or None)` of a stacked projection, or None."""
        name = "down_proj" if projection == "down_proj" else "gate_up_proj"
        stacked = f"{prefix}.{name}"
        if f"{stacked}_blocks" in self._weight_map:
            return f"{stacked}_scales", f"{stacked}_blocks"
        if stacked in self._weight_map:
            return stacked, None
        return None

    def _expert_tensor(self, name):
        """`(match, is_bias)` for a served expert name, else None."""
        return _per_expert_name(name)

    def _bias_name(self, match):
        stacked = "down_proj" if match["projection"] == "down_proj" else "gate_up_proj"
        return f"{match['prefix']}.{stacked}_bias"

    def __contains__(self, name):
        served = self._expert_tensor(name)
        if served is None:
            return super().__contains__(name)
        match, is_bias = served
        if is_bias:
            return self._bias_name(match) in self._weight_map
        return self._stored(match["prefix"], match["projection"]) is not None

    def _read(self, name, index=None):
        self.read_names.add(name)
        file = self._open(self._weight_map[name])
        return file.read(name, index)

    def shape(self, name):
        served = self._expert_tensor(name)
        if served is None:
            return super().shape(name)
        match, is_bias = served
        if is_bias:
            experts, width = self._shape_of(self._bias_name(match))
            if match["projection"] != "down_proj":
                width //= 2
            return (experts * width,)
        stored, blocks = self._stored(match["prefix"], match["projection"])
        if blocks is not None:
            _, rows, groups, _ = self._shape_of(blocks)
            outputs, inputs = rows, groups * MXFP4_BLOCK
        else:
            _, inputs, outputs = self._shape_of(stored)
        if match["projection"] != "down_proj":
            outputs //= 2
        return (outputs, inputs)

    def dtype(self, name):
        served = self._expert_tensor(name)
        if served is None:
            return super().dtype(name)
        match, is_bias = served
        if is_bias:
            return self._info(self._bias_name(match)).dtype
        stored, blocks = self._stored(match["prefix"], match["projection"])
        return np.dtype("float32") if blocks is not None else self._info(stored).dtype

    def get(self, name):
        served = self._expert_tensor(name)
        if served is None:
            return super().get(name)
        match, is_bias = served
        projection = match["projection"]
        # Gate values are the even columns of `gate_up`, up values the odd.
        half = {"gate_proj": slice(0, None, 2), "up_proj": slice(1, None, 2)}
        if is_bias:
            bias = self._read(self._bias_name(match))
            if projection != "down_proj":
                bias = bias[:, half[projection]]
            return np.ascontiguousarray(bias).reshape(-1)
        expert = int(match["expert"])
        stored, blocks = self._stored(match["prefix"], projection)
        if blocks is not None:
            # [out, in] as stored: one expert's blocks are a few MB.
            kernel = dequantize_mxfp4(
                self._read(blocks, expert), self._read(stored, expert)
            )
        else:
            kernel = self._read(stored, expert).T  # [in, out] -> [out, in]
        if projection != "down_proj":
            kernel = kernel[half[projection]]
        return np.ascontiguousarray(kernel)

    def num_elements(self):
        """The number of values once dequantized, from the file headers."""
        total = 0
        for name in self._weight_map:
            size = self._info(name).size
            if name.endswith("_blocks"):
                total += size * 2  # two values per byte
            elif not name.endswith("_scales"):
                total += size
        return total

    def largest_variable_size(self):
        """The values of the largest variable (one projection's experts)."""
        sizes = [0]
        for name in self._weight_map:
            size = self._info(name).size
            if name.endswith("_scales"):
                continue
            if name.endswith("_blocks"):
                size *= 2
            if ".experts.gate_up_proj" in name:
                size //= 2
            sizes.append(size)
        return max(sizes)


class GptOss(Family):
    """gpt-oss-20b, gpt-oss-120b and their fine-tunes (written in float).

    Example:

    >>> config = GptOss().backbone_config({
    ...     "model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 8,
    ...     "num_local_experts": 4, "num_experts_per_tok": 2,
    ...     "sliding_window": 8})
    >>> config["attention_layer_types"], config["rope_scaling"]["factor"]
    (['sliding_attention', 'full_attention'], 32.0)
    """

    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    rope_theta = 150000.0
    yarn = True
    dequantized_methods = ("mxfp4",)
    expert_biases = True
    attention_options = (
        "sliding_window",
        "attention_layer_types",
        "attention_sinks",
        "attention_output_bias",
        "swiglu_alpha",
        "swiglu_limit",
    )
    tensor_names = {
        **DECODER_TENSOR_NAMES,
        "attention/query/bias": f"{_ATTENTION}.q_proj.bias",
        "attention/key/bias": f"{_ATTENTION}.k_proj.bias",
        "attention/value/bias": f"{_ATTENTION}.v_proj.bias",
        "attention/attention_output/bias": f"{_ATTENTION}.o_proj.bias",
        "attention/sinks": f"{_ATTENTION}.sinks",
        "moe/router/kernel": f"{_MLP}.router.weight",
        "moe/router/bias": f"{_MLP}.router.bias",
        "moe/experts/gate_bias": f"{_MLP}.experts.gate_proj_bias",
        "moe/experts/up_bias": f"{_MLP}.experts.up_proj_bias",
        "moe/experts/down_bias": f"{_MLP}.experts.down_proj_bias",
    }

    def open_checkpoint(self, directory):
        return GptOssCheckpoint(directory)

    def attention_window(self, hf_config):
        num_layers = config_fields.int_field(hf_config, "num_hidden_layers")
        window = config_fields.sliding_window({"sliding_window": 128, **hf_config})
        layer_types = hf_config.get("layer_types")
        if layer_types is None:
            layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(num_layers)
            ]
        if window is None or "sliding_attention" not in layer_types:
            return dict(sliding_window=None, attention_layer_types=None)
        return dict(sliding_window=window, attention_layer_types=list(layer_types))

    def backbone_config(self, hf_config):
        field, int_field = config_fields.field, config_fields.int_field
        if "rope_scaling" not in hf_config and "rope_parameters" not in hf_config:
            hf_config = dict(hf_config, rope_scaling=_DEFAULT_YARN)
        config = self.decoder_config(hf_config)
        attention_bias = bool(field(hf_config, "attention_bias", True))
        config.update(
            num_key_value_heads=field(hf_config, "num_key_value_heads"),
            head_dim=int_field(hf_config, "head_dim", 64),
            layer_norm_epsilon=float(field(hf_config, "rms_norm_eps", 1e-5)),
            attention_bias=attention_bias,
            attention_output_bias=attention_bias,
            attention_sinks=True,
            num_experts=config_fields.num_experts({"num_local_experts": 128, **hf_config}),
            top_k=int_field(hf_config, "num_experts_per_tok", 4),
            moe_intermediate_dim=int_field(hf_config, "intermediate_size", 2880),
            swiglu_alpha=float(field(hf_config, "swiglu_alpha", 1.702)),
            swiglu_limit=float(field(hf_config, "swiglu_limit", 7.0)),
            moe_options=dict(
                capacity_factor=None,
                normalize_top_k=True,
                use_bias=True,
                router_bias=True,
                aux_loss_weight=float(
                    field(hf_config, "router_aux_loss_coef", 0.001)
                ),
            ),
        )
        return config

    def describes(self, backbone, moe):
        return (
            backbone.attention_type == self.attention_type
            and self.distinctive_feature(backbone, moe) == "attention_sinks"
        )

    def check_exportable(self, backbone, moe):
        if len(moe_layer_indices(backbone)) != backbone.num_layers:
            self.refuse("every GPT-OSS layer is a MoE layer.")
        if not backbone.attention_sinks:
            self.refuse(
                "GPT-OSS attention has a learned sink per head (attention_sinks)."
            )
        if backbone.attention_bias != backbone.attention_output_bias:
            self.refuse(
                "GPT-OSS has biases on all four attention projections or none "
                "(attention_bias == attention_output_bias)."
            )
        if backbone.use_qk_norm or backbone.num_shared_experts:
            self.refuse("GPT-OSS has no q/k norm and no shared experts.")
        if backbone.swiglu_alpha is None or backbone.swiglu_limit is None:
            self.refuse(
                "GPT-OSS experts compute a clamped SwiGLU (set swiglu_alpha "
                "and swiglu_limit)."
            )
        if not moe["router_bias"]:
            self.refuse("GPT-OSS routers have a bias (router_bias).")
        if moe["expert_groups"] != 1 or moe["bias_update_rate"] > 0:
            self.refuse("GPT-OSS routers have no expert groups or balancing bias.")
        if moe["routed_scaling_factor"] != 1.0 or not moe["normalize_top_k"]:
            self.refuse(
                "GPT-OSS weighs the top-k experts by a softmax over their "
                "logits (normalize_top_k=True, routed_scaling_factor=1)."
            )

    def export_config(self, backbone, moe):
        num_layers = backbone.num_layers
        layer_types = backbone.attention_layer_types
        if backbone.sliding_window is None:
            layer_types = ["full_attention"] * num_layers
        elif layer_types is None:
            layer_types = ["sliding_attention"] * num_layers
        # transformers' GptOssConfig reads a missing RoPE field as YaRN, so
        # plain RoPE is written out.
        scaling = {"rope_type": "default"}
        config = {}
        if backbone.rope_scaling is not None:
            scaling = {
                key: value
                for key, value in backbone.rope_scaling.items()
                if value is not None
            }
            config["max_position_embeddings"] = int(
                scaling["factor"] * scaling["original_max_position_embeddings"]
            )
        head_dim = backbone.head_dim or backbone.hidden_dim // backbone.num_query_heads
        config.update(
            head_dim=head_dim,
            intermediate_size=backbone.moe_intermediate_dim,
            num_local_experts=backbone.num_experts,
            sliding_window=backbone.sliding_window,
            layer_types=list(layer_types),
            attention_bias=bool(backbone.attention_bias),
            swiglu_alpha=backbone.swiglu_alpha,
            swiglu_limit=backbone.swiglu_limit,
            router_aux_loss_coef=moe["aux_loss_weight"],
            rope_scaling=scaling,
            rope_parameters={**scaling, "rope_theta": backbone.rope_max_wavelength},
        )
        return config

    def stored_tensors(self, backbone, tensors):
        # Written in float: the MXFP4 of released checkpoints would round.
        return stack_expert_tensors(tensors, backbone.num_experts)


FAMILIES = (GptOss(),)
