"""The benchmark script keeps running (tiny sizes; timings are not checked)."""

import os
import pathlib
import subprocess
import sys

import keras

from script_backends import runs_on

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "sparse_moe_benchmark.py"


@runs_on("tensorflow")
def test_benchmark_smoke_run_prints_every_ratio():
    backend = keras.backend.backend()
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--backends",
            backend,
            "--repeats",
            "1",
            "--skip-memory",
            "--skip-breakdown",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for ratio in (
        "SparseMoE E=64 / E=8 (cf 1.25)",
        "SparseMoE E=8 cf=1.25 / dense",
        "SparseMoE E=8 cf=1.0 / dense",
        "keras-hub E=8 / SparseMoE E=8 cf=1.25",
        "keras-hub E=64 / SparseMoE E=64 cf=1.25",
    ):
        assert ratio in result.stdout, ratio


@runs_on("jax")
def test_layers_benchmark_smoke_run_prints_every_ratio():
    backend = keras.backend.backend()
    script = SCRIPT.parent / "moe_layers_benchmark.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--backends", backend, "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for ratio in (
        "expert choice / SparseMoE",
        "HierarchicalMoE / SparseMoE",
        "SharedExpertMoE / (SparseMoE + FeedForward)",
        "SoftMoE / SparseMoE",
    ):
        assert ratio in result.stdout, ratio


# Compiling three models' training steps takes minutes under XLA: smoke-run
# this one eagerly.
@runs_on("torch")
def test_model_benchmark_smoke_run_reports_speedups():
    backend = keras.backend.backend()
    script = SCRIPT.parent / "mixtral_model_benchmark.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--backends", backend,
         "--repeats", "1", "--experts", "4"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "speed-up cf1.25" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()]
    assert any(row[:2] == [backend, "4"] for row in rows), result.stdout[-2000:]


@runs_on("torch")
def test_quantization_benchmark_smoke_run_reports_every_mode():
    script = SCRIPT.parent / "quantization_benchmark.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for preset in ("mixtral_small", "deepseek_small"):
        assert f"\n{preset} (" in result.stdout, preset
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    modes = [row.split("|")[1].strip() for row in rows]
    for mode in ("float32", "int8", "float8"):
        assert any(m.startswith(mode) for m in modes), (mode, modes)
    # Every quantized row reports int8 experts at least 3.5x smaller.
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        if cells[0].startswith("int8"):
            assert float(cells[3].rstrip("x")) >= 3.5, row
