# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Distributed training: data and expert parallelism
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/distributed_training.ipynb)
#
# A MoE model's parameters grow with its number of experts while its compute
# per token does not, so large MoE models run out of memory long before
# they run out of compute. *Expert parallelism* splits the experts over
# devices: each device holds `E / n` experts, and tokens travel to the
# devices holding their experts and back (two all-to-alls per MoE layer)
# instead of weights travelling to the tokens.
#
# keras-moe does this with the Keras distribution API:
#
# - `keras.distribution.DeviceMesh`: the devices, arranged on named axes
#   (`("batch", "expert")`, ...);
# - `keras_moe.distribution.get_layout_map(mesh, ...)`: where each weight
#   lives on that mesh (experts split on the expert axis; optionally
#   attention heads and expert widths on a model axis);
# - `keras.distribution.ModelParallel(layout_map=..., batch_dim_name="batch")`:
#   build and train the model under it, with the usual `fit`.
#
# The Keras distribution API runs on JAX. This guide runs the multi-device
# part on 8 *virtual* CPU devices (any machine, including a CPU Colab) and
# explains what changes on a Colab TPU, a multi-GPU host and several hosts.
# A few minutes on a CPU.

# %%
# Install keras-moe when it is missing, as on a fresh Colab runtime.
# keras-moe is not on PyPI yet: it installs from its Git repository (use the
# URL of your fork or checkout if you work from one). In a local checkout
# with `pip install -e .` done, this cell does nothing.
import importlib.util
import subprocess
import sys

KERAS_MOE_SOURCE = "git+https://github.com/keras-moe/keras-moe"
if importlib.util.find_spec("keras_moe") is None:
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q", KERAS_MOE_SOURCE]
    )

# %%
import os

# The Keras distribution API runs on JAX.
os.environ["KERAS_BACKEND"] = "jax"

import keras

from keras_moe import presets
from keras_moe.distribution import get_layout_map

# The tests run every guide with KERAS_MOE_GUIDE_FAST=1: fewer steps, a
# tiny model.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
print("Keras backend:", keras.backend.backend())
print("Devices in this process:", keras.distribution.list_devices())

# %% [markdown]
# ## Where the weights go
#
# A layout map depends only on the mesh's axis names and sizes, so it can be
# inspected without the devices: here a `2 x 4` mesh, 2-way data parallel
# (`batch`) times 4-way expert parallel (`expert`), and a `mixtral_small`
# built on this one device to list its weights. Each weight shows the mesh
# axis each of its dimensions is split on (`None`: not split); weights the
# map does not list (routers, norms) are replicated on every device.

# %%
device_names = [f"cpu:{i}" for i in range(8)]
mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "expert"), device_names)
layout_map = get_layout_map(mesh)

model = presets.load(
    "mixtral_small", preprocessor=None, num_layers=1, hidden_dim=64,
    moe_intermediate_dim=64,
)
for variable in model.weights:
    layout = layout_map[variable.path]
    placement = layout.axes if layout is not None else "replicated"
    print(f"{variable.path:<50} {str(tuple(variable.shape)):<14} {placement}")

# %% [markdown]
# The expert kernels `[E, d, f]` split their first axis over the 4 devices
# of the `expert` axis: each device holds 2 of the 8 experts (and the two
# rows of the `batch` axis each hold a copy). Everything else is replicated,
# as in plain data parallelism. With a third, `model`, axis
# (`get_layout_map(mesh, model_axis="model")`), attention heads, dense
# feed-forward layers and each expert's hidden width also split
# (Megatron-style tensor parallelism):

# %%
mesh_3d = keras.distribution.DeviceMesh(
    (2, 2, 2), ("batch", "expert", "model"), device_names
)
layout_map_3d = get_layout_map(mesh_3d, model_axis="model")
for path in ("decoder_block_0/moe/experts/up_kernel",
             "decoder_block_0/moe/experts/down_kernel",
             "decoder_block_0/attention/query/kernel",
             "decoder_block_0/moe/router/kernel"):
    layout = layout_map_3d[path]
    print(f"{path:<50} {layout.axes if layout is not None else 'replicated'}")

