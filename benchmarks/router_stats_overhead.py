"""What recording router statistics adds to a training step.

Command, from the repository root:

    .venv/bin/python benchmarks/router_stats_overhead.py

Options: `--backends tensorflow,jax,torch`, `--rounds 15`, `--steps 20`,
`--quick` (tiny sizes, for a smoke run).

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
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
RESULT_PREFIX = "OVERHEAD_RESULT "
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


def make_step(model, x, y):
    """The backend's training step alone: forward, losses, gradients, SGD.

    What `fit` compiles, without its Python around each step: `jax.jit` of
    `stateless_call` (the non-trainable state, router statistics included,
    comes out of the step), an XLA-compiled `tf.function`, eager PyTorch.
    Returns a function that runs one step and waits for its result.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss_fn(trainable, non_trainable, x, y):
            outputs, non_trainable, losses = model.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            return jnp.mean(jnp.square(outputs - y)) + sum(losses), non_trainable

        @jax.jit
        def step(trainable, non_trainable, x, y):
            (loss, non_trainable), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(trainable, non_trainable, x, y)
            trainable = [v - 1e-4 * g for v, g in zip(trainable, grads)]
            return trainable, non_trainable, loss

        state = [
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        ]
        x, y = jnp.asarray(x), jnp.asarray(y)

        def run():
            state[0], state[1], loss = step(state[0], state[1], x, y)
            loss.block_until_ready()

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        x, y = tf.constant(x), tf.constant(y)

        @tf.function(jit_compile=True)
        def step():
            with tf.GradientTape() as tape:
                outputs = model(x, training=True)
                loss = tf.reduce_mean(tf.square(outputs - y)) + tf.add_n(model.losses)
            variables = model.trainable_variables
            grads = tape.gradient(loss, [v.value for v in variables])
            for variable, grad in zip(variables, grads):
                variable.assign_sub(1e-4 * grad)
            return loss

        return lambda: step().numpy()
    import torch

    x, y = torch.as_tensor(x), torch.as_tensor(y)
    parameters = [v.value for v in model.trainable_variables]

    def run():
        outputs = model(x, training=True)
        loss = torch.mean(torch.square(outputs - y)) + sum(model.losses)
        loss.backward()
        with torch.no_grad():
            for parameter in parameters:
                parameter -= 1e-4 * parameter.grad
                parameter.grad = None
        return float(loss)

    return run


def timed(function, steps):
    """`function()`'s wall and process CPU time per step, in ms."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return {
        "wall": (time.perf_counter() - wall) * 1000 / steps,
        "cpu": (time.process_time() - cpu) * 1000 / steps,
    }


def paired_rounds(runs, rounds):
    """Alternate the runs (order flipped each round); times and paired ratios."""
    record = {
        clock: {"times": {"on": [], "off": []}, "ratios": []}
        for clock in ("wall", "cpu")
    }
    for round_index in range(rounds):
        order = ("on", "off") if round_index % 2 == 0 else ("off", "on")
        this_round = {key: runs[key]() for key in order}
        for clock, entry in record.items():
            for key in order:
                entry["times"][key].append(this_round[key][clock])
            entry["ratios"].append(this_round["on"][clock] / this_round["off"][clock])
    return record


def worker(sizes, rounds, steps):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (sizes["batch"] * steps, sizes["seq_len"], sizes["hidden"])
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    models = {"on": build_model(sizes, True), "off": build_model(sizes, False)}

    def fit_step_ms(model):
        def run():
            return timed(
                lambda: model.fit(
                    x, y, batch_size=sizes["batch"], epochs=1, verbose=0,
                    shuffle=False,
                ),
                steps,
            )

        return run

    for key, model in models.items():
        history = model.fit(x, y, batch_size=sizes["batch"], epochs=1, verbose=0)
        assert ("moe_maxvio" in history.history) == (key == "on")
    result = {"fit": paired_rounds(
        {key: fit_step_ms(model) for key, model in models.items()}, rounds
    )}

    batch = slice(0, sizes["batch"])

    def compiled_step_ms(model):
        step = make_step(model, x[batch], y[batch])
        for _ in range(3):
            step()

        def run():
            def steps_in_a_row():
                for _ in range(steps):
                    step()

            return timed(steps_in_a_row, steps)

        return run

    result["step"] = paired_rounds(
        {key: compiled_step_ms(model) for key, model in models.items()}, rounds
    )
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def busy_cpu_seconds():
    """CPU time every process on the machine has used since boot."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _, _, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def single_thread_env():
    """Environment that keeps every backend's math on one thread."""
    return {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1",
    }


def run_backend(backend, args):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--rounds", str(args.rounds), "--steps", str(args.steps),
    ] + (["--quick"] if args.quick else [])
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if not args.all_threads:
        env.update(single_thread_env())
    busy_before, own_before = busy_cpu_seconds(), children_cpu_seconds()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall_s = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{backend} worker failed:\n{result.stderr[-3000:]}")
    background = max(
        0.0,
        (busy_cpu_seconds() - busy_before) - (children_cpu_seconds() - own_before),
    ) / wall_s
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):]), background
    raise SystemExit(f"{backend} worker printed no result:\n{result.stdout[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--all-threads", action="store_true",
        help="let the backends use every core (default: one thread each)",
    )
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

    threads = "every core" if args.all_threads else "one thread per backend"
    print(
        f"sizes: {sizes}, rounds: {args.rounds}, steps per sample: "
        f"{args.steps}, {threads}"
    )
    header = (
        f"{'backend':<11} {'measure':<14} {'clock':<5} {'on ms':>8} {'off ms':>8} "
        f"{'ratio of medians':>16} {'paired ratio':>12} {'paired IQR':>13}  verdict"
    )
    lines = []
    for backend in args.backends.split(","):
        record, background = run_backend(backend, args)
        for measure, label in (("fit", "model.fit step"), ("step", "compiled step")):
            for clock in ("cpu", "wall"):
                entry = record[measure][clock]
                times, ratios = entry["times"], sorted(entry["ratios"])
                on = statistics.median(times["on"])
                off = statistics.median(times["off"])
                paired = statistics.median(ratios)
                quartiles = (
                    statistics.quantiles(ratios, n=4, method="inclusive")
                    if len(ratios) > 1 else [paired] * 3
                )
                verdict = (
                    "ok" if paired < TARGET
                    else f"MISS by {100 * (paired - TARGET):.1f} pts"
                )
                lines.append(
                    f"{backend:<11} {label:<14} {clock:<5} {on:>8.2f} {off:>8.2f} "
                    f"{on / off:>16.3f} {paired:>12.3f} "
                    f"{quartiles[0]:>6.3f}-{quartiles[2]:<6.3f}  {verdict}"
                )
        lines.append(f"{'':<11} (other processes kept {background:.2f} cores busy)")
        print(f"[{backend}] done", flush=True)
    print(
        "\nTraining step with router statistics on / off (target: paired ratio "
        f"< {TARGET}; cpu = this process's CPU time, the headline on a shared "
        "machine; wall = elapsed time)"
    )
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
