"""Train `mixtral_small` with its experts sharded across devices and processes.

The Keras distribution API (JAX backend) places the model on a device mesh:
`keras_moe.distribution.get_layout_map` splits every expert bank on the
expert axis, the batch splits on the batch axis, and each MoE layer routes
the tokens of its data shard locally and sends them to the devices holding
their experts with all-to-alls. The same script runs:

- on one machine with 8 virtual CPU devices (a scaling sanity check, not a
  speed test; `--cpu-devices` sets `XLA_FLAGS` before JAX starts):

      KERAS_BACKEND=jax python examples/train_distributed.py --cpu-devices 8

- as several processes, here 2 processes x 4 virtual devices on this host
  with gloo CPU collectives (run both commands, in two terminals):

      KERAS_BACKEND=jax python examples/train_distributed.py --cpu-devices 4 \\
          --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0
      KERAS_BACKEND=jax python examples/train_distributed.py --cpu-devices 4 \\
          --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1

- on a multi-GPU host or a TPU VM (a Colab TPU, a Cloud TPU slice): leave
  `--cpu-devices` out and every accelerator is used; on a multi-host TPU
  slice run the script on every host (TPU runtimes find the coordinator
  themselves, so `--num-processes` and friends can be left out there).

`--mesh` chooses the layout: `2x4` is 2 (batch) x 4 (expert), `2x2x2` adds a
model axis (attention heads and expert widths split Megatron-style), and a
single number (`8`) is one batch axis that also holds the experts (GShard's
layout: every device has its own share of the batch and of the experts; with
several processes the experts are then spread over the processes).
"""

import argparse
import os
import sys


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", default="2x4", help="2x4, 2x2x2 or 8 (see above)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--sequence-length", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--tiny", action="store_true",
        help="mixtral_small's architecture at toy sizes (for tests)",
    )
    parser.add_argument(
        "--cpu-devices", type=int, default=None,
        help="split the CPU into this many virtual devices (this process)",
    )
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--output", default=None, help="write results as JSON")
    return parser.parse_args(argv)


ARGUMENTS = parse_arguments()
# JAX reads its device count when it starts: set it before importing it.
if ARGUMENTS.cpu_devices:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={ARGUMENTS.cpu_devices}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("KERAS_BACKEND", "jax")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import presets  # noqa: E402
from keras_moe.datasets import byte_lm_arrays  # noqa: E402
from keras_moe.datasets import offline_corpus  # noqa: E402
from keras_moe.distribution import get_layout_map  # noqa: E402

TINY = dict(
    num_layers=1,
    hidden_dim=32,
    num_query_heads=4,
    num_key_value_heads=2,
    moe_intermediate_dim=48,
)


def make_distribution(mesh_text):
    """A `ModelParallel` distribution for `--mesh`."""
    shape = tuple(int(size) for size in mesh_text.split("x"))
    devices = keras.distribution.list_devices()
    if np.prod(shape) != len(devices):
        raise SystemExit(
            f"--mesh {mesh_text} needs {np.prod(shape)} devices; there are "
            f"{len(devices)}"
        )
    if len(shape) == 1:  # one axis holding the batch and the experts
        axis_names, expert_axis, model_axis = ("batch",), "batch", None
    elif len(shape) == 2:
        axis_names, expert_axis, model_axis = ("batch", "expert"), "expert", None
    else:
        axis_names = ("batch", "expert", "model")
        expert_axis, model_axis = "expert", "model"
    device_mesh = keras.distribution.DeviceMesh(shape, axis_names, devices)
    layout_map = get_layout_map(
        device_mesh, expert_axis=expert_axis, model_axis=model_axis
    )
    # Each process feeds the rows of the global batch its devices hold
    # (`local_rows`), so Keras must not shard the data again.
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
    )


def local_rows(distribution, batch_shape):
    """The rows of each global batch that this process's devices hold."""
    sharding = distribution.get_data_layout(batch_shape).backend_layout
    rows = set()
    for index in sharding.addressable_devices_indices_map(batch_shape).values():
        rows.update(range(*index[0].indices(batch_shape[0])))
    rows = sorted(rows)
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise SystemExit("this mesh gives a process non-contiguous batch rows")
    return slice(rows[0], rows[-1] + 1)


def expert_kernels(model):
    return [
        v for v in model.weights
        if v.path.endswith("_kernel") and "/experts/" in v.path
    ]


def main(arguments):
    if arguments.num_processes and arguments.num_processes > 1:
        if arguments.cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(
            job_addresses=arguments.coordinator,
            num_processes=arguments.num_processes,
            process_id=arguments.process_id,
        )
    keras.utils.set_random_seed(0)  # the same initial weights in every process
    distribution = make_distribution(arguments.mesh)
    overrides = TINY if arguments.tiny else {}
    sequence_length = arguments.sequence_length or (16 if arguments.tiny else 256)

    # The same global batches everywhere; each process feeds its own rows.
    batch_size, steps = arguments.batch_size, arguments.steps
    (x, y), _ = byte_lm_arrays(
        offline_corpus(), sequence_length, validation_split=0.0,
        max_sequences=steps * batch_size,
    )
    rows = local_rows(distribution, (batch_size, sequence_length))

    def per_process(values):
        values = values.reshape(steps, batch_size, sequence_length)[:, rows]
        return values.reshape(-1, sequence_length)

    x, y = per_process(x), per_process(y)
    inputs = {"token_ids": x, "padding_mask": np.ones_like(x)}

    with distribution.scope():
        model = presets.load("mixtral_small", preprocessor=None, **overrides)
        model.compile(optimizer=keras.optimizers.Adam(arguments.learning_rate))
        losses, step_times = [], []

        class Record(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                step_times.append(time.perf_counter() - self.start)
                losses.append(float(logs["loss"]))

        model.fit(
            inputs, y, batch_size=x.shape[0] // steps, epochs=1, shuffle=False,
            verbose=0, callbacks=[Record()],
        )

    kernels = expert_kernels(model)
    shard = kernels[0].value.addressable_shards[0]
    result = {
        "mesh": arguments.mesh,
        "num_processes": jax.process_count(),
        "process_id": jax.process_index(),
        "num_devices": jax.device_count(),
        "losses": losses,
        "step_seconds": step_times,
        "local_expert_shards": [
            list(shape)
            for shape in sorted(
                {s.data.shape for s in kernels[0].value.addressable_shards}
            )
        ],
        "expert_bytes_per_device": sum(
            k.value.addressable_shards[0].data.nbytes for k in kernels
        ),
        "expert_bytes_total": sum(int(np.prod(k.shape)) * 4 for k in kernels),
        "shard_device": str(shard.device),
    }
    print(
        f"process {result['process_id']}/{result['num_processes']}, "
        f"{result['num_devices']} devices, mesh {arguments.mesh}: "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; expert weights per device "
        f"{result['expert_bytes_per_device'] / 2**20:.2f} MiB of "
        f"{result['expert_bytes_total'] / 2**20:.2f} MiB"
    )
    if arguments.output:
        with open(arguments.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(ARGUMENTS)
    sys.exit(0)
