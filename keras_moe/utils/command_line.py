"""Argument types for the command lines of the examples and benchmarks.

Each is an `argparse` `type=`: it converts the string and rejects values
outside its range with `argparse.ArgumentTypeError`, which argparse reports
as a usage error naming the option, e.g.
`error: argument --steps: must be >= 1, got 0`.

Example:

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> _ = parser.add_argument("--steps", type=positive_int, default=10)
>>> parser.parse_args(["--steps", "3"]).steps
3
"""

import argparse


def _number_type(convert, is_allowed, allowed):
    def parse(value):
        number = convert(value)
        # Written as "not allowed" so that NaN, which compares False with
        # everything, is rejected too.
        if not is_allowed(number):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return number

    parse.__name__ = convert.__name__  # "invalid int value: ..."
    return parse


positive_int = _number_type(int, lambda n: n >= 1, ">= 1")
positive_int.__doc__ = "An integer >= 1."
non_negative_int = _number_type(int, lambda n: n >= 0, ">= 0")
non_negative_int.__doc__ = "An integer >= 0."
positive_float = _number_type(float, lambda x: x > 0, "> 0")
positive_float.__doc__ = "A float > 0 (not NaN)."
non_negative_float = _number_type(float, lambda x: x >= 0, ">= 0")
non_negative_float.__doc__ = "A float >= 0 (not NaN)."
fraction = _number_type(float, lambda x: 0 < x < 1, "in (0, 1)")
fraction.__doc__ = "A float strictly between 0 and 1."