# %% [markdown]
# ## Training on 8 devices
#
# JAX fixes its devices when it starts, and this notebook's JAX has already
# started with one CPU device. So the multi-device run goes into a script,
# run in a fresh process. On a CPU it gets 8 virtual devices from
# `XLA_FLAGS=--xla_force_host_platform_device_count=8`: the same program, the
# same shardings and collectives as on 8 accelerators, just not faster
# (they share this machine's cores). On a TPU or multi-GPU runtime the
# script uses the real devices instead.
#
# The script trains the same small model, from the same initial weights on
# the same batches, three ways, and prints the losses:
#
# 1. on one device, no distribution;
# 2. data parallel: `keras.distribution.DataParallel`, every device a copy of
#    the model and an eighth of each batch;
# 3. expert parallel on the `2 x 4` mesh, through `get_layout_map`.
#
# The MoE layers route *dropless* here (`capacity_factor=None`). Under a
# distribution each data shard routes its own tokens (capacity is per
# shard, as in GShard), so with a capacity limit the dropped tokens, and the
# losses, differ slightly between layouts; dropless routing gives the same
# result on any layout, which makes the runs comparable.

# %%
SCRIPT = r'''
import contextlib
import os

import keras
import numpy as np

from keras_moe import presets
from keras_moe.datasets import byte_lm_arrays
from keras_moe.datasets import offline_corpus
from keras_moe.distribution import get_layout_map

FAST = os.environ.get("KERAS_MOE_GUIDE_FAST") == "1"
STEPS = 3 if FAST else 20
SEQUENCE_LENGTH = 16 if FAST else 64
BATCH_SIZE = 8
OVERRIDES = dict(num_layers=2, moe_options={"capacity_factor": None})
if FAST:
    OVERRIDES.update(num_layers=1, hidden_dim=32, moe_intermediate_dim=32)

devices = keras.distribution.list_devices()
print(f"{len(devices)} devices:", ", ".join(devices))
(x, y), _ = byte_lm_arrays(
    offline_corpus(), SEQUENCE_LENGTH, validation_split=0.0,
    max_sequences=STEPS * BATCH_SIZE,
)
inputs = {"token_ids": x, "padding_mask": np.ones_like(x)}


class StepLosses(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def train(distribution):
    keras.utils.set_random_seed(0)  # The same initial weights every time.
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        model = presets.load("mixtral_small", preprocessor=None, **OVERRIDES)
        model.compile(
            optimizer=keras.optimizers.Adam(2e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        step_losses = StepLosses()
        model.fit(inputs, y, batch_size=BATCH_SIZE, epochs=1, shuffle=False,
                  verbose=0, callbacks=[step_losses])
    return model, np.array(step_losses.losses)


# Expert axis: up to 4 devices (mixtral_small has 8 experts per layer).
expert_size = 4 if len(devices) % 4 == 0 else 2 if len(devices) % 2 == 0 else 1
mesh = keras.distribution.DeviceMesh(
    (len(devices) // expert_size, expert_size), ("batch", "expert"), devices
)
layouts = {
    "one device": None,
    "data parallel": keras.distribution.DataParallel(devices=devices),
    f"expert parallel {mesh.shape[0]}x{mesh.shape[1]}":
        keras.distribution.ModelParallel(
            layout_map=get_layout_map(mesh), batch_dim_name="batch"
        ),
}
results = {name: train(distribution) for name, distribution in layouts.items()}
reference = results["one device"][1]
for name, (model, losses) in results.items():
    difference = np.abs(losses - reference).max()
    print(f"{name:>22}: loss per step {np.round(losses, 4)}, "
          f"max difference from one device {difference:.1e}")

model = results[list(layouts)[-1]][0]
kernel = next(v for v in model.weights if v.path.endswith("experts/up_kernel"))
print(f"\n{kernel.path} {tuple(kernel.shape)} on the expert-parallel mesh:")
for shard in kernel.value.addressable_shards:
    experts = shard.index[0]
    print(f"  {shard.device}: experts {experts.start}-{experts.stop - 1}, "
          f"a {tuple(shard.data.shape)} block")
'''

