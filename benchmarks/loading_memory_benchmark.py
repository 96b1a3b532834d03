"""Peak memory of loading a bfloat16 checkpoint, against the model's bytes.

    python benchmarks/loading_memory_benchmark.py                 # ~2 GB, 3 backends
    python benchmarks/loading_memory_benchmark.py --backends jax
    python benchmarks/loading_memory_benchmark.py --quick         # ~40 MB

Writes a Mixtral-family Hugging Face checkpoint (`config.json` and one
`model.safetensors`, random bfloat16 values, streamed to disk tensor by
tensor; nothing is downloaded) whose weights take about 2 GB (`--quick`:
about 40 MB), once, under `--directory`. Then, in a fresh worker process
per backend and case:

- `convert`: `keras_moe.presets.load(directory, preprocessor=None,
  dtype="bfloat16")`, the Hugging Face conversion (building the model and
  reading the checkpoint into it);
- `load_weights`: `model.load_weights("model.weights.h5")` into a model of
  the same config built under `dtype="bfloat16"` (the file is saved from
  the converted model by a separate worker first).

Each worker first runs the same steps on a tiny checkpoint (one-time
imports and backend start-up are not what is measured), then measures the
growth of its peak resident set size (`VmHWM`, reset through
`/proc/self/clear_refs`, minus `VmRSS` before) over the call, and compares
it with the bytes of the model's variables and with the memory guard's
estimate (`keras_moe.models.memory.loading_memory_bytes`, from the
checkpoint's headers). For `load_weights` the model already exists before
the call, so the growth is the loading overhead alone. Prints one
Markdown table; the target is a growth of at most 1.3x the model's bytes
for `convert`, and an estimate within 10% of the measured growth.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.memory import step_memory  # noqa: E402
from harness.memory import variable_bytes  # noqa: E402
from harness.processes import BACKENDS  # noqa: E402
from harness.processes import RESULT_PREFIX  # noqa: E402
from harness.processes import emit  # noqa: E402
from harness.processes import parse_backends  # noqa: E402

TARGET_RATIO = 1.3
ESTIMATE_TOLERANCE = 0.10
# About 2 GB of bfloat16 weights: 10 layers of 8 experts, 972M parameters.
FULL = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=3584,
    num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4,
    num_local_experts=8,
)
# About 40 MB, for a quick check.
QUICK = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512,
    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=8,
)
TINY = dict(
    vocab_size=64, hidden_size=16, intermediate_size=16,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    num_local_experts=2,
)


def mixtral_config(sizes):
    """A transformers `config.json` dict of the Mixtral family."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **sizes,
        "num_experts_per_tok": 2,
        "head_dim": sizes["hidden_size"] // sizes["num_attention_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
    }


