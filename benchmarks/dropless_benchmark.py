"""Dropless `SparseMoE` against the capacity-1.0 step: time, compile, memory.

Command, from the repository root:

    .venv/bin/python benchmarks/dropless_benchmark.py

Options: `--backends tensorflow,jax` (PyTorch too if named), `--repeats 7`,
`--tokens 4096`, `--quick` (tiny sizes, a smoke run), `--skip-memory`,
`--skip-buffers` (leave out the dropless-buffers rows, the slowest),
`--json-out FILE`.

Workload: the forward+backward step of `sparse_moe_benchmark.py`
(`harness.gradient_step`: TensorFlow `jit_compile`, `jax.jit`, eager
PyTorch) on `T = 4096` tokens, `d = 512`, `f = 1024`, top-2, for `E = 8` and
`E = 64`, with:

- capacity factor 1.0 (per-expert buffers of `T k / E` slots), the target's
  yardstick, and 1.25 with buffers and with the grouped tiles (the
  `E = 64 / E = 8` question);
- dropless (`capacity_factor=None`) with the default `expert_kernel="auto"`
  (the grouped matmul), on the balanced routing random weights give and on
  skewed routing, where the busiest expert gets twice the mean load (its
  selection bias raised until it does);
- dropless with `expert_kernel="buffers"` (per-expert buffers of all `T`
  tokens, the cost before the grouped matmul) for reference.

Repetitions of all configurations are interleaved (round-robin). The first
call's time (trace, compile, one step) is reported as compile time. Peak
memory weights aside is measured in a separate subprocess per backend as in
`sparse_moe_benchmark.py` (peak RSS growth during a step minus the weight
gradients; TensorFlow: its allocator's peak).
"""

import argparse
import dataclasses
import gc
import os
import sys
import time

import harness


@dataclasses.dataclass(frozen=True)
class Config:
    key: str
    num_experts: int
    capacity_factor: float = None
    expert_kernel: str = "auto"
    skewed: bool = False


def _configs(skip_buffers):
    configs = []
    for experts in (8, 64):
        configs += [
            Config(f"e{experts}_cf1", experts, 1.0),
            Config(f"e{experts}_cf1.25", experts, 1.25),
            Config(f"e{experts}_cf1.25_tiles", experts, 1.25, "tiles"),
            Config(f"e{experts}_dropless", experts),
            Config(f"e{experts}_dropless_skewed", experts, skewed=True),
        ]
        if not skip_buffers:
            configs.append(Config(f"e{experts}_dropless_buffers", experts, None, "buffers"))
    return configs


RATIOS = (
    harness.Ratio("dropless / cf=1.0, E=8", "e8_dropless", "e8_cf1", "<=", 1.3,
                  ("tensorflow", "jax")),
    harness.Ratio("dropless / cf=1.0, E=64", "e64_dropless", "e64_cf1", "<=", 1.5,
                  ("tensorflow", "jax")),
    harness.Ratio("dropless skewed / cf=1.0, E=8", "e8_dropless_skewed", "e8_cf1",
                  "<=", 1.6, ("tensorflow", "jax")),
    harness.Ratio("dropless skewed / cf=1.0, E=64", "e64_dropless_skewed",
                  "e64_cf1", "<=", 1.6, ("tensorflow", "jax")),
    harness.Ratio("cf=1.25 E=64 / E=8 (buffers)", "e64_cf1.25", "e8_cf1.25",
                  "<=", 1.10, ("tensorflow", "jax")),
    harness.Ratio("cf=1.25 E=64 / E=8 (tiles)", "e64_cf1.25_tiles",
                  "e8_cf1.25_tiles"),
    harness.Ratio("dropless buffers / cf=1.0, E=8", "e8_dropless_buffers", "e8_cf1"),
    harness.Ratio("dropless buffers / cf=1.0, E=64", "e64_dropless_buffers",
                  "e64_cf1"),
)


def build_layer(config, sizes, inputs):
    """The `SparseMoE` of `config`, skewed if asked, from the shared seed."""
    import keras
    import numpy as np

    import keras_moe

    keras.utils.set_random_seed(harness.SEED)
    layer = keras_moe.layers.SparseMoE(
        num_experts=config.num_experts,
        intermediate_dim=sizes.intermediate_dim,
        top_k=sizes.top_k,
        capacity_factor=config.capacity_factor,
        expert_kernel=config.expert_kernel,
        # A (vanishingly slow) selection bias: how the skew is set.
        bias_update_rate=1e-12 if config.skewed else 0.0,
    )
    layer.build(sizes.input_shape)
    if config.skewed:
        offset = _skew_offset(layer, inputs, target=2.0)
        bias = np.zeros(config.num_experts, "float32")
        bias[0] = offset
        layer.router.expert_bias.assign(bias)
    return layer


def busiest_over_mean(layer, inputs):
    """The busiest expert's load over the mean load, for `inputs`."""
    import numpy as np
    from keras import ops

    tokens = ops.reshape(inputs, (1, -1, inputs.shape[-1]))
    decision = layer.router.route(tokens, capacity=None)
    counts = ops.convert_to_numpy(decision.plan.expert_counts)[0]
    return float(counts.max() / np.mean(counts))


