"""English prose that every CPython installation already holds."""


def offline_corpus():
    """Return Python's reference documentation topics as one English text.

    The text is the `pydoc_data.topics.topics` dictionary that CPython ships
    for `help()`: the language reference's pages on statements, expressions,
    the data model, and so on (about 0.5 MB of English prose with some code,
    depending on the Python version). It needs no download, so examples and
    tests that train a language model run on machines without internet
    access. The topics are joined in sorted-key order, separated by blank
    lines, so the result is the same on every call for a given Python.

    Returns:
        A `str` of several hundred thousand characters.

    Raises:
        RuntimeError: if this Python was built without `pydoc_data` (some
            minimal distributions strip it) or its topics are empty.

    Example:

    >>> from keras_moe.datasets import offline_corpus
    >>> text = offline_corpus()
    >>> len(text) > 100_000
    True
    >>> "statement" in text
    True
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise RuntimeError(
            "`offline_corpus()` reads `pydoc_data.topics`, the help() topics "
            "that CPython ships, but this Python does not include them. Pass "
            "your own text instead."
        ) from error
    if not topics:
        raise RuntimeError(
            "`offline_corpus()` found `pydoc_data.topics.topics` empty. Pass "
            "your own text instead."
        )
    return "\n\n".join(topics[name].strip("\n") for name in sorted(topics))
