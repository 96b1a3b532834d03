"""What recording router statistics adds to a training step.

Command, from the repository root:

    .venv/bin/python benchmarks/router_stats_overhead.py

Options: `--backends tensorflow,jax,torch`, `--rounds 15`, `--steps 20`,
`--quick` (tiny sizes, for a smoke run), `--all-threads`, `--json-out FILE`,
`--require-idle`.

Workload: a small MoE model trained with `model.fit` as a user would run it
(default compilation of each backend: XLA on TensorFlow and JAX, eager
PyTorch), inputs `[16, 64, 128]` (1024 tokens of d=128), `Dense(128)`, two
residual `SparseMoE` layers (8 SwiGLU experts of f=256, top-2, capacity
factor 1.25, aux loss 0.01), `Dense(128)`, MSE loss, Adam. Two copies of the
model with the same weights differ only in `track_router_stats` (True: every
training step records the statistics and `fit` logs the compact set; False:
nothing). Two measures, each in rounds that alternate the two models (the
order flips every round):
- `model.fit step`: one `fit` epoch of `--steps` steps, its wall time over
  its steps, so it includes what `fit` does around the compiled step (and,
  on PyTorch, the metric's `result()` every step);
- `compiled step`: the backend's training step alone (forward, losses,
  gradients, an SGD update; `jax.jit` of `stateless_call` returning the
  non-trainable state, XLA `tf.function`, eager PyTorch), `--steps` calls.
Reported, for the process's CPU time and for wall time: the median step time
of each model, and the median over rounds of the paired ratio on / off
(pairing cancels the drift of a shared machine). Target: the paired ratio
under 1.03. Each backend runs in its own subprocess with its math on one
thread (`--all-threads` to lift that), so that the CPU time measures the
work done even when other processes compete for the cores: wall time on a
busy machine mostly measures the competition. The CPU time other processes
took meanwhile is measured from /proc/stat and reported.
"""

import argparse
import os
import statistics

import harness

TARGET = 1.03
FULL_SIZES = dict(batch=16, seq_len=64, hidden=128, experts=8, intermediate=256)
QUICK_SIZES = dict(batch=4, seq_len=8, hidden=16, experts=4, intermediate=16)


def build_model(sizes, track):
    import keras

    from keras_moe.layers import SparseMoE

    keras.utils.set_random_seed(0)
    inputs = keras.Input((sizes["seq_len"], sizes["hidden"]))
    hidden = keras.layers.Dense(sizes["hidden"])(inputs)
    for _ in range(2):
        hidden = hidden + SparseMoE(
            sizes["experts"],
            sizes["intermediate"],
            top_k=2,
            capacity_factor=1.25,
            track_router_stats=track,
        )(hidden)
    outputs = keras.layers.Dense(sizes["hidden"])(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def worker(sizes, rounds, steps):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (sizes["batch"] * steps, sizes["seq_len"], sizes["hidden"])
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    models = {"on": build_model(sizes, True), "off": build_model(sizes, False)}

    def fit_epoch(model):
        return lambda: model.fit(
            x, y, batch_size=sizes["batch"], epochs=1, verbose=0, shuffle=False
        )

    for key, model in models.items():
        history = model.fit(x, y, batch_size=sizes["batch"], epochs=1, verbose=0)
        assert ("moe_maxvio" in history.history) == (key == "on")
    measures = {"fit": harness.time_rounds(
        {key: fit_epoch(model) for key, model in models.items()}, rounds,
        alternate=True, calls_per_run=steps,
    )}

    batch = slice(0, sizes["batch"])

    def compiled_steps(model):
        step = harness.sgd_step(
            keras.backend.backend(), model, x[batch], y[batch]
        )
        harness.warm_up(step, 3)
        return lambda: [step() for _ in range(steps)]

    measures["step"] = harness.time_rounds(
        {key: compiled_steps(model) for key, model in models.items()}, rounds,
        alternate=True, calls_per_run=steps,
    )
    harness.emit({
        measure: {
            clock: {
                "times": rounds.times(clock),
                "ratios": rounds.paired_ratios("on", "off", clock),
            }
            for clock in ("wall", "cpu")
        }
        for measure, rounds in measures.items()
    })


def run_backend(backend, args):
    worker_args = ["--worker", "--rounds", str(args.rounds), "--steps", str(args.steps)]
    worker_args += ["--quick"] if args.quick else []
    extra_env = None if args.all_threads else harness.single_thread_env()
    run = harness.spawn_worker(__file__, worker_args, backend, extra_env=extra_env)
    if not run.records:
        raise SystemExit(f"{backend} worker printed no result")
    return run.records[0], run.background_cores


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(harness.BACKENDS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--all-threads", action="store_true",
        help="let the backends use every core (default: one thread each)",
    )
    harness.add_json_argument(parser)
    harness.add_idle_argument(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.worker:
        if os.environ.get("OMP_NUM_THREADS") == "1":
            import torch

            torch.set_num_threads(1)
            torch.set_num_interop_threads(1)
        worker(sizes, args.rounds, args.steps)
        return

    harness.check_idle(refuse=args.require_idle)
    threads = "every core" if args.all_threads else "one thread per backend"
    print(
        f"sizes: {sizes}, rounds: {args.rounds}, steps per sample: "
        f"{args.steps}, {threads}"
    )
    header = (
        f"{'backend':<11} {'measure':<14} {'clock':<5} {'on ms':>8} {'off ms':>8} "
        f"{'ratio of medians':>16} {'paired ratio':>12} {'paired IQR':>13}  verdict"
    )
    lines, results, background = [], {}, {}
    for backend in harness.parse_backends(args.backends):
        record, background[backend] = run_backend(backend, args)
        results[backend] = {}
        for measure, label in (("fit", "model.fit step"), ("step", "compiled step")):
            for clock in ("cpu", "wall"):
                entry = record[measure][clock]
                times, ratios = entry["times"], entry["ratios"]
                on = statistics.median(times["on"])
                off = statistics.median(times["off"])
                low, paired, high = harness.quartiles(ratios)
                verdict = (
                    "ok" if paired < TARGET
                    else f"MISS by {100 * (paired - TARGET):.1f} pts"
                )
                lines.append(
                    f"{backend:<11} {label:<14} {clock:<5} {on:>8.2f} {off:>8.2f} "
                    f"{on / off:>16.3f} {paired:>12.3f} "
                    f"{low:>6.3f}-{high:<6.3f}  {verdict}"
                )
                results[backend][f"{measure} {clock}"] = {
                    "on_ms": on, "off_ms": off, "paired_ratios": ratios,
                }
        lines.append(
            f"{'':<11} (other processes kept {background[backend]:.2f} cores busy)"
        )
    print(
        "\nTraining step with router statistics on / off (target: paired ratio "
        f"< {TARGET}; cpu = this process's CPU time, the headline on a shared "
        "machine; wall = elapsed time)"
    )
    print(header)
    print("\n".join(lines))
    harness.warn_if_busy(background)
    harness.write_json(args.json_out, {
        "sizes": sizes, "results": results, "background_cores": background,
    })


if __name__ == "__main__":
    main()
