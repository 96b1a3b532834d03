"""keras-moe: Mixture-of-Experts layers, models and presets for Keras 3."""

from keras_moe import callbacks
from keras_moe import config
from keras_moe import convert
from keras_moe import datasets
from keras_moe import distribution
from keras_moe import layers
from keras_moe import models
from keras_moe import ops
from keras_moe import presets

__version__ = "0.1.0"