def mixtral_tensor_shapes(config):
    """`{tensor name: shape}` of a Mixtral checkpoint, in file order."""
    d, f = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        moe = f"{prefix}.block_sparse_moe"
        shapes[f"{prefix}.input_layernorm.weight"] = (d,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (d,)
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (heads * head_dim, d)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_heads * head_dim, d)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_heads * head_dim, d)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (d, heads * head_dim)
        shapes[f"{moe}.gate.weight"] = (config["num_local_experts"], d)
        for expert in range(config["num_local_experts"]):
            shapes[f"{moe}.experts.{expert}.w1.weight"] = (f, d)
            shapes[f"{moe}.experts.{expert}.w3.weight"] = (f, d)
            shapes[f"{moe}.experts.{expert}.w2.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config["vocab_size"], d)
    return shapes


def write_bfloat16_safetensors(path, shapes, seed=0):
    """Write a safetensors file of random bfloat16 tensors, one at a time.

    The header is computed first, then each tensor is generated and
    written, so the writer never holds more than one tensor.
    """
    import ml_dtypes

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {
            "dtype": "BF16", "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # Data starts 8-byte aligned.
    rng = np.random.default_rng(seed)
    partial = Path(str(path) + ".partial")
    with open(partial, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for shape in shapes.values():
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            file.write(values.astype(ml_dtypes.bfloat16).tobytes())
    partial.replace(path)


def write_checkpoint(directory, sizes):
    """A Mixtral checkpoint in `directory` (reused if already complete)."""
    directory = Path(directory)
    config = mixtral_config(sizes)
    config_path = directory / "config.json"
    weights = directory / "model.safetensors"
    if (
        weights.is_file()
        and config_path.is_file()
        and json.loads(config_path.read_text()) == config
    ):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    write_bfloat16_safetensors(weights, mixtral_tensor_shapes(config))
    config_path.write_text(json.dumps(config, indent=2))
    return directory


# --- Worker ------------------------------------------------------------------


def load_converted(directory):
    from keras_moe import presets

    return presets.load(directory, preprocessor=None, dtype="bfloat16")


def new_model(directory):
    """A bfloat16 `MoECausalLM` of the checkpoint's config, not loaded."""
    from keras_moe import models
    from keras_moe.convert import backbone_config_from_transformers
    from keras_moe.convert.checkpoint import read_config

    config = backbone_config_from_transformers(read_config(directory))
    config["dtype"] = "bfloat16"
    return models.MoECausalLM(backbone=models.MoEBackbone(**config))


def guard_estimate(directory):
    """The memory guard's need for converting the checkpoint, in bytes."""
    from keras_moe.convert.checkpoint import SafetensorsCheckpoint
    from keras_moe.convert.registry import lookup
    from keras_moe.models.memory import loading_memory_bytes

    family = lookup("mixtral")
    checkpoint = SafetensorsCheckpoint(
        directory, aliases=family.checkpoint_aliases,
        expert_projections=family.expert_projections,
    )
    try:
        return loading_memory_bytes(
            checkpoint.num_elements(), "bfloat16",
            largest_params=checkpoint.largest_variable_size(),
        )
    finally:
        checkpoint.close()


def run_case(case, directory, tiny_directory):
    import keras

    backend = keras.backend.backend()
    weights_file = Path(directory) / "model.weights.h5"
    tiny_weights = Path(tiny_directory) / "model.weights.h5"
    if case == "save":
        load_converted(directory).save_weights(weights_file)
        return
    if case == "convert":
        load_converted(tiny_directory)  # Warm-up.
        held = {}
        start = time.perf_counter()
        measured = step_memory(
            backend, lambda: held.update(model=load_converted(directory))
        )
        seconds = time.perf_counter() - start
        estimate = guard_estimate(directory)
    else:  # "load_weights"
        if not tiny_weights.is_file():
            load_converted(tiny_directory).save_weights(tiny_weights)
        new_model(tiny_directory).load_weights(tiny_weights)  # Warm-up.
        held = {"model": new_model(directory)}
        if backend == "jax":  # Initial values are computed asynchronously.
            import jax

            jax.block_until_ready([v.value for v in held["model"].weights])
        start = time.perf_counter()
        measured = step_memory(
            backend, lambda: held["model"].load_weights(weights_file)
        )
        seconds = time.perf_counter() - start
        estimate = None
    model_bytes = variable_bytes(held["model"].weights)
    emit(dict(
        backend=backend, case=case, model_bytes=model_bytes,
        growth_bytes=measured["peak_rss_growth_bytes"],
        allocator_growth_bytes=measured.get("allocator_peak_growth_bytes"),
        estimate_bytes=estimate, seconds=seconds,
    ))


# --- Parent ------------------------------------------------------------------


def spawn(backend, case, directory, tiny_directory):
    env = {**os.environ, "KERAS_BACKEND": backend}
    command = [
        sys.executable, __file__, "--worker", case,
        "--directory", str(directory), "--tiny-directory", str(tiny_directory),
    ]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(
            f"{backend} {case} worker failed:\n{completed.stderr[-4000:]}"
        )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def report(records):
    mb = 1e6
    print(
        "| backend | case | model (MB) | peak RSS growth (MB) | growth / model "
        f"(target <= {TARGET_RATIO}) | guard estimate (MB) | estimate / growth "
        "| time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for record in records:
        ratio = record["growth_bytes"] / record["model_bytes"]
        estimate = record["estimate_bytes"]
        if estimate is None:
            estimate_cells = "| - | - "
        else:
            estimate_cells = (
                f"| {estimate / mb:,.0f} | "
                f"{estimate / record['growth_bytes']:.3f} "
            )
        print(
            f"| {record['backend']} | {record['case']} | "
            f"{record['model_bytes'] / mb:,.0f} | "
            f"{record['growth_bytes'] / mb:,.0f} | {ratio:.3f} "
            f"{estimate_cells}| {record['seconds']:.1f} |"
        )
        if record.get("allocator_growth_bytes") is not None:
            print(
                f"|  | (TensorFlow allocator peak growth: "
                f"{record['allocator_growth_bytes'] / mb:,.0f} MB) | | | | | | |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--cases", default="convert,load_weights",
        help="comma-separated: convert, load_weights",
    )
    parser.add_argument("--directory", default=None)
    parser.add_argument("--tiny-directory", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_case(args.worker, args.directory, args.tiny_directory)
        return
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "keras_moe_loading_benchmark"
    sizes = QUICK if args.quick else FULL
    directory = Path(
        args.directory or root / ("quick" if args.quick else "full")
    )
    tiny_directory = Path(args.tiny_directory or root / "tiny")
    print(f"Writing (or reusing) the checkpoint in {directory} ...", flush=True)
    write_checkpoint(directory, sizes)
    write_checkpoint(tiny_directory, TINY)
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    records = []
    for backend in parse_backends(args.backends):
        for case in cases:
            if case == "load_weights" and not (
                directory / "model.weights.h5"
            ).is_file():
                spawn(backend, "save", directory, tiny_directory)
            print(f"{backend}: {case} ...", flush=True)
            records.append(spawn(backend, case, directory, tiny_directory))
    print()
    report(records)


if __name__ == "__main__":
    main()
