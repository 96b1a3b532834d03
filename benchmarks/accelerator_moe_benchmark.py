"""The dropless expert kernels side by side on a GPU or TPU, in bfloat16.

Command, from the repository root, on a machine with an accelerator:

    .venv/bin/python benchmarks/accelerator_moe_benchmark.py --json-out accelerator.json

Options: `--backends jax,torch`, `--repeats 20`, `--tokens 16384`,
`--experts 8 64`, `--dtype bfloat16`, `--quick` (tiny sizes: a smoke run that
works on CPU too), `--json-out FILE`.

Workload: one `SparseMoE` forward+backward step (`harness.gradient_step`:
`jax.jit`, eager PyTorch), `d = 1024`, `f = 2048`, top-2, dropless
(`capacity_factor=None`), under the `dtype` policy, with every expert kernel
the backend has: JAX `"buffers"` (per-expert buffers of every token),
`"tiles"` (the portable tile loop) and `"ragged_dot"`; PyTorch `"buffers"`,
`"tiles"` (one matmul per expert) and `"grouped_mm"`; and, as the yardstick,
capacity factor 1.0 on buffers. Kernels are interleaved round by round; the
report gives the median step, the ratio to the capacity-1.0 step, and the
first call (compile) time, and the JSON holds every time and the device.
"""

import argparse
import os
import sys
import time

import harness

KERNELS = {
    "jax": ("buffers", "tiles", "ragged_dot"),
    "torch": ("buffers", "tiles", "grouped_mm"),
    "tensorflow": ("buffers", "tiles"),
}


def device_name(backend):
    if backend == "jax":
        import jax

        return str(jax.devices()[0])
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return "cpu"
    return "cpu"


def worker(args):
    import keras

    import keras_moe

    backend = keras.backend.backend()
    keras.config.set_dtype_policy(args.dtype)
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.set_default_device("cuda")
    rng_inputs = harness.make_inputs(
        harness.Sizes(args.tokens, min(args.tokens, 1024), args.hidden_dim,
                      args.intermediate_dim, 2)
    )
    for num_experts in args.experts:
        runs, records = {}, {}
        candidates = [("cf1", 1.0, "buffers")] + [
            (kernel, None, kernel) for kernel in KERNELS[backend]
        ]
        for key, capacity_factor, kernel in candidates:
            keras.utils.set_random_seed(harness.SEED)
            try:
                layer = keras_moe.layers.SparseMoE(
                    num_experts, args.intermediate_dim, top_k=2,
                    capacity_factor=capacity_factor, expert_kernel=kernel,
                )
                layer.build(rng_inputs.shape)
                start = time.perf_counter()
                step = harness.gradient_step(backend, layer, rng_inputs)
                step.run()
                first_call_s = time.perf_counter() - start
                harness.warm_up(step.run, 2)
            except Exception as error:  # reported; the other kernels still run
                harness.emit({"kind": "error", "experts": num_experts,
                              "kernel": key, "error": repr(error)[:400]})
                continue
            runs[key] = step.run
            records[key] = {"kind": "time", "experts": num_experts,
                            "kernel": key, "first_call_s": first_call_s,
                            "device": device_name(backend), "dtype": args.dtype}
        rounds = harness.time_rounds(runs, args.repeats, alternate=True)
        for key, record in records.items():
            record["times_ms"] = rounds.wall_ms[key]
            record["median_ms"] = rounds.median(key)
            harness.emit(record)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--intermediate-dim", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    harness.add_json_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.hidden_dim, args.intermediate_dim = 256, 64, 128
        args.repeats, args.experts = 3, [8]
    if args.worker:
        worker(args)
        sys.stdout.flush()
        return
    worker_args = ["--worker", "--repeats", str(args.repeats), "--tokens",
                   str(args.tokens), "--hidden-dim", str(args.hidden_dim),
                   "--intermediate-dim", str(args.intermediate_dim),
                   "--dtype", args.dtype, "--experts",
                   *map(str, args.experts)]
    rows, results = [], []
    for backend in harness.parse_backends(args.backends):
        run = harness.spawn_worker(__file__, worker_args, backend, check=False)
        records = [r for r in run.records if r["kind"] == "time"]
        results += run.records
        for record in records:
            yardstick = next(
                (r for r in records
                 if r["experts"] == record["experts"] and r["kernel"] == "cf1"),
                None,
            )
            ratio = record["median_ms"] / yardstick["median_ms"] if yardstick else None
            rows.append([backend, record["device"], record["experts"],
                         record["kernel"], f"{record['median_ms']:.2f}",
                         "-" if ratio is None else f"{ratio:.2f}",
                         f"{record['first_call_s']:.1f}"])
        for record in run.records:
            if record["kind"] == "error":
                print(f"[{backend}] {record['kernel']} E={record['experts']}: "
                      f"{record['error']}")
    print(harness.format_table(
        ["backend", "device", "experts", "kernel", "median ms", "x cf1.0",
         "first call s"], rows))
    if args.json_out:
        harness.write_json(args.json_out, {"records": results,
                                           "argv": sys.argv[1:],
                                           "pid": os.getpid()})


if __name__ == "__main__":
    main()
