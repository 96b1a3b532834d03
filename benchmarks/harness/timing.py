"""Timing: warm-up, side-by-side rounds, medians and spread, paired ratios.

Candidates that are compared are timed in the same process, in rounds: each
round calls every candidate once, so a disturbance on the machine hits them
all alike, and the ratio of two candidates can be taken within each round
(paired), which cancels the drift of a shared machine.
"""

import dataclasses
import statistics
import time


def warm_up(run, times):
    """Call `run()` `times` times (the first one compiles); return seconds."""
    start = time.perf_counter()
    for _ in range(times):
        run()
    return time.perf_counter() - start


@dataclasses.dataclass
class Rounds:
    """Milliseconds per call of each candidate, one entry per round.

    Attributes:
        wall_ms: dict key -> wall milliseconds per round.
        cpu_ms: dict key -> this process's CPU milliseconds per round (all
            its threads): the work done, even when others compete for the
            cores.
    """

    wall_ms: dict
    cpu_ms: dict

    def times(self, clock="wall"):
        return self.wall_ms if clock == "wall" else self.cpu_ms

    def median(self, key, clock="wall"):
        return statistics.median(self.times(clock)[key])

    def medians(self, clock="wall"):
        return {key: statistics.median(values)
                for key, values in self.times(clock).items()}

    def paired_ratios(self, numerator, denominator, clock="wall"):
        """`numerator / denominator` within each round both ran in."""
        times = self.times(clock)
        return [a / b for a, b in zip(times[numerator], times[denominator])]


def time_rounds(runs, repeats, alternate=False, calls_per_run=1):
    """Time candidates side by side: each round calls every candidate once.

    Args:
        runs: dict key -> callable; each returns once its results exist.
        repeats: rounds, an int or a dict key -> rounds (a candidate with
            fewer rounds sits out the last ones).
        alternate: reverse the order of the candidates every other round,
            so that none always runs first.
        calls_per_run: units of work one call does (e.g. training steps);
            times are reported per unit.

    Returns:
        `Rounds`.
    """
    if isinstance(repeats, int):
        repeats = {key: repeats for key in runs}
    rounds = Rounds({key: [] for key in runs}, {key: [] for key in runs})
    for round_index in range(max(repeats.values(), default=0)):
        keys = list(runs)
        if alternate and round_index % 2:
            keys.reverse()
        for key in keys:
            if round_index >= repeats[key]:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            runs[key]()
            rounds.wall_ms[key].append(
                (time.perf_counter() - wall) * 1e3 / calls_per_run
            )
            rounds.cpu_ms[key].append(
                (time.process_time() - cpu) * 1e3 / calls_per_run
            )
    return rounds


def median_ms(run, warmup, repeats):
    """Median wall milliseconds of `run()` after `warmup` calls."""
    warm_up(run, warmup)
    return time_rounds({"run": run}, repeats).median("run")


def quartiles(values):
    """(first quartile, median, third quartile) of `values`."""
    if len(values) < 2:
        middle = statistics.median(values)
        return middle, middle, middle
    return tuple(statistics.quantiles(values, n=4, method="inclusive"))


def meets(value, comparison, bound):
    """Whether `value comparison bound` holds, `comparison` "<=" or ">="."""
    return value <= bound if comparison == "<=" else value >= bound
