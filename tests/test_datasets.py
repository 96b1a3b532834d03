"""The offline corpus and the next-byte arrays cut from it."""

import numpy as np
import pytest

from keras_moe.datasets import byte_lm_arrays
from keras_moe.datasets import offline_corpus


@pytest.fixture(scope="module")
def corpus():
    return offline_corpus()


def test_corpus_is_large_deterministic_english(corpus):
    assert isinstance(corpus, str)
    assert len(corpus) > 100_000
    assert offline_corpus() == corpus
    printable = sum(char.isprintable() or char in "\n\t" for char in corpus)
    assert printable / len(corpus) > 0.99
    letters_and_spaces = sum(char.isalpha() or char == " " for char in corpus)
    assert letters_and_spaces / len(corpus) > 0.7
    words = corpus.lower().split()
    for common_word in ["the", "of", "is", "and"]:
        assert words.count(common_word) > 500


def test_corpus_joins_the_topics_in_sorted_order(corpus):
    from pydoc_data.topics import topics

    # Each topic is found after the one before it in sorted-key order.
    position = 0
    for name in sorted(topics):
        position = corpus.find(topics[name].strip(), position)
        assert position != -1, name


def test_arrays_shapes_and_dtypes(corpus):
    num_bytes = len(corpus.encode("utf-8"))
    (x, y), (x_val, y_val) = byte_lm_arrays(
        corpus, sequence_length=64, validation_split=0.1
    )
    num_val_bytes = int(num_bytes * 0.1)
    assert x.shape == y.shape == ((num_bytes - num_val_bytes - 1) // 64, 64)
    assert x_val.shape == y_val.shape == ((num_val_bytes - 1) // 64, 64)
    for array in (x, y, x_val, y_val):
        assert array.dtype == np.int32
        assert array.min() >= 0 and array.max() <= 255


def test_targets_are_the_next_bytes():
    text = "Hello, wörld! " * 40  # Multi-byte characters count as bytes.
    raw = text.encode("utf-8")
    sequence_length = 16
    (x, y), (x_val, y_val) = byte_lm_arrays(
        text, sequence_length, validation_split=0.25
    )
    val_start = len(raw) - int(len(raw) * 0.25)
    for inputs, targets, start in [(x, y, 0), (x_val, y_val, val_start)]:
        for index in range(len(inputs)):
            begin = start + index * sequence_length
            end = begin + sequence_length
            assert bytes(inputs[index].tolist()) == raw[begin:end]
            assert bytes(targets[index].tolist()) == raw[begin + 1 : end + 1]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_validation_comes_from_the_end_without_overlap():
    # Byte `p` holds `p % 250`, so values tell where a sequence was cut.
    raw = bytes(range(250)) * 4
    (x, y), (x_val, y_val) = byte_lm_arrays(
        raw, sequence_length=10, validation_split=0.2
    )
    assert len(x) == (800 - 1) // 10 and len(x_val) == (200 - 1) // 10
    # The last training target is byte 799 at the latest; validation inputs
    # start at byte 800.
    assert x.size + 1 <= 800
    np.testing.assert_array_equal(x_val[0], np.arange(800, 810) % 250)
    np.testing.assert_array_equal(y[-1], np.arange(781, 791) % 250)


def test_no_validation_split_and_max_sequences():
    text = "abcdefghij" * 10
    (x, y), (x_val, y_val) = byte_lm_arrays(text, 8, validation_split=0)
    assert x.shape == (12, 8) and x_val.shape == y_val.shape == (0, 8)
    (x, y), (x_val, y_val) = byte_lm_arrays(
        text, 8, validation_split=0.3, max_sequences=2
    )
    assert x.shape == y.shape == x_val.shape == (2, 8)
    assert bytes(x[0].tolist()) == b"abcdefgh"
    assert bytes(x_val[0].tolist()) == text.encode()[70:78]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"text": 123}, "text"),
        ({"text": ["a", "b"]}, "text"),
        ({"text": "abc"}, "text"),  # Too short for one sequence.
        ({"sequence_length": 0}, "sequence_length"),
        ({"sequence_length": 2.5}, "sequence_length"),
        ({"sequence_length": True}, "sequence_length"),
        ({"validation_split": 1.0}, "validation_split"),
        ({"validation_split": -0.1}, "validation_split"),
        ({"validation_split": "0.1"}, "validation_split"),
        ({"validation_split": float("nan")}, "validation_split"),
        ({"max_sequences": 0}, "max_sequences"),
        ({"max_sequences": 1.5}, "max_sequences"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, argument):
    arguments = {"text": "some text " * 20, "sequence_length": 8}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        byte_lm_arrays(**arguments)


def test_too_short_for_validation_names_the_text():
    with pytest.raises(ValueError, match="`text` is too short"):
        byte_lm_arrays("x" * 100, 16, validation_split=0.1)
