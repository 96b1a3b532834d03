"""Checks that turn bad constructor arguments into clear `ValueError`s.

Every message names the argument, the value received and what is allowed, so
that a user never has to decode a shape error from deep inside a backend.
"""

import numbers


def check_int(name, value, min_value=None, max_value=None):
    """Return `value` as an int, or raise if it is not an int in range."""
    allowed = "an integer"
    if min_value is not None and max_value is not None:
        allowed += f" in [{min_value}, {max_value}]"
    elif min_value is not None:
        allowed += f" >= {min_value}"
    is_int = isinstance(value, numbers.Integral) and not isinstance(
        value, bool
    )
    if (
        not is_int
        or (min_value is not None and value < min_value)
        or (max_value is not None and value > max_value)
    ):
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return int(value)


def check_optional_int(name, value, min_value=1):
    """Return None for None, else `check_int(name, value, min_value)`."""
    return None if value is None else check_int(name, value, min_value=min_value)


def check_float(name, value, *, positive=False, allow_none=False):
    """Return `value` as a float (or None when allowed), or raise."""
    if value is None and allow_none:
        return None
    allowed = "a positive number" if positive else "a non-negative number"
    if allow_none:
        allowed += " or None"
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or value != value:  # NaN is not a valid setting.
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return float(value)


def check_rate(name, value):
    """Return `value` as a float in `[0, 1)` (a dropout or noise rate), or raise.

    Example:

    >>> check_rate("dropout", 0.1)
    0.1
    """
    value = check_float(name, value)
    if value >= 1:
        raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={value!r}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return value


def check_choice(name, value, allowed):
    """Return `value` if it is one of the strings in `allowed`, or raise."""
    if not isinstance(value, str) or value not in allowed:
        options = ", ".join(repr(option) for option in allowed)
        raise ValueError(
            f"`{name}` must be one of {options}. Received: {name}={value!r}"
        )
    return value
