"""Rules of the package's layout that no single behaviour test would see."""

import re
from pathlib import Path

from testing import backend_independent

PACKAGE = Path(__file__).resolve().parents[1] / "keras_moe"
PRIVATE_KERAS = re.compile(r"^\s*(from|import)\s+keras\.src\b", re.MULTILINE)


@backend_independent
def test_private_keras_modules_are_reached_through_one_file():
    # A Keras upgrade that moves its internals must break one file only.
    importers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if PRIVATE_KERAS.search(path.read_text(encoding="utf-8"))
    )
    assert importers == ["backend/keras_internals.py"]
