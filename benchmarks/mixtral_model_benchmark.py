"""Training throughput of a `mixtral_small`-shaped model: keras_moe vs keras-hub.

Command, from the repository root:

    .venv/bin/python benchmarks/mixtral_model_benchmark.py

Options: `--backends tensorflow,jax,torch`, `--experts 8 32`, `--repeats 5`,
`--quick` (tiny sizes, a smoke run), `--json-out FILE`, `--require-idle`.

Both models have the shapes of the issue's `mixtral_small`: 4 decoder
layers, d = 256, 8 query / 2 key-value heads, SwiGLU experts of f = 512,
top-2 routing, a 259-token byte vocabulary, sequences of 256, batches of 8,
with 8 and with 32 experts. keras-hub's `MixtralCausalLM` is built first and
its weights are copied into `keras_moe.models.MoECausalLM`, so both start
from the same numbers:

1. Logits: with a dropless keras_moe model (`capacity_factor=None`) both must
   agree within 1e-4 on a batch with padding.
2. Throughput: `model.train_on_batch` (Adam, sparse cross-entropy on the
   logits, the routers' auxiliary losses included) after compilation and
   warm-up; TensorFlow with `jit_compile=True`, JAX jitted, PyTorch eager.
   keras_moe trains at `mixtral_small`'s capacity factor 1.25 (and, for
   reference, dropless). Repetitions of the models alternate and the median
   step gives training tokens per second.

Targets (TensorFlow and JAX): keras_moe at least 2.5x keras-hub's tokens/s
with 8 experts and 8x with 32 experts. keras-hub runs every expert on every
token, so its cost grows with the number of experts; keras_moe's follows
the active experts.
"""

import argparse
import re

import harness

TARGETS = {8: 2.5, 32: 8.0}
TARGET_BACKENDS = ("tensorflow", "jax")


def shapes(quick):
    if quick:
        return dict(num_layers=2, hidden_dim=32, num_query_heads=4,
                    num_key_value_heads=2, intermediate_dim=64,
                    sequence_length=32, batch_size=2)
    return dict(num_layers=4, hidden_dim=256, num_query_heads=8,
                num_key_value_heads=2, intermediate_dim=512,
                sequence_length=256, batch_size=8)


# keras-hub MixtralBackbone variable path -> MoEBackbone variable path
# (regular expressions; keras-hub numbers repeated sublayer names).
_MOE_BLOCK = r"/mixtral_sparse_moe_block(?:_\d+)?/"
PATH_MAP = (
    (r"^transformer_layer_", "decoder_block_"),
    (r"/self_attention/", "/attention/"),
    (r"/self_attention_layernorm/", "/pre_attention_norm/"),
    (r"/feedforward_layernorm/", "/pre_feedforward_norm/"),
    (_MOE_BLOCK + r"sparse_feedforward_gate_dense/kernel$", "/moe/router/kernel"),
    (_MOE_BLOCK + r"experts/expert_feedforward_gate_dense$", "/moe/experts/gate_kernel"),
    (_MOE_BLOCK + r"experts/expert_feedforward_intermediate_dense$", "/moe/experts/up_kernel"),
    (_MOE_BLOCK + r"experts/expert_feedforward_output_dense$", "/moe/experts/down_kernel"),
    (r"^sequence_output_layernorm/", "final_norm/"),
)


def our_path(keras_hub_path):
    for pattern, replacement in PATH_MAP:
        keras_hub_path = re.sub(pattern, replacement, keras_hub_path)
    return keras_hub_path


