"""Forward+backward benchmark of `keras_moe.layers.SparseMoE`.

Command, from the repository root (also `make benchmark`):

    .venv/bin/python benchmarks/sparse_moe_benchmark.py

Options: `--backends tensorflow,jax,torch`, `--repeats 7`, `--tokens 4096`,
`--quick` (tiny sizes, a smoke run), `--skip-keras-hub`, `--skip-memory`,
`--skip-breakdown`, `--torch-compile`, `--json-out FILE`, `--require-idle`
(stop if other processes keep the CPU busy before the run).

Workload: one training step without an optimizer, i.e. the loss
`mean(outputs ** 2) + sum(layer losses)` (the router's auxiliary losses where a
layer adds them) and its gradients with respect to the input and every
trainable weight, on `T` tokens shaped `[T / seq_len, seq_len, d]` in float32.
Every layer is built from the same seed. Configurations:

- `SparseMoE` with 8 and 64 experts at capacity factor 1.25, and 8 experts at
  capacity factor 1.0 (called with `training=True`, so the training capacity
  is used and the load-balancing loss is added);
- a dense SwiGLU feed-forward layer of `top_k * intermediate_dim` units, the
  same expert FLOPs as top-k routing without capacity slack;
- keras-hub's `MixtralSparseMoeBlock` with 8 and 64 experts, which runs every
  expert on every token.

Each backend runs in its own subprocess with `KERAS_BACKEND` set: TensorFlow
under `tf.function(jit_compile=True)`, JAX under `jax.jit` of
`jax.value_and_grad` over `stateless_call`, PyTorch in eager autograd (and
`torch.compile` with `--torch-compile`). Each step is compiled and warmed up
first, then repetitions of all configurations are interleaved (round-robin) so
that a disturbance on the machine hits every configuration alike, and the
median wall time is reported. Each keras-hub layer is timed in a subprocess
of its own: after its GB-sized steps, SparseMoE steps in the same JAX process
ran 10% (E=8 keras-hub) to 70% (E=64) slower, while the dense layer was
barely affected. keras-hub with 64 experts, about 25 times the work of the
rest, runs at most `--heavy-repeats` (3) times. The CPU time that other
processes take meanwhile is measured from /proc/stat and reported: ratios are
only meaningful when it is near zero.

Peak memory "weights aside" is measured per backend in a separate subprocess
whose malloc returns freed memory to the system at once: the growth of the
peak resident set size during one step (TensorFlow: the peak of its CPU
allocator's bytes in use, as it keeps freed memory), minus the weight
gradients, which are outputs of the step and scale with the number of
experts like the weights. For JAX, the temporary (scratch) bytes that XLA's
buffer assignment gives the compiled step are reported too.

Finally, sparse_moe_breakdown.py splits `SparseMoE`'s step into its stages
(router, dispatch plan, dispatch gather, experts, combine, load-balancing
loss) to show where the time goes (`--breakdown-repeats` runs per stage).
"""

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import harness


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One benchmarked layer.

    Attributes:
        key: short identifier used in results and ratios.
        label: human-readable name.
        kind: "sparse_moe", "dense" or "keras_hub_mixtral".
        num_experts: experts of an MoE layer (0 for the dense layer).
        capacity_factor: training capacity factor of a `SparseMoE`.
        own_process: timed in a subprocess of its own rather than
            interleaved with the others.
        heavy: runs at most `--heavy-repeats` times.
    """

    key: str
    label: str
    kind: str
    num_experts: int = 0
    capacity_factor: float = None
    own_process: bool = False
    heavy: bool = False


LAYER_CONFIGS = (
    LayerConfig("sparse_e8", "SparseMoE E=8 cf=1.25", "sparse_moe", 8, 1.25),
    LayerConfig("sparse_e64", "SparseMoE E=64 cf=1.25", "sparse_moe", 64, 1.25),
    LayerConfig("sparse_e8_cf1", "SparseMoE E=8 cf=1.0", "sparse_moe", 8, 1.0),
    LayerConfig("dense", "Dense SwiGLU k*f units", "dense"),
    LayerConfig(
        "mixtral_e8", "keras-hub Mixtral E=8", "keras_hub_mixtral", 8,
        own_process=True,
    ),
    LayerConfig(
        "mixtral_e64", "keras-hub Mixtral E=64", "keras_hub_mixtral", 64,
        own_process=True, heavy=True,
    ),
)
CONFIGS_BY_KEY = {config.key: config for config in LAYER_CONFIGS}
# Peak memory is measured on these (the E=64 / E=8 target and a reference).
MEMORY_CONFIG_KEYS = ("sparse_e8", "sparse_e64", "dense")
# torch.compile variants, timed only with --torch-compile.
TORCH_COMPILE_CONFIG_KEYS = ("sparse_e8", "sparse_e64", "dense")

TIMED = ("tensorflow", "jax")  # where the time targets apply
RATIOS = (
    harness.Ratio("SparseMoE E=64 / E=8 (cf 1.25)", "sparse_e64", "sparse_e8",
                  "<=", 1.10, TIMED),
    harness.Ratio("SparseMoE E=8 cf=1.25 / dense", "sparse_e8", "dense",
                  "<=", 1.30, TIMED),
    harness.Ratio("SparseMoE E=8 cf=1.0 / dense", "sparse_e8_cf1", "dense",
                  "<=", 1.10, TIMED),
    harness.Ratio("keras-hub E=8 / SparseMoE E=8 cf=1.25", "mixtral_e8",
                  "sparse_e8", ">=", 4.5),
    harness.Ratio("keras-hub E=64 / SparseMoE E=64 cf=1.25", "mixtral_e64",
                  "sparse_e64", ">=", 25.0),
    # Printed next to the targets for reference, without a target.
    harness.Ratio("keras-hub E=8 / SparseMoE E=8 cf=1.0", "mixtral_e8",
                  "sparse_e8_cf1"),
    harness.Ratio("SparseMoE E=8 cf=1.25 / cf=1.0", "sparse_e8", "sparse_e8_cf1"),
)
MEMORY_RATIO = harness.Ratio(
    "peak memory E=64 / E=8", "sparse_e64", "sparse_e8", "<=", 1.2
)


# --------------------------------------------------------------------------
# Worker side: runs inside a subprocess with KERAS_BACKEND set.
# --------------------------------------------------------------------------


def make_dense_swiglu(intermediate_dim):
    """A dense SwiGLU feed-forward layer: `down(silu(x @ gate) * (x @ up))`."""
    import keras
    from keras import ops

    class DenseSwiGLU(keras.layers.Layer):
        def __init__(self, intermediate_dim, **kwargs):
            super().__init__(**kwargs)
            self.intermediate_dim = intermediate_dim

        def build(self, input_shape):
            hidden_dim = input_shape[-1]
            up_shape = (hidden_dim, self.intermediate_dim)
            self.gate_kernel = self.add_weight(
                name="gate_kernel", shape=up_shape,
                initializer="glorot_uniform",
            )
            self.up_kernel = self.add_weight(
                name="up_kernel", shape=up_shape, initializer="glorot_uniform"
            )
            self.down_kernel = self.add_weight(
                name="down_kernel",
                shape=(self.intermediate_dim, hidden_dim),
                initializer="glorot_uniform",
            )

        def call(self, inputs, training=None):
            gate = ops.silu(ops.matmul(inputs, self.gate_kernel))
            up = ops.matmul(inputs, self.up_kernel)
            return ops.matmul(gate * up, self.down_kernel)

    return DenseSwiGLU(intermediate_dim, name="dense_swiglu")


def build_layer(config, sizes):
    """Build the layer of `config` from the shared seed."""
    import keras

    keras.utils.set_random_seed(harness.SEED)
    if config.kind == "sparse_moe":
        import keras_moe

        layer = keras_moe.layers.SparseMoE(
            num_experts=config.num_experts,
            intermediate_dim=sizes.intermediate_dim,
            top_k=sizes.top_k,
            capacity_factor=config.capacity_factor,
        )
    elif config.kind == "dense":
        layer = make_dense_swiglu(sizes.top_k * sizes.intermediate_dim)
    elif config.kind == "keras_hub_mixtral":
        from keras_hub.src.models.mixtral.mixtral_decoder import (
            MixtralSparseMoeBlock,
        )

        layer = MixtralSparseMoeBlock(
            hidden_dim=sizes.hidden_dim,
            intermediate_dim=sizes.intermediate_dim,
            num_experts=config.num_experts,
            top_k=sizes.top_k,
        )
    else:
        raise ValueError(f"Unknown layer kind: {config.kind}")
    layer.build(sizes.input_shape)
    return layer


def expert_rows(config, sizes):
    """Rows that go through the expert matmuls (each `3 * d * f` MACs)."""
    if config.kind == "dense":
        return sizes.tokens * sizes.top_k  # k*f units = k rows of f units
    if config.kind == "keras_hub_mixtral":
        return sizes.tokens * config.num_experts
    from keras_moe.ops import expert_capacity

    capacity = expert_capacity(
        sizes.tokens, config.num_experts, sizes.top_k, config.capacity_factor
    )
    return config.num_experts * capacity


def expert_gflops(config, sizes):
    """Expert matmul GFLOPs of forward+backward (backward = 2x forward)."""
    forward = 2 * 3 * sizes.hidden_dim * sizes.intermediate_dim
    return 3 * forward * expert_rows(config, sizes) / 1e9


def time_worker(backend, sizes, args):
    """Time every configuration on this backend; emit one record each."""
    inputs = harness.make_inputs(sizes)
    config_keys = args.configs.split(",")
    variants = [(CONFIGS_BY_KEY[key], False) for key in config_keys]
    if args.torch_compile and backend == "torch":
        variants += [
            (CONFIGS_BY_KEY[key], True)
            for key in TORCH_COMPILE_CONFIG_KEYS
            if key in config_keys
        ]
    runs, repeats, records = {}, {}, {}
    for config, torch_compile in variants:
        key = config.key + ("+compile" if torch_compile else "")
        layer = build_layer(config, sizes)
        start = time.perf_counter()
        try:
            step = harness.gradient_step(backend, layer, inputs, torch_compile)
            harness.warm_up(step.run, 1 if config.heavy else args.warmup)
        except Exception as error:  # reported, the other configs still run
            harness.emit(
                {"kind": "error", "config": key, "error": repr(error)[:500]}
            )
            continue
        warmup_s = time.perf_counter() - start
        print(f"  {key}: compiled and warmed up in {warmup_s:.1f} s", flush=True)
        runs[key] = step.run
        repeats[key] = (
            min(args.repeats, args.heavy_repeats)
            if config.heavy
            else args.repeats
        )
        records[key] = {
            "kind": "time",
            "config": key,
            "label": config.label
            + (" (torch.compile)" if torch_compile else ""),
            "warmup_s": warmup_s,
            "expert_gflops": expert_gflops(config, sizes),
            "weight_bytes": harness.variable_bytes(layer.trainable_variables),
            "xla_memory": step.xla_memory,
        }
    if not runs:
        return
    print(f"  timing {len(runs)} configurations, interleaved ...", flush=True)
    rounds = harness.time_rounds(runs, repeats)
    for key, record in records.items():
        record["times_ms"] = rounds.wall_ms[key]
        record["median_ms"] = rounds.median(key)
        harness.emit(record)


def memory_worker(backend, sizes, args):
    """Peak memory growth during one step, after compilation and warm-up.

    Run with `harness.LOW_MMAP_MALLOC_ENV`, so that the RSS follows the live
    buffers (TensorFlow: its allocator's statistics, see `harness.memory`).
    """
    inputs = harness.make_inputs(sizes)
    for key in MEMORY_CONFIG_KEYS:
        layer = build_layer(CONFIGS_BY_KEY[key], sizes)
        step = harness.gradient_step(backend, layer, inputs)
        harness.warm_up(step.run, args.warmup)
        harness.emit({
            "kind": "memory",
            "config": key,
            "weight_bytes": harness.variable_bytes(layer.trainable_variables),
            **harness.min_step_memory(backend, step.run),
        })
        del step, layer
        gc.collect()


def run_worker(args):
    sizes = harness.sizes_for(args.quick, args.tokens)
    import keras

    assert keras.backend.backend() == args.backend, keras.backend.backend()
    workers = {"time": time_worker, "memory": memory_worker}
    workers[args.mode](args.backend, sizes, args)


# --------------------------------------------------------------------------
# Parent side: spawns the workers, collects records, prints the report.
# --------------------------------------------------------------------------


def spawn(backend, mode, args, configs=(), extra_env=None):
    """Run this script as a worker; return its records of kind `mode`."""
    worker_args = [
        "--worker", mode, "--backend", backend, "--repeats", str(args.repeats),
        "--heavy-repeats", str(args.heavy_repeats),
        "--warmup", str(args.warmup),
    ]
    for flag in ("quick", "torch_compile"):
        if getattr(args, flag):
            worker_args.append("--" + flag.replace("_", "-"))
    if args.tokens:
        worker_args += ["--tokens", str(args.tokens)]
    if configs:
        worker_args += ["--configs", ",".join(c.key for c in configs)]
    run = harness.spawn_worker(
        __file__, worker_args, backend, label=f"{backend} {mode}",
        extra_env=extra_env, check=False,
    )
    for record in run.records:
        if record["kind"] == "error":
            print(f"[{backend} {mode}] {record['config']} failed: "
                  f"{record['error']}", flush=True)
    return [record for record in run.records if record["kind"] == mode]


def report_times(time_records, backends):
    order = [config.key for config in LAYER_CONFIGS]
    order += [key + "+compile" for key in order]
    for backend in backends:
        records = sorted(
            (r for r in time_records if r["backend"] == backend),
            key=lambda record: order.index(record["config"]),
        )
        if not records:
            continue
        rows = [
            (
                r["label"], f"{r['median_ms']:.1f}",
                f"{min(r['times_ms']):.1f}", f"{max(r['times_ms']):.1f}",
                len(r["times_ms"]), f"{r['expert_gflops']:.0f}",
                f"{r['expert_gflops'] / r['median_ms'] * 1e3:.0f}",
                f"{r['warmup_s']:.1f}",
            )
            for r in records
        ]
        print(f"\n== {backend}: forward+backward step, milliseconds ==")
        print(harness.format_table(
            ("configuration", "median", "min", "max", "runs",
             "expert GFLOP", "GFLOP/s", "warmup s"),
            rows,
        ))


def compute_ratios(time_records, backends):
    """One row per ratio and backend: value, expert-FLOP ratio, verdict."""
    flops = {r["config"]: r["expert_gflops"] for r in time_records}
    rows = []
    for ratio in RATIOS:
        for backend in backends:
            value = ratio.value({
                r["config"]: r["median_ms"]
                for r in time_records if r["backend"] == backend
            })
            if value is None:
                continue
            rows.append({
                "label": ratio.label,
                "backend": backend,
                "ratio": value,
                "flop_ratio": ratio.value(flops),
                "target": ratio.target,
                "verdict": ratio.verdict(value, backend),
                "bound": ratio.bound,
            })
    return rows


def compute_memory_rows(time_records, memory_records, backends):
    """E=64 / E=8 peak-memory ratios, weights (and their gradients) aside."""
    rows = []

    def add_row(measure, bytes_by_config):
        ratio = MEMORY_RATIO.value(bytes_by_config)
        if ratio is None:
            return
        rows.append({
            "measure": measure,
            "e8_mib": harness.mib(bytes_by_config["sparse_e8"]),
            "e64_mib": harness.mib(bytes_by_config["sparse_e64"]),
            "ratio": ratio,
            "verdict": MEMORY_RATIO.verdict(ratio),
        })

    xla = {
        r["config"]: r
        for r in time_records
        if r["backend"] == "jax" and r.get("xla_memory")
    }
    add_row("jax XLA temp bytes", {
        key: r["xla_memory"]["temp_bytes"] for key, r in xla.items()
    })
    add_row("jax XLA temp + outputs - weight grads", {
        key: r["xla_memory"]["temp_bytes"] + r["xla_memory"]["output_bytes"]
        - r["weight_bytes"]
        for key, r in xla.items()
    })
    # TensorFlow's allocator keeps freed memory, so its RSS says little
    # there; its allocator statistics are used instead.
    measure_by_backend = {
        "tensorflow": ("allocator_peak_growth_bytes", "allocator peak growth"),
        "jax": ("peak_rss_growth_bytes", "peak RSS growth"),
        "torch": ("peak_rss_growth_bytes", "peak RSS growth"),
    }
    for backend in backends:
        field, description = measure_by_backend[backend]
        add_row(f"{backend} {description} - weight grads", {
            r["config"]: r[field] - r["weight_bytes"]
            for r in memory_records
            if r["backend"] == backend
        })
    return rows


def report_memory(memory_records, memory_rows):
    if memory_records:
        print("\n== Memory growth during one step, MiB (TensorFlow: its "
              "allocator's peak; RSS growth shown for reference) ==")
        rows = []
        for r in memory_records:
            growth = r.get(
                "allocator_peak_growth_bytes", r["peak_rss_growth_bytes"]
            )
            rows.append((
                r["backend"], CONFIGS_BY_KEY[r["config"]].label,
                harness.mib(growth), harness.mib(r["peak_rss_growth_bytes"]),
                harness.mib(r["weight_bytes"]),
                harness.mib(growth - r["weight_bytes"]),
            ))
        print(harness.format_table(
            ("backend", "configuration", "peak growth", "RSS growth",
             "weight grads", "peak growth - weight grads"),
            rows,
        ))
    if memory_rows:
        print(f"\n== Peak memory E=64 / E=8 (weights aside), target "
              f"{MEMORY_RATIO.target} ==")
        print(harness.format_table(
            ("measure", "E=8 MiB", "E=64 MiB", "ratio", "verdict"),
            [(r["measure"], r["e8_mib"], r["e64_mib"], f"{r['ratio']:.2f}",
              r["verdict"]) for r in memory_rows],
        ))


def report_summary(ratio_rows, memory_rows):
    print("\n== Targets ==")
    rows = [
        (row["label"], row["backend"], f"{row['ratio']:.2f}",
         f"{row['flop_ratio']:.2f}", row["target"], row["verdict"])
        for row in ratio_rows
    ]
    rows += [
        (f"{MEMORY_RATIO.label}: {row['measure']}", "", f"{row['ratio']:.2f}",
         "", MEMORY_RATIO.target, row["verdict"])
        for row in memory_rows
    ]
    print(harness.format_table(
        ("ratio", "backend", "measured", "expert-FLOP ratio", "target",
         "verdict"),
        rows,
    ))
    print("(keras-hub is compared with SparseMoE at capacity factor 1.25, "
          "the default; 'report' = no target on that backend.)")


def run_breakdown(args):
    """Run sparse_moe_breakdown.py (it prints its tables); return its records."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "sparse_moe_breakdown.py")
    with tempfile.TemporaryDirectory() as folder:
        json_path = os.path.join(folder, "breakdown.json")
        command = [
            sys.executable, script, "--backends", args.backends,
            "--repeats", str(args.breakdown_repeats),
            "--warmup", str(args.warmup), "--json-out", json_path,
        ]
        command += ["--tokens", str(args.tokens)] if args.tokens else []
        command += ["--quick"] if args.quick else []
        print("\n== Where the step goes (sparse_moe_breakdown.py) ==",
              flush=True)
        if subprocess.run(command).returncode:
            print("sparse_moe_breakdown.py failed", flush=True)
            return []
        with open(json_path) as json_file:
            return json.load(json_file)["breakdown"]


def run_parent(args):
    sizes = harness.sizes_for(args.quick, args.tokens)
    backends = harness.parse_backends(args.backends)
    harness.check_idle(refuse=args.require_idle)
    print(
        f"T={sizes.tokens} tokens as {list(sizes.input_shape)}, d="
        f"{sizes.hidden_dim}, f={sizes.intermediate_dim} per expert, top-"
        f"{sizes.top_k}, float32; median of {args.repeats} runs "
        f"(keras-hub E=64: {min(args.repeats, args.heavy_repeats)}); "
        f"SparseMoE and dense interleaved in one process per backend, each "
        f"keras-hub layer in its own.",
        flush=True,
    )
    started = time.perf_counter()
    configs = [
        config
        for config in LAYER_CONFIGS
        if not (args.skip_keras_hub and config.kind == "keras_hub_mixtral")
    ]
    # SparseMoE and dense are interleaved in one process; each keras-hub
    # layer gets a process of its own, as its GB-sized buffers leave the
    # process (its allocator) in a state where the others run slower.
    config_groups = [[c for c in configs if not c.own_process]]
    config_groups += [[c] for c in configs if c.own_process]
    time_records, memory_records = [], []
    for backend in backends:
        for group in config_groups:
            if group:
                time_records += spawn(backend, "time", args, group)
    if not args.skip_memory:
        for backend in backends:
            memory_records += spawn(
                backend, "memory", args,
                extra_env=harness.LOW_MMAP_MALLOC_ENV,
            )

    ratio_rows = compute_ratios(time_records, backends)
    memory_rows = compute_memory_rows(time_records, memory_records, backends)
    report_times(time_records, backends)
    report_memory(memory_records, memory_rows)
    report_summary(ratio_rows, memory_rows)
    background = {}
    for record in time_records:
        background[record["backend"]] = max(
            background.get(record["backend"], 0.0),
            record["background_cores"],
        )
    harness.warn_if_busy(background)
    breakdown_records = [] if args.skip_breakdown else run_breakdown(args)
    print(f"\nTotal wall time: {time.perf_counter() - started:.0f} s")
    harness.write_json(args.json_out, {
        "sizes": dataclasses.asdict(sizes),
        "times": time_records,
        "memory": memory_records,
        "breakdown": breakdown_records,
        "ratios": ratio_rows,
        "memory_ratios": memory_rows,
    })


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default=",".join(harness.BACKENDS),
                        help="comma-separated Keras backends to run")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per configuration (median reported)")
    parser.add_argument("--heavy-repeats", type=int, default=3,
                        help="at most this many runs of keras-hub E=64")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs first (the first one compiles)")
    parser.add_argument("--breakdown-repeats", type=int, default=5,
                        help="timed runs per stage in the breakdown")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per step (default 4096, 256 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, for a smoke run")
    parser.add_argument("--skip-keras-hub", action="store_true",
                        help="leave out the keras-hub Mixtral blocks")
    parser.add_argument("--skip-memory", action="store_true",
                        help="leave out the peak-memory measurement")
    parser.add_argument("--skip-breakdown", action="store_true",
                        help="leave out the per-stage time breakdown")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time torch.compile on SparseMoE and dense")
    harness.add_json_argument(parser)
    harness.add_idle_argument(parser)
    parser.add_argument("--worker", choices=("time", "memory"),
                        dest="mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.mode is None:
        run_parent(args)
    else:
        run_worker(args)


if __name__ == "__main__":
    main()