with open("distributed_demo.py", "w") as file:
    file.write(SCRIPT)

# %% [markdown]
# Run it: with 8 virtual CPU devices when this runtime has no accelerator,
# on the accelerators otherwise. (On the command line:
# `XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax
# python distributed_demo.py`.)

# %%
environment = dict(os.environ, KERAS_BACKEND="jax")
on_cpu = all(d.startswith("cpu") for d in keras.distribution.list_devices())
if on_cpu:
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8"
    )
    environment["JAX_PLATFORMS"] = "cpu"
run = subprocess.run(
    [sys.executable, "distributed_demo.py"],
    env=environment, capture_output=True, text=True,
)
print(run.stdout)
if run.returncode != 0:
    print(run.stderr[-3000:])
    raise RuntimeError("distributed_demo.py failed")

# %% [markdown]
# The three runs compute the same losses, up to the order of floating-point
# sums across devices. In the expert-parallel run every device holds two of
# the 8 experts of each layer (a quarter of the expert weights), and the
# two halves of the batch axis hold the same experts.
#
# What happens inside each MoE layer under the mesh: the tokens are split
# into routing groups, one per data shard; each device routes its own group
# (sorting, capacity and gathers stay local), the dispatch buffers
# `[groups, experts, capacity, d]` move from group-sharded to
# expert-sharded (an all-to-all), each device runs its own experts, and a
# second all-to-all brings the results back
# (`keras_moe.distribution.expert_parallel`).
#
# ## On real hardware
#
# **Colab TPU.** Choose *Runtime > Change runtime type > TPU*. JAX sees the
# TPU cores (`keras.distribution.list_devices()` lists them), and the code
# above runs as it is: the script uses them, or run the training code
# directly in the notebook. Pick mesh axes whose product is the number of
# cores and an expert axis that divides the number of experts. TPUs need
# static shapes: keep whole batches (`drop_remainder=True` in a `tf.data`
# pipeline).
#
# **Several GPUs on one host.** The same: `list_devices()` returns the GPUs,
# build the mesh over them, and train under the distribution.
#
# **Several hosts** (a TPU pod slice, a GPU cluster). Run the same program
# on every host, and before anything else call
#
# ```python
# keras.distribution.initialize()  # TPU pods find their peers themselves
# # elsewhere: initialize(job_addresses="10.0.0.1:1234", num_processes=2,
# #                       process_id=0)  # 1 on the second host
# ```
#
# The mesh then spans every host's devices, and each process feeds the rows
# of the global batch that its devices hold. `examples/train_distributed.py`
# does all of this, and runs as 2 processes x 4 virtual CPU devices on one
# machine to try it out:
#
# ```bash
# KERAS_BACKEND=jax python examples/train_distributed.py --cpu-devices 4 \
#     --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0
# KERAS_BACKEND=jax python examples/train_distributed.py --cpu-devices 4 \
#     --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1
# ```
#
# **TensorFlow.** The Keras distribution API is JAX-only; on TensorFlow,
# train data parallel with a `tf.distribute` strategy (the experts are then
# replicated on every device, and each replica routes its share of the
# batch):
#
# ```python
# import tensorflow as tf
# strategy = tf.distribute.MirroredStrategy()  # every local GPU
# # TPU: resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
# #      tf.config.experimental_connect_to_cluster(resolver)
# #      tf.tpu.experimental.initialize_tpu_system(resolver)
# #      strategy = tf.distribute.TPUStrategy(resolver)
# with strategy.scope():
#     model = keras_moe.presets.load("mixtral_small")
#     model.compile(optimizer="adam")
# model.fit(texts, batch_size=8 * strategy.num_replicas_in_sync)
# ```
#
# **Checkpoints** saved under a distribution (`model.save`,
# `save_to_preset`) hold whole weights, and load on any layout or on one
# device.
