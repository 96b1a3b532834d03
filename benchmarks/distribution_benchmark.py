"""Training step time of `mixtral_small` on 1, 2, 4 and 8 devices, and the
bytes of expert weights each device holds.

Command, from the repository root:

    .venv/bin/python benchmarks/distribution_benchmark.py

Options: `--steps 10` (timed steps per configuration), `--quick` (a toy
model and 2 steps, a smoke run), `--json-out FILE`, `--require-idle`.

The process splits the CPU into 8 virtual JAX devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before JAX
starts) and trains the `mixtral_small` preset (4 layers, d=256, 8 experts of
width 512, top-2, capacity factor 1.25; batch 8 x 256 tokens, Adam) under:

- 1 device: no distribution (one routing group, the single-device path);
- n = 2, 4, 8 devices: a 1-D mesh `("batch",)` over the first n devices,
  experts split on that axis (`get_layout_map(mesh, expert_axis="batch")`,
  GShard's layout): each device holds 8 / n experts and 1 / n of the batch;
- 8 devices as 2 (batch) x 4 (expert).

Every model starts from the same seed. Each configuration is compiled and
warmed up first; then the timed steps of all configurations are interleaved
(round-robin), so a disturbance on the machine hits them alike, and the
median is reported. The CPU time other processes take meanwhile is read from
/proc/stat and reported.

Virtual CPU devices share the same cores: n devices do the same arithmetic
as one, plus the all-to-alls and gradient reductions, so this is a scaling
sanity check (the layouts run, and what each device holds falls as 1/n), not
a speed claim. On accelerators (a multi-GPU host, a TPU slice) the same code
spreads the work over real devices.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import presets  # noqa: E402
from keras_moe.distribution import get_layout_map  # noqa: E402

import harness  # noqa: E402

QUICK = dict(num_layers=1, hidden_dim=32, moe_intermediate_dim=48)


def configurations():
    devices = keras.distribution.list_devices()
    yield "1 device", 1, None
    for n in (2, 4, 8):
        mesh = keras.distribution.DeviceMesh((n,), ("batch",), devices[:n])
        layout_map = get_layout_map(mesh, expert_axis="batch")
        yield f"{n} devices, batch=expert axis", n, keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "expert"), devices)
    yield "8 devices, 2 batch x 4 expert", 4, keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh), batch_dim_name="batch"
    )


class Scope:
    """`distribution.scope()`, or nothing for the one-device baseline."""

    def __init__(self, distribution):
        self.distribution = distribution

    def __enter__(self):
        if self.distribution is not None:
            self.context = self.distribution.scope()
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.distribution is not None:
            self.context.__exit__(*exc)


def bytes_on_device_0(variables):
    total = 0
    for variable in variables:
        for shard in variable.value.addressable_shards:
            if shard.device.id == 0:
                total += shard.data.nbytes
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    harness.add_json_argument(parser)
    harness.add_idle_argument(parser)
    arguments = parser.parse_args()
    harness.check_idle(refuse=arguments.require_idle)
    overrides = QUICK if arguments.quick else {}
    steps = 2 if arguments.quick else arguments.steps
    preset_training = presets.info("mixtral_small")["training"]
    batch_size = preset_training["batch_size"]
    sequence_length = 16 if arguments.quick else preset_training["sequence_length"]

    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, 256, size=(batch_size, sequence_length + 1))
    x = {
        "token_ids": token_ids[:, :-1].astype("int32"),
        "padding_mask": np.ones((batch_size, sequence_length), "int32"),
    }
    y = token_ids[:, 1:].astype("int32")

    runs = []
    for name, expert_shards, distribution in configurations():
        with Scope(distribution):
            keras.utils.set_random_seed(0)
            model = presets.load("mixtral_small", preprocessor=None, **overrides)
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
            start = time.perf_counter()
            model.train_on_batch(x, y)  # compiles
            compile_seconds = time.perf_counter() - start
            model.train_on_batch(x, y)
        experts = [v for v in model.weights if "/experts/" in v.path]
        runs.append(
            {
                "name": name,
                "model": model,
                "scope": Scope(distribution),
                "compile_seconds": compile_seconds,
                "expert_bytes_total": harness.variable_bytes(experts),
                "expert_bytes_per_device": bytes_on_device_0(experts),
                "weight_bytes_per_device": bytes_on_device_0(model.weights),
                "expected_expert_fraction": 1 / expert_shards,
            }
        )
        print(f"compiled {name} in {compile_seconds:.1f} s", flush=True)

    def timed_step(run):
        def step():
            with run["scope"]:
                jax.block_until_ready(run["model"].train_on_batch(x, y))

        return step

    with harness.OtherCpuLoad(own="self") as load:
        rounds = harness.time_rounds(
            {run["name"]: timed_step(run) for run in runs}, steps
        )
    for run in runs:
        run["step_seconds"] = [ms / 1e3 for ms in rounds.wall_ms[run["name"]]]
    cores = os.cpu_count()
    wall, other_cpu = load.wall_s, load.core_seconds

    baseline = statistics.median(runs[0]["step_seconds"])
    print(
        f"\nmixtral_small{' (quick)' if arguments.quick else ''}, batch "
        f"{batch_size} x {sequence_length} tokens, {steps} timed steps each; "
        f"{platform.processor() or platform.machine()}, {cores} cores, "
        f"jax {jax.__version__}, keras {keras.__version__}"
    )
    print(
        f"{'configuration':34} {'step (s)':>9} {'vs 1':>6} "
        f"{'experts/device':>15} {'fraction':>9} {'all weights/device':>19}"
    )
    results = []
    for run in runs:
        step = statistics.median(run["step_seconds"])
        fraction = run["expert_bytes_per_device"] / run["expert_bytes_total"]
        print(
            f"{run['name']:34} {step:9.3f} {step / baseline:6.2f} "
            f"{run['expert_bytes_per_device'] / 2**20:11.2f} MiB "
            f"{fraction:9.3f} {run['weight_bytes_per_device'] / 2**20:15.2f} MiB"
        )
        assert abs(fraction - run["expected_expert_fraction"]) < 1e-9, run["name"]
        results.append(
            {
                key: run[key]
                for key in (
                    "name", "compile_seconds", "step_seconds", "expert_bytes_total",
                    "expert_bytes_per_device", "weight_bytes_per_device",
                )
            }
            | {"median_step_seconds": step}
        )
    print(
        f"CPU taken by other processes while timing: {other_cpu:.1f} core-seconds "
        f"over {wall:.1f} s wall ({100 * other_cpu / (wall * cores):.0f}% of "
        f"the {cores} cores)"
    )
    harness.write_json(
        arguments.json_out,
        {"runs": results, "other_cpu_core_seconds": other_cpu, "wall": wall},
    )


if __name__ == "__main__":
    main()
