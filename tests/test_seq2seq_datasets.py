"""The span-corruption objective and the date translation task."""

import datetime
import re

import numpy as np
import pytest

from keras_moe.datasets import corrupt_spans
from keras_moe.datasets import date_translation_pairs
from keras_moe.datasets import random_spans_noise_mask
from keras_moe.datasets import span_corruption_arrays


SENTINELS = list(range(1000, 1100))


def spans_of(mask):
    """The lengths of the runs of True in a bool array."""
    runs = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)


def uncorrupt(inputs, targets):
    """The original sequence, from inputs and targets (a reference decoder)."""
    spans, current = {}, None
    for token in targets:
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    restored = []
    for token in inputs:
        restored.extend(spans[token] if token in SENTINELS else [token])
    return restored


@pytest.mark.parametrize("length", [2, 7, 64, 512])
@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.5, 1.0), (0.3, 8.0)])
def test_noise_mask_hides_the_documented_number_of_tokens(length, density, mean_span):
    mask = random_spans_noise_mask(length, density, mean_span, seed=length)
    expected_noise = min(max(round(length * density), 1), length - 1)
    assert mask.sum() == expected_noise
    assert not mask[0]
    expected_spans = min(
        max(round(expected_noise / mean_span), 1), expected_noise, length - expected_noise
    )
    assert len(spans_of(mask)) == expected_spans


def test_noise_spans_have_the_mean_length_asked_for():
    lengths = np.concatenate(
        [spans_of(random_spans_noise_mask(512, 0.15, 3.0, seed=seed)) for seed in range(50)]
    )
    assert abs(lengths.mean() - 3.0) < 0.1
    assert lengths.min() >= 1 and lengths.max() > 3


def test_noise_mask_is_reproducible_and_varies_with_the_seed():
    first = random_spans_noise_mask(100, seed=3)
    np.testing.assert_array_equal(first, random_spans_noise_mask(100, seed=3))
    assert not np.array_equal(first, random_spans_noise_mask(100, seed=4))


def test_corrupted_inputs_and_targets_restore_the_sequence():
    rng = np.random.default_rng(0)
    for seed in range(20):
        tokens = rng.integers(0, 256, size=40)
        mask = random_spans_noise_mask(40, 0.3, 2.5, seed=seed)
        inputs, targets = corrupt_spans(tokens, mask, SENTINELS)
        assert uncorrupt(inputs.tolist(), targets.tolist()) == tokens.tolist()
        num_spans = len(spans_of(mask))
        # One sentinel per span in the inputs; the targets end on one more.
        assert np.isin(inputs, SENTINELS).sum() == num_spans
        assert np.isin(targets, SENTINELS).sum() == num_spans + 1
        assert targets[-1] == SENTINELS[num_spans]
        assert len(inputs) == 40 - mask.sum() + num_spans


def test_span_corruption_arrays_pad_each_example():
    stream = np.random.default_rng(1).integers(1, 256, size=1000)
    data = span_corruption_arrays(stream, 50, SENTINELS, num_sequences=6, seed=2)
    assert set(data) == {
        "encoder_token_ids", "encoder_padding_mask",
        "decoder_token_ids", "decoder_padding_mask",
    }
    for row in range(6):
        inputs = data["encoder_token_ids"][row][data["encoder_padding_mask"][row]]
        targets = data["decoder_token_ids"][row][data["decoder_padding_mask"][row]]
        assert uncorrupt(inputs.tolist(), targets.tolist()) == stream[
            row * 50 : (row + 1) * 50
        ].tolist()
        # Padding is one suffix of pad ids.
        assert (data["encoder_token_ids"][row][~data["encoder_padding_mask"][row]] == 0).all()
    assert data["encoder_token_ids"].dtype == np.int32


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: random_spans_noise_mask(10, noise_density=1.5), "noise_density"),
        (lambda: random_spans_noise_mask(10, mean_noise_span_length=0.5), "mean_noise_span_length"),
        (lambda: random_spans_noise_mask(1), "length"),
        (lambda: corrupt_spans(np.arange(6), np.array([0, 1, 0, 1, 0, 1], bool), [7, 8]), "sentinel_ids"),
        (lambda: corrupt_spans(np.arange(6), np.zeros(5, bool), SENTINELS), "noise_mask"),
        (lambda: span_corruption_arrays(np.arange(30), 10, SENTINELS, num_sequences=4), "num_sequences"),
    ],
)
def test_bad_arguments_are_named(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def parse_written_date(text):
    """A reference reader of the written forms, through `strptime`."""
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", text)
    text = re.sub(r"^the (\d+) of ", r"\1 ", text).replace(".", "")
    for form in ("%B %d, %Y", "%d %b %Y", "%A, %B %d, %Y", "%m/%d/%Y",
                 "%d %B, %Y", "%a %d %B %Y", "%b %d %Y"):
        try:
            return datetime.datetime.strptime(text, form).date()
        except ValueError:
            continue
    raise AssertionError(f"unreadable date {text!r}")


def test_date_pairs_source_and_target_are_the_same_date():
    pairs = date_translation_pairs(300, seed=5)
    forms = set()
    for source, target in pairs:
        assert parse_written_date(source).isoformat() == target
        forms.add(re.sub(r"\d", "0", source)[:4])
    assert len(forms) >= 5
    assert date_translation_pairs(300, seed=5) == pairs
    with pytest.raises(ValueError, match="num_examples"):
        date_translation_pairs(0)
