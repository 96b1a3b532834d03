"""Data, expert and model parallelism through the Keras distribution API.

`get_layout_map(device_mesh, ...)` gives the `keras.distribution.LayoutMap`
that places every keras_moe weight on a `DeviceMesh`; hand it to
`keras.distribution.ModelParallel` and build the model under that
distribution (`set_distribution` or `distribution.scope()`):

```python
import keras
import keras_moe

mesh = keras.distribution.DeviceMesh(
    (2, 4), ("batch", "expert"), keras.distribution.list_devices())
distribution = keras.distribution.ModelParallel(
    layout_map=keras_moe.distribution.get_layout_map(mesh),
    batch_dim_name="batch")
with distribution.scope():
    model = keras_moe.presets.load("mixtral_small")
    model.compile(optimizer="adam")
    model.fit(texts, batch_size=8)
```

The MoE layers then split their tokens into routing groups local to each
data shard and send them to the devices holding their experts with
all-to-alls (`keras_moe.distribution.expert_parallel`); capacity is per group.
The same code runs on a multi-GPU host, a TPU VM or a TPU pod slice (call
`keras.distribution.initialize()` first on several hosts), or on virtual CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`);
`examples/train_distributed.py` runs it in one or several processes.

The Keras distribution API runs on JAX. On TensorFlow, train data-parallel
with a `tf.distribute` strategy; experts are then replicated on every device
and each replica routes its own share of the batch:

```python
import tensorflow as tf

strategy = tf.distribute.MirroredStrategy()  # every local GPU
# On a TPU (Colab, Cloud TPU VM):
# resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
# tf.config.experimental_connect_to_cluster(resolver)
# tf.tpu.experimental.initialize_tpu_system(resolver)
# strategy = tf.distribute.TPUStrategy(resolver)
with strategy.scope():
    model = keras_moe.presets.load("mixtral_small")
    model.compile(optimizer="adam")
model.fit(texts, batch_size=8 * strategy.num_replicas_in_sync)
```

On TPUs, shapes must be static: keep whole batches (a `tf.data` pipeline with
`drop_remainder=True`); dropless routing then sizes its buffers by the bound.

A batch axis of `n` devices splits every batch into `n` equal shards.
`MoECausalLM` pads the batches it makes to a multiple of `n`
(`keras_moe.distribution.batch_padding`): `generate()` (a single prompt
too) and `predict()` on arrays or text with copies of the last row, whose
outputs are dropped; `fit` and `evaluate` with rows of sample weight 0, the
loss and gradients staying those of the real rows. A dataset given to
`predict` must have batches that divide, or a ValueError says so.
"""

from keras_moe.distribution import batch_padding
from keras_moe.distribution import expert_parallel
from keras_moe.distribution.layout_map import get_layout_map
