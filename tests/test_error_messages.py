"""Every `ValueError` the package raises is asserted by some test, and the
errors no other test file triggers are asserted here.

The audit: for each `raise ValueError(...)` (or `ConversionError`) in
`keras_moe/`, the literal pieces of its message (the text between the
f-string's placeholders) are read from the source. The message counts as
asserted when some string literal of the tests holds a 12-character stretch
of one of its pieces. A regex literal is read with its escapes removed and
split at `.*`. Messages whose pieces are all shorter are the argument
checks' shared templates (`` `name` must be ... ``), asserted through their
callers.
"""

import ast
import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import presets
from keras_moe.layers import Experts
from keras_moe.layers import FeedForward
from keras_moe.layers import SparseMoE
from testing import backend_independent

REPO_ROOT = Path(__file__).resolve().parent.parent
ERROR_TYPES = {"ValueError", "ConversionError"}  # ConversionError is a ValueError
MIN_PIECE = 12


def literal_pieces(node):
    """The literal text of a message expression, split at its placeholders."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        pieces = [""]
        for part in node.values:
            if isinstance(part, ast.Constant):
                pieces[-1] += part.value
            else:
                pieces.append("")
        return pieces
    if isinstance(node, ast.BinOp):  # "..." + "...", "..." % values
        return literal_pieces(node.left) + literal_pieces(node.right)
    return []


def messages_by_name(tree):
    """Pieces of the strings assigned to a name or returned by a function,
    for `raise ValueError(message)` and `raise ValueError(helper(...))`."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found.setdefault(node.targets[0].id, []).extend(literal_pieces(node.value))
        elif isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and inner.value is not None:
                    found.setdefault(node.name, []).extend(literal_pieces(inner.value))
    return found


