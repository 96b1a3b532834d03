"""Forward+backward cost of the routing family beside `SparseMoE`.

Command, from the repository root:

    .venv/bin/python benchmarks/moe_layers_benchmark.py

Options: `--backends tensorflow,jax,torch`, `--repeats 7`, `--quick`.

Same workload, sizes and step compilation as sparse_moe_benchmark.py
(T=4096 tokens of d=512 as [8, 512, 512], experts of f=1024 SwiGLU, the loss
`mean(outputs ** 2) + layer losses` and its gradients w.r.t. the input and
every weight), all at the same expert compute: 8 experts x 1280 slots.

- `SparseMoE` token choice, top-2, capacity factor 1.25 (C = 1280): the
  baseline;
- `SparseMoE(routing="expert_choice")` at capacity factor 2.5 (C = 2.5 T / E
  = 1280, the same slots);
- `HierarchicalMoE`, 2 groups of 4 experts, top-1 group, top-2 inside it
  (2 choices per token, C = 1280);
- `SharedExpertMoE` with one shared expert of width f, against `SparseMoE`
  followed by a dense `FeedForward` of width f (what it should cost);
- `SoftMoE` with 160 slots per expert: 8 x 160 = 1280 slots per sequence,
  so its experts process as many rows as the others'.

Targets: expert choice and HierarchicalMoE within 1.2x of SparseMoE;
SharedExpertMoE about SparseMoE + one FeedForward (ratio near 1); SoftMoE is
reported. Each backend runs in its own subprocess; repetitions of all layers
are interleaved and medians reported, with the CPU that other processes used
meanwhile (ratios are only meaningful when that is near zero).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparse_moe_benchmark as base  # noqa: E402

RESULT_PREFIX = "LAYER_RESULT "
LAYER_KEYS = (
    "sparse", "expert_choice", "hierarchical", "shared", "sparse_plus_ffn", "soft"
)
LABELS = {
    "sparse": "SparseMoE token choice top-2 cf=1.25",
    "expert_choice": "SparseMoE expert choice cf=2.5",
    "hierarchical": "HierarchicalMoE 2x4, top-1 group, top-2",
    "shared": "SharedExpertMoE (1 shared expert)",
    "sparse_plus_ffn": "SparseMoE + FeedForward(f)",
    "soft": "SoftMoE 160 slots/expert",
}
# (label, numerator, denominator, comparison, bound or None)
RATIOS = (
    ("expert choice / SparseMoE", "expert_choice", "sparse", "<=", 1.2),
    ("HierarchicalMoE / SparseMoE", "hierarchical", "sparse", "<=", 1.2),
    ("SharedExpertMoE / (SparseMoE + FeedForward)", "shared", "sparse_plus_ffn", "<=", 1.1),
    ("SharedExpertMoE / SparseMoE", "shared", "sparse", None, None),
    ("SoftMoE / SparseMoE", "soft", "sparse", None, None),
)


def build_layer(key, sizes):
    import keras

    from keras_moe import layers

    keras.utils.set_random_seed(base.SEED)
    experts, f, k = 8, sizes.intermediate_dim, sizes.top_k
    sequences, seq_len = sizes.input_shape[:2]
    slots = base.expert_rows(base.CONFIGS_BY_KEY["sparse_e8"], sizes) // experts
    if key == "sparse":
        layer = layers.SparseMoE(experts, f, top_k=k, capacity_factor=1.25)
    elif key == "expert_choice":
        layer = layers.SparseMoE(
            experts, f, routing="expert_choice",
            capacity_factor=slots * experts / sizes.tokens,
        )
    elif key == "hierarchical":
        layer = layers.HierarchicalMoE(
            2, experts // 2, f, top_groups=1, top_k=k, capacity_factor=1.25
        )
    elif key == "shared":
        layer = layers.SharedExpertMoE(
            experts, f, num_shared_experts=1, top_k=k, capacity_factor=1.25
        )
    elif key == "sparse_plus_ffn":
        layer = SparsePlusFeedForward(experts, f, k)
    elif key == "soft":
        layer = layers.SoftMoE(
            experts, f, slots_per_expert=max(1, slots // sequences)
        )
    layer.build(sizes.input_shape)
    return layer


def SparsePlusFeedForward(num_experts, intermediate_dim, top_k):
    """`SparseMoE(x) + FeedForward(x)` as one layer, what shared experts cost."""
    import keras

    from keras_moe import layers

    class Summed(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.moe = layers.SparseMoE(
                num_experts, intermediate_dim, top_k=top_k, capacity_factor=1.25
            )
            self.ffn = layers.FeedForward(intermediate_dim)

        def build(self, input_shape):
            self.moe.build(input_shape)
            self.ffn.build(input_shape)

        def call(self, inputs, training=None):
            return self.moe(inputs, training=training) + self.ffn(inputs)

    return Summed()


def worker(backend, sizes, repeats):
    inputs = base.make_inputs(sizes)
    runs = {}
    for key in LAYER_KEYS:
        layer = build_layer(key, sizes)
        step = base.make_step(backend, layer, inputs)
        for _ in range(2):
            step.run()
        runs[key] = step.run
        print(f"  {key}: compiled", flush=True)
    times = base.time_interleaved(runs, {key: repeats for key in runs})
    for key, values in times.items():
        print(RESULT_PREFIX + json.dumps(
            {"key": key, "median_ms": statistics.median(values)}
        ), flush=True)


def run_backend(backend, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", backend,
               "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    busy_before = base.busy_cpu_seconds()
    own_before = base.children_cpu_seconds()
    started = base.time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall_s = base.time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{backend} worker failed:\n{result.stderr[-3000:]}")
    background = max(0.0, (base.busy_cpu_seconds() - busy_before)
                     - (base.children_cpu_seconds() - own_before)) / wall_s
    medians = {}
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            record = json.loads(line[len(RESULT_PREFIX):])
            medians[record["key"]] = record["median_ms"]
    return medians, background


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(base.BACKENDS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = base.QUICK_SIZES if args.quick else base.FULL_SIZES
    if args.worker:
        worker(args.worker, sizes, args.repeats)
        return

    print(f"sizes: {sizes}, repeats: {args.repeats}")
    results = {}
    for backend in args.backends.split(","):
        results[backend] = run_backend(backend, args)
        print(f"[{backend}] done; other processes kept "
              f"{results[backend][1]:.2f} cores busy", flush=True)
    backends = list(results)
    rows = [[LABELS[key]] + [f"{results[b][0][key]:.1f}" for b in backends]
            for key in LAYER_KEYS]
    print("\nMedian forward+backward step (ms)")
    print(base.format_table(["layer"] + backends, rows))
    rows = []
    for label, numerator, denominator, comparison, bound in RATIOS:
        row = [label, f"{comparison} {bound}" if bound else "-"]
        for backend in backends:
            medians = results[backend][0]
            ratio = medians[numerator] / medians[denominator]
            verdict = ""
            if bound:
                met = ratio <= bound if comparison == "<=" else ratio >= bound
                verdict = " ok" if met else " MISS"
            row.append(f"{ratio:.2f}{verdict}")
        rows.append(row)
    print("\nRatios")
    print(base.format_table(["ratio", "target"] + backends, rows))


if __name__ == "__main__":
    main()
