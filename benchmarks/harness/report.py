"""Reporting: ratio targets, tables and JSON output."""

import dataclasses
import json

from harness.timing import meets


@dataclasses.dataclass(frozen=True)
class Ratio:
    """`time(numerator) / time(denominator)`, optionally against a bound.

    Attributes:
        label: what the table prints.
        numerator, denominator: keys of the timed candidates.
        comparison: "<=" or ">=" (None: reported without a target).
        bound: the target.
        backends: where the target applies (None: every backend); on the
            others the ratio is reported.
    """

    label: str
    numerator: str
    denominator: str
    comparison: str = None
    bound: float = None
    backends: tuple = None

    @property
    def target(self):
        return "-" if self.bound is None else f"{self.comparison} {self.bound:g}"

    def value(self, medians):
        """The ratio of two medians (dict key -> ms), None if one is missing."""
        if self.numerator not in medians or self.denominator not in medians:
            return None
        return medians[self.numerator] / medians[self.denominator]

    def verdict(self, value, backend=None):
        """PASS or MISS; "report" where the target does not apply; "-"."""
        if self.bound is None:
            return "-"
        if self.backends is not None and backend not in self.backends:
            return "report"
        return "PASS" if meets(value, self.comparison, self.bound) else "MISS"


def format_table(headers, rows):
    """A plain-text table: first column left-aligned, the others right."""
    widths = [
        max(len(str(cell)) for cell in column)
        for column in zip(headers, *rows)
    ]

    def line(cells):
        return "  ".join(
            str(cell).ljust(width) if index == 0 else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        )

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), separator] + [line(row) for row in rows])


def markdown_table(headers, rows):
    """A Markdown table, ready to paste into BENCHMARKS.md."""
    lines = ["| " + " | ".join(str(cell) for cell in headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def mib(num_bytes):
    """Bytes as MiB text with one decimal."""
    return f"{num_bytes / 2**20:.1f}"


def add_json_argument(parser):
    """The `--json-out FILE` flag."""
    parser.add_argument("--json-out", default=None,
                        help="write every record to this JSON file")


def write_json(path, payload):
    """Write `payload` to `path` as JSON (nothing when `path` is None)."""
    if path:
        with open(path, "w") as json_file:
            json.dump(payload, json_file, indent=1)
