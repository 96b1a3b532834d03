"""Balancing changes behaviour, not only numbers: collapse and its two cures.

Runs the experiment of benchmarks/router_balance.py, shortened: on skewed
inputs a router without balancing piles the tokens onto few experts, and the
Switch loss or aux-loss-free bias balancing each keep the load even.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

import router_balance  # noqa: E402
from script_backends import runs_on  # noqa: E402


@runs_on("tensorflow")
def test_balancing_prevents_router_collapse():
    maxvio = {
        variant: router_balance.run(variant, steps=120, seed=0)[1]
        for variant in router_balance.VARIANTS
    }
    # Full collapse onto top_k of 8 experts is MaxVio = 3.
    assert maxvio["none"] > 2.0, maxvio
    assert maxvio["switch_loss"] < 0.5 * maxvio["none"], maxvio
    assert maxvio["bias_balancing"] < 0.25 * maxvio["none"], maxvio
