"""Data, expert and model parallelism through the Keras distribution API.

`get_layout_map(device_mesh, ...)` gives the `keras.distribution.LayoutMap`
that places every keras_moe weight on a `DeviceMesh`; hand it to
`keras.distribution.ModelParallel` and build the model under that
distribution (`set_distribution` or `distribution.scope()`). The MoE layers
then split their tokens into routing groups local to each data shard and send
them to the devices holding their experts with all-to-alls (see
`keras_moe.distribution.expert_parallel`).

The Keras distribution API runs on JAX. On TensorFlow, train data-parallel
with a `tf.distribute` strategy (`MirroredStrategy` on several GPUs,
`TPUStrategy` on a TPU): build and compile the model under
`strategy.scope()`; the experts are then replicated on every device.
"""

from keras_moe.distribution import expert_parallel
from keras_moe.distribution.layout_map import get_layout_map