def _skew_offset(layer, inputs, target):
    """The selection bias of expert 0 that makes it `target` x the mean load."""
    import numpy as np

    low, high = 0.0, 1.0
    bias = np.zeros(layer.num_experts, "float32")
    for _ in range(30):
        middle = (low + high) / 2
        bias[0] = middle
        layer.router.expert_bias.assign(bias)
        if busiest_over_mean(layer, inputs) < target:
            low = middle
        else:
            high = middle
    return high


def time_worker(backend, sizes, args):
    inputs = harness.make_inputs(sizes)
    runs, records = {}, {}
    for config in _configs(args.skip_buffers):
        layer = build_layer(config, sizes, inputs)
        start = time.perf_counter()
        step = harness.gradient_step(backend, layer, inputs)
        step.run()
        first_call_s = time.perf_counter() - start
        harness.warm_up(step.run, args.warmup)
        print(f"  {config.key}: first call {first_call_s:.1f} s", flush=True)
        runs[config.key] = step.run
        records[config.key] = {
            "kind": "time",
            "config": config.key,
            "label": config.key,
            "first_call_s": first_call_s,
            "busiest_over_mean": busiest_over_mean(layer, inputs),
        }
    rounds = harness.time_rounds(runs, args.repeats, alternate=True)
    for key, record in records.items():
        record["times_ms"] = rounds.wall_ms[key]
        record["median_ms"] = rounds.median(key)
        record["cpu_median_ms"] = rounds.median(key, clock="cpu")
        harness.emit(record)


def memory_worker(backend, sizes, args):
    inputs = harness.make_inputs(sizes)
    for config in _configs(args.skip_buffers):
        layer = build_layer(config, sizes, inputs)
        step = harness.gradient_step(backend, layer, inputs)
        harness.warm_up(step.run, args.warmup)
        weight_bytes = harness.variable_bytes(layer.trainable_variables)
        measured = harness.min_step_memory(backend, step.run)
        peak = measured.get(
            "allocator_peak_growth_bytes", measured["peak_rss_growth_bytes"]
        )
        harness.emit({
            "kind": "memory",
            "config": config.key,
            # The weight gradients are the step's outputs, not its working set.
            "peak_bytes_weights_aside": peak - weight_bytes,
        })
        del step, layer
        gc.collect()


def run_parent(args):
    backends = harness.parse_backends(args.backends)
    sizes = harness.sizes_for(args.quick, args.tokens)
    print(f"Sizes: {sizes}; {args.repeats} interleaved repetitions", flush=True)
    results = {}
    common = ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    common += ["--tokens", str(sizes.tokens)] + (["--quick"] if args.quick else [])
    common += ["--skip-buffers"] if args.skip_buffers else []
    for backend in backends:
        run = harness.spawn_worker(
            __file__, ["--worker", "time", *common], backend
        )
        records = {r["config"]: r for r in run.records}
        if not args.skip_memory:
            memory_run = harness.spawn_worker(
                __file__, ["--worker", "memory", *common], backend,
                label=f"{backend} memory", extra_env=harness.LOW_MMAP_MALLOC_ENV,
            )
            for record in memory_run.records:
                records[record["config"]]["peak_bytes_weights_aside"] = record[
                    "peak_bytes_weights_aside"
                ]
        results[backend] = {"records": records,
                            "background_cores": run.background_cores}
    report(results, backends)
    if args.json_out:
        harness.write_json(args.json_out, {"sizes": dataclasses.asdict(sizes),
                                           "results": results})


def report(results, backends):
    rows = []
    for backend in backends:
        records = results[backend]["records"]
        for key, record in records.items():
            yardstick = records[f"e{key.split('_')[0][1:]}_cf1"]
            memory = record.get("peak_bytes_weights_aside")
            base_memory = yardstick.get("peak_bytes_weights_aside")
            rows.append([
                backend, key, f"{record['median_ms']:.1f}",
                f"{record['median_ms'] / yardstick['median_ms']:.2f}",
                f"{record['first_call_s']:.1f}",
                f"{record['first_call_s'] / yardstick['first_call_s']:.2f}",
                "-" if memory is None else harness.mib(memory),
                "-" if not memory or not base_memory else f"{memory / base_memory:.2f}",
                f"{record['busiest_over_mean']:.2f}",
                f"{record['cpu_median_ms'] / yardstick['cpu_median_ms']:.2f}",
            ])
    print(harness.format_table(
        ["backend", "config", "median ms", "x cf1.0", "first call s",
         "x cf1.0", "peak MiB w/o weights", "x cf1.0", "busiest/mean", "CPU ms x cf1.0"],
        rows,
    ))
    ratio_rows = []
    for ratio in RATIOS:
        for backend in backends:
            records = results[backend]["records"]
            if ratio.numerator not in records or ratio.denominator not in records:
                continue
            value = (records[ratio.numerator]["median_ms"]
                     / records[ratio.denominator]["median_ms"])
            ratio_rows.append([ratio.label, backend, f"{value:.2f}",
                               ratio.target, ratio.verdict(value, backend)])
    print(harness.format_table(
        ["ratio", "backend", "value", "target", "verdict"], ratio_rows
    ))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-buffers", action="store_true")
    parser.add_argument("--worker", choices=("time", "memory"), default=None,
                        help=argparse.SUPPRESS)
    harness.add_json_argument(parser)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.worker is None:
        run_parent(args)
        return
    sizes = harness.sizes_for(args.quick, args.tokens)
    backend = os.environ["KERAS_BACKEND"]
    worker = time_worker if args.worker == "time" else memory_worker
    worker(backend, sizes, args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
