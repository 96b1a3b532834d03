"""Forward+backward cost of the routing family beside `SparseMoE`.

Command, from the repository root:

    .venv/bin/python benchmarks/moe_layers_benchmark.py

Options: `--backends tensorflow,jax,torch`, `--repeats 7`, `--quick`,
`--json-out FILE`, `--require-idle`.

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
import dataclasses

import harness

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
RATIOS = (
    harness.Ratio("expert choice / SparseMoE", "expert_choice", "sparse",
                  "<=", 1.2),
    harness.Ratio("HierarchicalMoE / SparseMoE", "hierarchical", "sparse",
                  "<=", 1.2),
    harness.Ratio("SharedExpertMoE / (SparseMoE + FeedForward)", "shared",
                  "sparse_plus_ffn", "<=", 1.1),
    harness.Ratio("SharedExpertMoE / SparseMoE", "shared", "sparse"),
    harness.Ratio("SoftMoE / SparseMoE", "soft", "sparse"),
)
NUM_EXPERTS = 8
CAPACITY_FACTOR = 1.25  # of the token-choice baseline; the others match it


def build_layer(key, sizes):
    import keras

    from keras_moe import layers
    from keras_moe.ops import expert_capacity

    keras.utils.set_random_seed(harness.SEED)
    experts, f, k = NUM_EXPERTS, sizes.intermediate_dim, sizes.top_k
    sequences = sizes.input_shape[0]
    slots = expert_capacity(sizes.tokens, experts, k, CAPACITY_FACTOR)
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
    inputs = harness.make_inputs(sizes)
    runs = {}
    for key in LAYER_KEYS:
        layer = build_layer(key, sizes)
        step = harness.gradient_step(backend, layer, inputs)
        harness.warm_up(step.run, 2)
        runs[key] = step.run
        print(f"  {key}: compiled", flush=True)
    medians = harness.time_rounds(runs, repeats).medians()
    for key, median_ms in medians.items():
        harness.emit({"key": key, "median_ms": median_ms})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(harness.BACKENDS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    harness.add_json_argument(parser)
    harness.add_idle_argument(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = harness.sizes_for(args.quick)
    if args.worker:
        worker(args.worker, sizes, args.repeats)
        return

    harness.check_idle(refuse=args.require_idle)
    print(f"sizes: {sizes}, repeats: {args.repeats}")
    medians, background = {}, {}
    for backend in harness.parse_backends(args.backends):
        run = harness.spawn_worker(
            __file__,
            ["--worker", backend, "--repeats", str(args.repeats)]
            + (["--quick"] if args.quick else []),
            backend,
        )
        medians[backend] = {r["key"]: r["median_ms"] for r in run.records}
        background[backend] = run.background_cores
    backends = list(medians)
    rows = [[LABELS[key]] + [f"{medians[b][key]:.1f}" for b in backends]
            for key in LAYER_KEYS]
    print("\nMedian forward+backward step (ms)")
    print(harness.format_table(["layer"] + backends, rows))
    rows = []
    for ratio in RATIOS:
        row = [ratio.label, ratio.target]
        for backend in backends:
            value = ratio.value(medians[backend])
            verdict = ratio.verdict(value, backend)
            row.append(f"{value:.2f}" + ("" if verdict == "-" else f" {verdict}"))
        rows.append(row)
    print("\nRatios")
    print(harness.format_table(["ratio", "target"] + backends, rows))
    harness.warn_if_busy(background)
    harness.write_json(args.json_out, {
        "sizes": dataclasses.asdict(sizes), "median_ms": medians, "background_cores": background,
        "ratios": {ratio.label: {b: ratio.value(medians[b]) for b in backends}
                   for ratio in RATIOS},
    })


if __name__ == "__main__":
    main()