def value_error_messages():
    """`{file:line: [long literal pieces]}` of every ValueError raised."""
    messages = {}
    for source_file in sorted((REPO_ROOT / "keras_moe").rglob("*.py")):
        tree = ast.parse(source_file.read_text())
        named = messages_by_name(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            error = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", None))
            if error not in ERROR_TYPES or not node.exc.args:
                continue
            message = node.exc.args[0]
            if isinstance(message, ast.Call):  # a helper that builds the text
                message = message.func
            if isinstance(message, ast.Name):
                pieces = named.get(message.id, [])
            else:
                pieces = literal_pieces(message)
            where = f"{source_file.relative_to(REPO_ROOT)}:{node.lineno}"
            messages[where] = [p.strip() for p in pieces if len(p.strip()) >= MIN_PIECE]
    return messages


def asserted_texts():
    """Every string literal of the tests, regex escapes removed, split at `.*`."""
    literals = set()
    for test_file in (REPO_ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(test_file.read_text())):
            if isinstance(node, (ast.Constant, ast.JoinedStr)):
                for piece in literal_pieces(node):
                    for text in re.split(r"\.\*\??|\.\+", piece):
                        literals.add(re.sub(r"\\(.)", r"\1", text).strip())
    return [text for text in literals if len(text) >= MIN_PIECE]


@backend_independent
def test_every_value_error_message_is_asserted_by_a_test():
    asserted = "\n".join(asserted_texts())
    messages = value_error_messages()
    assert len(messages) > 50  # the scan sees the package's validation
    missing = [
        where
        for where, pieces in messages.items()
        if pieces and not any(
            piece[start : start + MIN_PIECE] in asserted
            for piece in pieces
            for start in range(len(piece) - MIN_PIECE + 1)
        )
    ]
    assert not missing, (
        "ValueError messages that no test asserts (add a test with "
        "`pytest.raises(ValueError, match=...)`):\n" + "\n".join(missing)
    )


# The ValueErrors no other test file triggers. Each case builds the
# offending call and names the wording the message must contain.

MIXTRAL_HF = {
    "model_type": "mixtral", "vocab_size": 64, "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
}


def _hf(**changes):
    config = dict(MIXTRAL_HF, **changes)
    return {key: value for key, value in config.items() if value is not None}


def _write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory


def _tokenizer_file(directory):
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models

    tokenizer = Tokenizer(tokenizer_models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def _registry(directory, name, record):
    from keras_moe.presets import preset_registry

    _write(directory, f"{name}.json", record if isinstance(record, str) else json.dumps(record))
    preset_registry._records_in.cache_clear()
    return preset_registry._records_in(str(directory))


def _tiny_mixtral(**overrides):
    return presets.load(
        "mixtral_small", preprocessor=None, num_layers=1, hidden_dim=16,
        num_query_heads=2, num_key_value_heads=1, moe_intermediate_dim=8,
        vocabulary_size=64, **overrides,
    )


def _gqa(**kwargs):
    from keras_moe.models.grouped_query_attention import GroupedQueryAttention

    return GroupedQueryAttention(2, **kwargs)


def _mla(**kwargs):
    from keras_moe.models.multi_head_latent_attention import MultiHeadLatentAttention

    return MultiHeadLatentAttention(2, 8, 4, 4, 4, **kwargs)


def _backbone(**overrides):
    from keras_moe.models import MoEBackbone

    config = dict(vocabulary_size=16, num_layers=2, hidden_dim=8, num_query_heads=2,
                  num_experts=2, top_k=1, moe_intermediate_dim=4)
    return MoEBackbone(**dict(config, **overrides))


def _families(config):
    return keras_moe.convert.backbone_config_from_transformers(config)


def _checkpoint(directory):
    from keras_moe.convert.checkpoint import SafetensorsCheckpoint

    return SafetensorsCheckpoint(directory)


def _router_stats_callback(**kwargs):
    from keras_moe.callbacks import RouterStats

    callback = RouterStats(**kwargs)
    callback.set_model(keras.Sequential([keras.Input((5, 4)), SparseMoE(2, 4)]))
    callback.on_train_begin()
    return callback


def _mismatched_checkpoint(directory):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    keras_moe.convert.to_transformers(_tiny_mixtral(), directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:4]
    save_file(tensors, path, {"format": "pt"})
    return keras_moe.convert.from_transformers(directory, preprocessor=None)


VALUE_ERROR_CASES = {
    "checkpoint_shape_mismatch": (
        _mismatched_checkpoint,
        "does not match its config.json: `model.layers.0.self_attn.k_proj.weight` has shape",
    ),
    "heatmap_loads": (
        lambda tmp: keras_moe.callbacks.render_load_heatmap([]),
        "`loads` must be a non-empty sequence of non-empty 1-D arrays",
    ),
    "heatmap_vmax": (
        lambda tmp: keras_moe.callbacks.render_load_heatmap([np.ones(4) / 4], vmax=0),
        "`vmax` must be a positive number. Received: vmax=0",
    ),
    "router_stats_log_dir_unwritable": (
        lambda tmp: _router_stats_callback(log_dir=str(_write(tmp, "file", "x") / "file")),
        "`log_dir` must be a directory that can be created and written to",
    ),
    "router_stats_log_dir_empty": (
        lambda tmp: _router_stats_callback(log_dir=""),
        "`log_dir` must be a non-empty path. Received: log_dir=''",
    ),
    "router_stats_run_name": (
        lambda tmp: _router_stats_callback(log_dir=str(tmp), run_name=""),
        "`run_name` must be a non-empty string. Received: run_name=''",
    ),
    "router_stats_metric_kind": (
        lambda tmp: keras_moe.metrics.RouterStatsMetric("dense"),
        "`kind` must be one of 'routed', 'soft'. Received: kind='dense'",
    ),
    "checkpoint_config_not_json": (
        lambda tmp: keras_moe.convert.checkpoint.read_config(_write(tmp, "config.json", "{")),
        "config.json is not valid JSON: ",
    ),
    "checkpoint_config_not_object": (
        lambda tmp: keras_moe.convert.checkpoint.read_config(_write(tmp, "config.json", "[1]")),
        "config.json must hold a JSON object.",
    ),
    "checkpoint_index_not_json": (
        lambda tmp: _checkpoint(_write(tmp, "model.safetensors.index.json", "{")),
        "model.safetensors.index.json is not valid JSON: ",
    ),
    "checkpoint_index_without_weight_map": (
        lambda tmp: _checkpoint(_write(tmp, "model.safetensors.index.json", "{}")),
        "has no `weight_map` (tensor name -> shard file).",
    ),
    "checkpoint_index_missing_shard": (
        lambda tmp: _checkpoint(_write(
            tmp, "model.safetensors.index.json",
            json.dumps({"weight_map": {"w": "model-00001.safetensors"}}),
        )),
        "is missing model-00001.safetensors, listed in model.safetensors.index.json.",
    ),
    "export_refused": (
        lambda tmp: keras_moe.convert.to_transformers(_tiny_mixtral(ffn_gated=False), tmp),
        "This model cannot be written as a 'mixtral' checkpoint: its feed-forward",
    ),
    "export_unmapped_weights": (
        lambda tmp: keras_moe.convert.to_transformers(
            _tiny_mixtral(moe_options={"noisy_gating": True}), tmp
        ),
        "mixtral checkpoints have no tensor for these weights: "
        "decoder_block_0/moe/router/noise_kernel",
    ),
    "hf_no_experts": (
        lambda tmp: _families(_hf(num_local_experts=None)),
        "config.json gives no number of experts (`num_experts`, `num_local_experts`",
    ),
    "hf_missing_field": (
        lambda tmp: _families(_hf(hidden_size=None)),
        "config.json has no `hidden_size`, which model_type='mixtral' needs.",
    ),
    "hf_integer_field": (
        lambda tmp: _families(_hf(hidden_size=16.5)),
        "config.json field `hidden_size` must be an integer. Received: hidden_size=16.5",
    ),
    "hf_rope_type": (
        lambda tmp: _families(_hf(rope_scaling={"rope_type": "linear", "factor": 2.0})),
        "config.json field `rope_scaling` asks for rope_type='linear'; keras-moe converts",
    ),
    "hf_yarn_field": (
        lambda tmp: _families(dict(
            _hf(model_type="deepseek_v3"),
            rope_scaling={"rope_type": "yarn", "factor": -2.0},
        )),
        "config.json field `rope_scaling`: ",
    ),
    "hf_activation": (
        lambda tmp: _families(_hf(hidden_act="tanh")),
        "config.json field `hidden_act`='tanh' is not supported; supported: gelu, relu",
    ),
    "hf_handle": (
        lambda tmp: keras_moe.convert.hub.parse_handle("hf://just-a-name"),
        "A Hugging Face handle is `hf://org/name` (optionally `@revision`)",
    ),
    "hf_overrides": (
        lambda tmp: keras_moe.convert.from_transformers(
            _write(tmp, "config.json", json.dumps(MIXTRAL_HF)), num_layers=3
        ),
        "cannot be applied to a Hugging Face checkpoint: its config and weights fix",
    ),
    "hf_moe_options": (
        lambda tmp: keras_moe.convert.loading._apply_overrides(
            {"moe_options": {}}, {"moe_options": 1}
        ),
        "`moe_options` must be a dict. Received: moe_options=1",
    ),
    "tokenizer_special_token": (
        lambda tmp: keras_moe.convert.HuggingFaceTokenizer(
            _tokenizer_file(tmp), end_token="</s>"
        ),
        "The special token `end_token`='</s>' is not in the vocabulary of",
    ),
    "tokenizer_id": (
        lambda tmp: keras_moe.convert.HuggingFaceTokenizer(_tokenizer_file(tmp)).id_to_token(7),
        "`id` must be in [0, 1]. Received: 7",
    ),
    "tokenizer_token": (
        lambda tmp: keras_moe.convert.HuggingFaceTokenizer(_tokenizer_file(tmp)).token_to_id("zz"),
        "Token 'zz' is not in the vocabulary.",
    ),
    "byte_lm_text": (
        lambda tmp: keras_moe.datasets.byte_lm_arrays(3, 8),
        "`text` must be a str or bytes. Received: text of type int",
    ),
    "activation_name": (
        lambda tmp: Experts(2, 4, activation="swishy"),
        "`activation` must be the name of a Keras activation (for example 'silu'",
    ),
    "gqa_odd_head_dim": (
        lambda tmp: _gqa(head_dim=5),
        "`head_dim` must be even (RoPE rotates pairs of features). Received: head_dim=5",
    ),
    "gqa_dropout": (lambda tmp: _gqa(dropout=1.0), "`dropout` must be in [0, 1). Received: dropout=1.0"),
    "gqa_input_rank": (
        lambda tmp: _gqa()(np.zeros((2, 8), "float32")),
        "`GroupedQueryAttention` expects inputs [batch, length, hidden_dim]",
    ),
    "gqa_cache_index": (
        lambda tmp: _gqa()(np.zeros((1, 2, 8), "float32"), cache_update_index=0),
        "`cache_update_index` is only meaningful with a `cache`. Received: cache_update_index=0",
    ),
    "mla_dropout": (lambda tmp: _mla(dropout=1.5), "`dropout` must be in [0, 1). Received: dropout=1.5"),
    "mla_input_rank": (
        lambda tmp: _mla()(np.zeros((2, 8), "float32")),
        "`MultiHeadLatentAttention` expects inputs [batch, length, hidden_dim]",
    ),
    "mla_cache_index": (
        lambda tmp: _mla()(np.zeros((1, 2, 8), "float32"), cache_update_index=1),
        "`cache_update_index` is only meaningful with a `cache`. Received: cache_update_index=1",
    ),
    "decoder_block_attention": (
        lambda tmp: keras_moe.models.MoEDecoderBlock("attention", FeedForward(4)),
        "`attention` must be a Keras layer. Received: attention='attention'",
    ),
    "decoder_block_feedforward": (
        lambda tmp: keras_moe.models.MoEDecoderBlock(_gqa(), None),
        "`feedforward` must be a Keras layer. Received: feedforward=None",
    ),
    "decoder_block_dropout": (
        lambda tmp: keras_moe.models.MoEDecoderBlock(_gqa(), FeedForward(4), dropout=2.0),
        "`dropout` must be in [0, 1). Received: dropout=2.0",
    ),
    "backbone_moe_options_type": (
        lambda tmp: _backbone(moe_options=[("top_k", 2)]),
        "`moe_options` must be a dict of MoE layer arguments or None",
    ),
    "backbone_moe_options_reserved": (
        lambda tmp: _backbone(moe_options={"num_experts": 4}),
        "`moe_options` cannot set ['num_experts']: the backbone sets them",
    ),
    "backbone_moe_options_unknown": (
        lambda tmp: _backbone(moe_options={"capacity_factr": 1.0}),
        "Unknown `moe_options` key 'capacity_factr': `moe_options` holds "
        "`SparseMoE` arguments. 'capacity_factr': did you mean 'capacity_factor'",
    ),
    "backbone_dropout": (lambda tmp: _backbone(dropout=1.0), "`dropout` must be in [0, 1). Received: dropout=1.0"),
    "backbone_moe_layers_range": (
        lambda tmp: _backbone(moe_layers=[0, 2]),
        "`moe_layers` must be None or a list of layer indices in [0, num_layers=2)",
    ),
    "backbone_moe_layers_repeated": (
        lambda tmp: _backbone(moe_layers=[1, 1]),
        "`moe_layers` lists a layer more than once. Received: moe_layers=[1, 1]",
    ),
    "load_check_memory": (
        lambda tmp: presets.load("mixtral_small", check_memory="no"),
        "`check_memory` must be True or False. Received: check_memory='no'",
    ),
    "load_unknown_overrides": (
        lambda tmp: presets.load("mixtral_small", num_layer=2, hiden_dim=8),
        "Unknown overrides 'num_layer', 'hiden_dim' for preset 'mixtral_small': "
        "overrides must be `MoEBackbone` config keys.",
    ),
    "load_moe_options": (
        lambda tmp: presets.load("mixtral_small", moe_options=[1]),
        "`moe_options` must be a dict or None. Received: moe_options=[1]",
    ),
    "load_directory_overrides": (
        lambda tmp: presets.load(_write(tmp, "config.json", "{}"), num_layers=1),
        "cannot be applied to the saved preset",
    ),
    "load_directory_bad_json": (
        lambda tmp: presets.load(_write(tmp, "config.json", "{")),
        "config.json is not valid JSON: ",
    ),
    "load_directory_not_a_preset": (
        lambda tmp: presets.load(_write(tmp, "config.json", "{}")),
        "is not a keras-hub preset config (a serialized `MoEBackbone`",
    ),
    "dtype_size": (
        lambda tmp: keras_moe.models.memory.bytes_per_parameter("float"),
        "Cannot tell the size of dtype 'float'.",
    ),
    "count_params_argument": (
        lambda tmp: presets.count_params(3),
        "`name_or_config` must be a preset name or a config dict. Received: int",
    ),
    "count_params_moe_options": (
        lambda tmp: presets.count_params(dict(presets.config("mixtral_small"), moe_options=[1])),
        "`moe_options` must be a dict or None. Received: moe_options=[1]",
    ),
    "count_params_moe_layers": (
        lambda tmp: presets.count_params(dict(presets.config("mixtral_small"), moe_layers=3)),
        "`moe_layers` must be None or a list of layer indices. Received: moe_layers=3",
    ),
    "count_params_missing_key": (
        lambda tmp: presets.count_params({"num_layers": 2}),
        "The config has no `vocabulary_size`, which the parameter count needs.",
    ),
    "registry_bad_json": (
        lambda tmp: _registry(tmp, "broken", "{"),
        "broken.json is not valid JSON: ",
    ),
    "registry_not_object": (
        lambda tmp: _registry(tmp, "listed", [1]),
        "listed.json must hold a JSON object.",
    ),
    "registry_missing_entries": (
        lambda tmp: _registry(tmp, "partial", {"name": "partial"}),
        "partial.json lacks the entries ['description', 'reference', 'backbone'].",
    ),
    "registry_wrong_name": (
        lambda tmp: _registry(tmp, "one", {"name": "two", "description": "", "reference": "", "backbone": {}}),
        "one.json names itself 'two'; a preset's name must be its file name",
    ),
    "registry_backbone": (
        lambda tmp: _registry(tmp, "flat", {"name": "flat", "description": "", "reference": "", "backbone": 1}),
        "The `backbone` entry of ",
    ),
    "argument_float": (
        lambda tmp: SparseMoE(4, 4, capacity_factor=float("nan")),
        "`capacity_factor` must be a positive number or None. Received: capacity_factor=nan",
    ),
    "argument_negative": (
        lambda tmp: SparseMoE(4, 4, z_loss_weight=-1.0),
        "`z_loss_weight` must be a non-negative number. Received: z_loss_weight=-1.0",
    ),
    "argument_int": (
        lambda tmp: SparseMoE(0, 4),
        "`num_experts` must be an integer >= 1. Received: num_experts=0",
    ),
}


@backend_independent
@pytest.mark.parametrize("case", sorted(VALUE_ERROR_CASES))
def test_value_error_messages(case, tmp_path):
    build, expected = VALUE_ERROR_CASES[case]
    with pytest.raises(ValueError) as error:
        build(tmp_path)
    assert expected in str(error.value)
