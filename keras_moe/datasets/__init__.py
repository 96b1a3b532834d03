"""Small offline data sets for examples, tests and quick experiments."""

from keras_moe.datasets.byte_language_modeling import byte_lm_arrays
from keras_moe.datasets.corpus import offline_corpus
from keras_moe.datasets.span_corruption import corrupt_spans
from keras_moe.datasets.span_corruption import random_spans_noise_mask
from keras_moe.datasets.span_corruption import span_corruption_arrays
from keras_moe.datasets.date_translation import date_translation_pairs
