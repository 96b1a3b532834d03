"""A small offline sequence-to-sequence task: dates written by people -> ISO.

Each example is a random date between 1900 and 2099 written in one of
several everyday formats ("Tuesday, March 5, 2024", "5 Mar 2024",
"03/05/2024", "the 5th of March, 2024", ...) as the source, and the same
date as `YYYY-MM-DD` as the target. Python's `datetime` and `calendar`
modules write both, so the data needs no download. A model must learn to
read month names, ordinals and field orders and to drop the weekday: a
real, if small, translation task whose exact-match accuracy is easy to
read.
"""

import calendar
import datetime

import numpy as np

from keras_moe.utils.argument_validation import check_int

_FIRST_DAY = datetime.date(1900, 1, 1).toordinal()
_LAST_DAY = datetime.date(2099, 12, 31).toordinal()


def _ordinal(day):
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


# Every format takes a date and returns the text people would write.
DATE_FORMATS = (
    lambda d: f"{calendar.month_name[d.month]} {d.day}, {d.year}",
    lambda d: f"{d.day} {calendar.month_abbr[d.month]} {d.year}",
    lambda d: f"{calendar.day_name[d.weekday()]}, {calendar.month_name[d.month]} {d.day}, {d.year}",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",
    lambda d: f"the {_ordinal(d.day)} of {calendar.month_name[d.month]}, {d.year}",
    lambda d: f"{calendar.day_abbr[d.weekday()]} {d.day} {calendar.month_name[d.month].lower()} {d.year}",
    lambda d: f"{calendar.month_abbr[d.month]}. {_ordinal(d.day)} {d.year}",
)


def date_translation_pairs(num_examples, seed=0):
    """Random (written date, ISO date) string pairs.

    Args:
        num_examples: int >= 1, how many pairs.
        seed: int, the random seed; the same seed gives the same pairs.

    Returns:
        A list of `(source, target)` tuples of str.

    Example:

    >>> pairs = date_translation_pairs(3, seed=1)
    >>> len(pairs)
    3
    >>> all(len(target) == 10 and target[4] == "-" for _, target in pairs)
    True
    """
    num_examples = check_int("num_examples", num_examples, min_value=1)
    rng = np.random.default_rng(seed)
    days = rng.integers(_FIRST_DAY, _LAST_DAY + 1, size=num_examples)
    formats = rng.integers(0, len(DATE_FORMATS), size=num_examples)
    pairs = []
    for day, form in zip(days, formats):
        date = datetime.date.fromordinal(int(day))
        pairs.append((DATE_FORMATS[form](date), date.isoformat()))
    return pairs