def build_models(num_experts, sizes, capacity_factors):
    import keras
    import keras_hub

    from keras_moe.models import MoEBackbone
    from keras_moe.models import MoECausalLM

    keras.utils.set_random_seed(harness.SEED)
    common = dict(
        vocabulary_size=259,
        num_layers=sizes["num_layers"],
        hidden_dim=sizes["hidden_dim"],
        num_query_heads=sizes["num_query_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        num_experts=num_experts,
        top_k=2,
    )
    reference = keras_hub.models.MixtralCausalLM(
        backbone=keras_hub.models.MixtralBackbone(
            intermediate_dim=sizes["intermediate_dim"], **common
        ),
        preprocessor=None,
    )
    values = {w.path: w.numpy() if hasattr(w, "numpy") else keras.ops.convert_to_numpy(w)
              for w in reference.backbone.weights}
    ours = {}
    for capacity_factor in capacity_factors:
        model = MoECausalLM(
            backbone=MoEBackbone(
                moe_intermediate_dim=sizes["intermediate_dim"],
                moe_options={
                    "capacity_factor": capacity_factor,
                    "eval_capacity_factor": None,
                    "aux_loss_weight": 0.02,
                },
                **common,
            ),
            preprocessor=None,
        )
        by_path = {w.path: w for w in model.backbone.weights}
        assert len(by_path) == len(values), (sorted(by_path), sorted(values))
        for path, value in values.items():
            by_path[our_path(path)].assign(value)
        ours[capacity_factor] = model
    return reference, ours


def make_batch(sizes, rng):
    import numpy as np

    batch, length = sizes["batch_size"], sizes["sequence_length"]
    token_ids = rng.integers(0, 256, size=(batch, length)).astype("int32")
    padding_mask = np.ones((batch, length), bool)
    padding_mask[0, length // 2:] = False  # one padded sequence
    labels = rng.integers(0, 256, size=(batch, length)).astype("int32")
    return {"token_ids": token_ids, "padding_mask": padding_mask}, labels


def worker(backend, num_experts, sizes, repeats):
    import keras
    import numpy as np

    rng = np.random.default_rng(harness.SEED)
    reference, ours = build_models(num_experts, sizes, (None, 1.25))
    x, y = make_batch(sizes, rng)

    reference_logits = keras.ops.convert_to_numpy(reference(x, training=False))
    our_logits = keras.ops.convert_to_numpy(ours[None](x, training=False))
    real = x["padding_mask"]
    max_diff = float(np.abs(reference_logits - our_logits)[real].max())

    models = {"keras_hub": reference, "ours_cf1.25": ours[1.25], "ours_dropless": ours[None]}
    sample_weight = x["padding_mask"].astype("float32")
    runs = {}
    for key, model in models.items():
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=backend != "torch",
        )
        runs[key] = (lambda model=model: model.train_on_batch(
            x, y, sample_weight=sample_weight))
        harness.warm_up(runs[key], 2)
        print(f"  E={num_experts} {key}: compiled", flush=True)
    harness.emit({
        "num_experts": num_experts,
        "max_logit_diff": max_diff,
        "median_ms": harness.time_rounds(runs, repeats).medians(),
        "tokens_per_step": sizes["batch_size"] * sizes["sequence_length"],
    })


def run_worker(backend, num_experts, args):
    worker_args = ["--worker", backend, "--experts", str(num_experts),
                   "--repeats", str(args.repeats)]
    worker_args += ["--quick"] if args.quick else []
    run = harness.spawn_worker(
        __file__, worker_args, backend, label=f"{backend} E={num_experts}"
    )
    if not run.records:
        raise SystemExit(f"{backend} E={num_experts} worker printed no result")
    return run.records[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(harness.BACKENDS))
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    harness.add_json_argument(parser)
    harness.add_idle_argument(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = shapes(args.quick)
    if args.worker:
        worker(args.worker, args.experts[0], sizes, args.repeats)
        return

    harness.check_idle(refuse=args.require_idle)
    print(f"shapes: {sizes}, repeats: {args.repeats}")
    rows, records = [], []
    for backend in harness.parse_backends(args.backends):
        for num_experts in args.experts:
            record = run_worker(backend, num_experts, args)
            records.append(record)
            medians = record["median_ms"]
            tokens = record["tokens_per_step"]
            speedup = harness.Ratio(
                "speed-up", "keras_hub", "ours_cf1.25", ">=",
                TARGETS.get(num_experts), TARGET_BACKENDS,
            )
            value = speedup.value(medians)
            verdict = speedup.verdict(value, backend)
            rows.append([
                backend, num_experts,
                f"{tokens / medians['keras_hub'] * 1e3:.0f}",
                f"{tokens / medians['ours_cf1.25'] * 1e3:.0f}",
                f"{tokens / medians['ours_dropless'] * 1e3:.0f}",
                f"{value:.2f}",
                f"{medians['keras_hub'] / medians['ours_dropless']:.2f}",
                f"{speedup.target}: {verdict}"
                if verdict in ("PASS", "MISS") else "-",
                f"{record['max_logit_diff']:.1e}",
                f"{record['background_cores']:.2f}",
            ])
    print("\nTraining tokens/s (median step) and speed-up over keras-hub")
    print(harness.format_table(
        ["backend", "E", "keras-hub", "ours cf1.25", "ours dropless",
         "speed-up cf1.25", "speed-up dropless", "target", "max |logit diff|",
         "other cores busy"],
        rows,
    ))
    harness.warn_if_busy({
        f"{r['backend']} E={r['num_experts']}": r["background_cores"]
        for r in records
    })
    harness.write_json(args.json_out, {"shapes": sizes, "runs": records})


if __name__ == "__main__":
    main()
