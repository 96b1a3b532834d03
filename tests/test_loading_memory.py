"""Loading weights needs the model's memory, not a multiple of it.

Each measurement runs in a fresh process (peak resident memory is
per-process): a Mixtral-family Hugging Face checkpoint of about 30 MB in
bfloat16 is converted under `dtype="bfloat16"` twice (the first conversion
warms up imports and backend caches), and the growth of the peak resident
set size over the second one (`VmHWM`, reset through
`/proc/self/clear_refs`) is compared with the bytes of the model's
variables. The same process then saves the weights to `.weights.h5` and
loads them back into the model, whose peak memory must barely grow: the
file is checked by a verification pass, not guarded by a copy of every
variable.

Before streaming, conversion staged bfloat16 tensors in float32, kept the
whole checkpoint resident through a memory map, and drew a random initial
value for every weight it then overwrote (growth above 2x the model), and
`load_weights` copied every variable to the host (growth above 1x).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_moe import presets
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import SafetensorsCheckpoint
from keras_moe.models import memory
from keras_moe.utils import weights_loading

safetensors_numpy = pytest.importorskip("safetensors.numpy")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="needs Linux /proc to measure peak memory",
)

# About 30 MB of bfloat16 weights in 4 layers of 8 experts: the largest
# variable (a stacked expert kernel) is 7% of the model.
SIZES = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=8,
)
CONVERT_GROWTH_BOUND = 1.3
LOAD_WEIGHTS_GROWTH_BOUND = 0.5
ESTIMATE_TOLERANCE = 0.10


def mixtral_config(sizes):
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        **sizes, "num_experts_per_tok": 2,
        "head_dim": sizes["hidden_size"] // sizes["num_attention_heads"],
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def mixtral_tensors(config, seed=0):
    """Random bfloat16 tensors of a Mixtral checkpoint."""
    rng = np.random.default_rng(seed)
    d, f = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], d),
        "model.norm.weight": (d,),
        "lm_head.weight": (config["vocab_size"], d),
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        moe = f"{prefix}.block_sparse_moe"
        shapes[f"{prefix}.input_layernorm.weight"] = (d,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (d,)
        q = config["num_attention_heads"] * head_dim
        kv = config["num_key_value_heads"] * head_dim
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q, d)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv, d)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv, d)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (d, q)
        shapes[f"{moe}.gate.weight"] = (config["num_local_experts"], d)
        for expert in range(config["num_local_experts"]):
            shapes[f"{moe}.experts.{expert}.w1.weight"] = (f, d)
            shapes[f"{moe}.experts.{expert}.w3.weight"] = (f, d)
            shapes[f"{moe}.experts.{expert}.w2.weight"] = (d, f)
    return {
        name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(
            ml_dtypes.bfloat16
        )
        for name, shape in shapes.items()
    }


def write_checkpoint(directory, sizes=SIZES, seed=0):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = mixtral_config(sizes)
    (directory / "config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(
        mixtral_tensors(config, seed), directory / "model.safetensors",
        {"format": "pt"},
    )
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bf16_checkpoint"))


WORKER = textwrap.dedent(
    """
    import gc, json, sys
    import keras
    import numpy as np
    from keras_moe import presets
    from keras_moe.convert.checkpoint import SafetensorsCheckpoint
    from keras_moe.convert.registry import lookup
    from keras_moe.models.memory import loading_memory_bytes

    def kib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    def growth(run):
        gc.collect()
        before = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM restarts from VmRSS.
        result = run()
        return (kib("VmHWM") - before) * 1024, result

    directory, weights_file = sys.argv[1], sys.argv[2]
    load = lambda: presets.load(directory, preprocessor=None, dtype="bfloat16")
    warm = load()  # Warm-up (imports, backend caches), kept: its freed
    # memory would be reused by the measured load.
    convert_growth, model = growth(load)
    model_bytes = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        if v.dtype != "bfloat16" else int(np.prod(v.shape)) * 2
        for v in model.weights
    )
    family = lookup("mixtral")
    checkpoint = SafetensorsCheckpoint(
        directory, aliases=family.checkpoint_aliases,
        expert_projections=family.expert_projections)
    estimate = loading_memory_bytes(
        checkpoint.num_elements(), "bfloat16",
        largest_params=checkpoint.largest_variable_size())
    checkpoint.close()
    model.save_weights(weights_file)
    load_weights_growth, _ = growth(lambda: model.load_weights(weights_file))
    print("RESULT " + json.dumps(dict(
        model_bytes=model_bytes, convert_growth=convert_growth,
        estimate=estimate, load_weights_growth=load_weights_growth)))
    """
)


@pytest.fixture(scope="module")
def measured(checkpoint, tmp_path_factory):
    weights_file = tmp_path_factory.mktemp("weights") / "model.weights.h5"
    # Large buffers mmapped, so that freed ones leave the resident set
    # instead of waiting in malloc's heap for the next measurement.
    env = {
        **os.environ, "KERAS_BACKEND": keras.backend.backend(),
        "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
    }
    completed = subprocess.run(
        [sys.executable, "-c", WORKER, str(checkpoint), str(weights_file)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = [
        line for line in completed.stdout.splitlines()
        if line.startswith("RESULT ")
    ][-1]
    return json.loads(line[len("RESULT "):])


def test_converting_a_bfloat16_checkpoint_grows_memory_by_the_model_only(measured):
    ratio = measured["convert_growth"] / measured["model_bytes"]
    assert ratio <= CONVERT_GROWTH_BOUND, measured


def test_memory_guard_estimate_matches_the_measured_growth(measured):
    error = measured["estimate"] / measured["convert_growth"] - 1
    assert abs(error) <= ESTIMATE_TOLERANCE, measured


def test_load_weights_keeps_no_copy_of_the_model(measured):
    ratio = measured["load_weights_growth"] / measured["model_bytes"]
    assert ratio <= LOAD_WEIGHTS_GROWTH_BOUND, measured


# --- Without measuring: what loading does and does not do ---------------------


def test_bfloat16_tensors_arrive_bit_exact_without_float32(checkpoint):
    model = presets.load(checkpoint, preprocessor=None, dtype="bfloat16")
    embeddings = model.backbone.token_embedding.embeddings
    assert keras.backend.standardize_dtype(embeddings.dtype) == "bfloat16"
    expected = safetensors_numpy.load_file(checkpoint / "model.safetensors")
    loaded = keras.ops.convert_to_numpy(keras.ops.cast(embeddings, "float32"))
    np.testing.assert_array_equal(
        loaded, expected["model.embed_tokens.weight"].astype(np.float32)
    )
    experts = model.backbone.transformer_layers[1].feedforward.experts
    gate = keras.ops.convert_to_numpy(keras.ops.cast(experts.gate_kernel, "float32"))
    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    np.testing.assert_array_equal(gate[3], expected[name].astype(np.float32).T)


def test_checkpoint_reads_tensors_in_their_stored_dtype(checkpoint):
    opened = SafetensorsCheckpoint(checkpoint)
    try:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert opened.dtype(name) == ml_dtypes.bfloat16
        assert opened.get(name).dtype == ml_dtypes.bfloat16
        assert opened.largest_variable_size() == 8 * 512 * 256
    finally:
        opened.close()


def test_truncated_checkpoint_is_refused_before_building(checkpoint, tmp_path, monkeypatch):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    data = (checkpoint / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) - 1000])
    from keras_moe import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for a truncated checkpoint")

    monkeypatch.setattr(models, "MoEBackbone", refuse)
    with pytest.raises(ConversionError, match="model.safetensors.*truncated"):
        presets.load(damaged, preprocessor=None, dtype="bfloat16")


def test_load_weights_copies_no_variable_when_the_file_is_sound(tmp_path, monkeypatch):
    model = presets.load("mixtral_small", preprocessor=None, num_layers=1, hidden_dim=32,
                         intermediate_dim=32, moe_intermediate_dim=16, vocabulary_size=64)
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    copies = []
    convert = weights_loading.ops.convert_to_numpy
    monkeypatch.setattr(
        weights_loading.ops, "convert_to_numpy",
        lambda x: copies.append(x) or convert(x),
    )
    model.load_weights(path)
    assert copies == []


def test_guard_counts_the_staging_of_the_largest_variable():
    assert memory.loading_memory_bytes(1000, "bfloat16") == 2000
    assert memory.loading_memory_bytes(1000, "float32", largest_params=10) == 4080
