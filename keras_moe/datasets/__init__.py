"""Small offline data sets for examples, tests and quick experiments."""

from keras_moe.datasets.byte_language_modeling import byte_lm_arrays
from keras_moe.datasets.corpus import offline_corpus
