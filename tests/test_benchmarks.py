"""The benchmark scripts keep running (tiny sizes; timings are not checked),
and their shared harness does what the scripts rely on."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

from script_backends import runs_on

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402


def run_script(name, *arguments):
    """Run `benchmarks/<name>` on this backend; return its stdout."""
    backend = keras.backend.backend()
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *arguments],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@runs_on("tensorflow")
def test_benchmark_smoke_run_prints_every_ratio(tmp_path):
    backend = keras.backend.backend()
    json_path = tmp_path / "results.json"
    stdout = run_script(
        "sparse_moe_benchmark.py", "--quick", "--backends", backend,
        "--repeats", "1", "--skip-memory", "--skip-breakdown",
        "--json-out", str(json_path),
    )
    for ratio in (
        "SparseMoE E=64 / E=8 (cf 1.25)",
        "SparseMoE E=8 cf=1.25 / dense",
        "SparseMoE E=8 cf=1.0 / dense",
        "keras-hub E=8 / SparseMoE E=8 cf=1.25",
        "keras-hub E=64 / SparseMoE E=64 cf=1.25",
    ):
        assert ratio in stdout, ratio
    records = json.loads(json_path.read_text())
    assert {r["config"] for r in records["times"]} >= {"sparse_e8", "dense"}


@runs_on("tensorflow")
def test_breakdown_smoke_run_prints_every_stage():
    backend = keras.backend.backend()
    stdout = run_script(
        "sparse_moe_breakdown.py", "--quick", "--backends", backend,
        "--repeats", "1", "--warmup", "1",
    )
    for stage in ("router", "dispatch plan", "experts", "combine",
                  "load-balancing loss", "whole step (wall)"):
        assert stage in stdout, stage
    if backend == "jax":  # the profiled column attributes ops to stages
        assert "in the whole step (profiler)" in stdout


@runs_on("jax")
def test_layers_benchmark_smoke_run_prints_every_ratio():
    backend = keras.backend.backend()
    stdout = run_script(
        "moe_layers_benchmark.py", "--quick", "--backends", backend,
        "--repeats", "1",
    )
    for ratio in (
        "expert choice / SparseMoE",
        "HierarchicalMoE / SparseMoE",
        "SharedExpertMoE / (SparseMoE + FeedForward)",
        "SoftMoE / SparseMoE",
    ):
        assert ratio in stdout, ratio


@runs_on("tensorflow")
def test_dropless_benchmark_smoke_run_reports_every_target():
    backend = keras.backend.backend()
    stdout = run_script(
        "dropless_benchmark.py", "--quick", "--backends", backend,
        "--repeats", "1", "--skip-memory", "--skip-buffers",
    )
    for ratio in (
        "dropless / cf=1.0, E=8", "dropless / cf=1.0, E=64",
        "dropless skewed / cf=1.0, E=8", "cf=1.25 E=64 / E=8 (buffers)",
    ):
        assert ratio in stdout, ratio
    # The skewed rows really are skewed: the busiest expert at twice the mean.
    skewed = [
        line.split() for line in stdout.splitlines()
        if line.startswith(backend) and "dropless_skewed" in line
    ]
    assert skewed and all(abs(float(row[-2]) - 2.0) < 0.2 for row in skewed), skewed


@runs_on("jax")
def test_accelerator_benchmark_smoke_run_times_every_kernel(tmp_path):
    json_path = tmp_path / "accelerator.json"
    stdout = run_script(
        "accelerator_moe_benchmark.py", "--quick", "--backends", "jax",
        "--dtype", "float32", "--json-out", str(json_path),
    )
    records = json.loads(json_path.read_text())["records"]
    timed = {record["kind"] == "time" and record["kernel"] for record in records}
    assert timed - {False} == {"cf1", "buffers", "tiles", "ragged_dot"}, stdout


# Compiling three models' training steps takes minutes under XLA: smoke-run
# this one eagerly.
@runs_on("torch")
def test_model_benchmark_smoke_run_reports_speedups():
    backend = keras.backend.backend()
    stdout = run_script(
        "mixtral_model_benchmark.py", "--quick", "--backends", backend,
        "--repeats", "1", "--experts", "4",
    )
    assert "speed-up cf1.25" in stdout
    rows = [line.split() for line in stdout.splitlines()]
    assert any(row[:2] == [backend, "4"] for row in rows), stdout[-2000:]


@runs_on("torch")
def test_quantization_benchmark_smoke_run_reports_every_mode():
    stdout = run_script("quantization_benchmark.py", "--quick")
    for preset in ("mixtral_small", "deepseek_small"):
        assert f"\n{preset} (" in stdout, preset
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    modes = [row.split("|")[1].strip() for row in rows]
    for mode in ("float32", "int8", "float8", "int4"):
        assert any(m.startswith(mode) for m in modes), (mode, modes)
    # Every quantized row reports int8 experts at least 3.5x smaller, and
    # int4 (packed, a scale per group of 128 input rows) at least 7x.
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        if cells[0].startswith("int8"):
            assert float(cells[3].rstrip("x")) >= 3.5, row
        if cells[0].startswith("int4"):
            assert float(cells[3].rstrip("x")) >= 7, row


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="profiles a jitted JAX step"
)
def test_breakdown_attributes_jax_ops_to_every_stage():
    import sparse_moe_breakdown as breakdown

    sizes = harness.sizes_for(quick=True)
    layer = breakdown.build_layer(8, 1.25, sizes)
    step = harness.gradient_step("jax", layer, harness.make_inputs(sizes))
    stages = harness.profile.hlo_instruction_stages(
        step.compiled.as_text(), breakdown.STAGE_OF_FUNCTION, "keras_moe",
        breakdown.OUTSIDE_STAGE,
    )
    # Each stage's function names are still those of keras_moe.
    for stage in (breakdown.ROUTER_STAGE, breakdown.PLAN_STAGE,
                  breakdown.DISPATCH_STAGE, breakdown.EXPERTS_STAGE,
                  breakdown.COMBINE_STAGE, breakdown.AUX_LOSS_STAGE):
        assert stage in stages.values(), stage


def test_rounds_interleave_candidates_and_pair_their_ratios():
    calls = []
    runs = {key: (lambda key=key: calls.append(key)) for key in "ab"}
    rounds = harness.time_rounds(runs, {"a": 3, "b": 2}, alternate=True)
    # Round-robin, the order reversed every other round; "b" sits out the
    # last round.
    assert calls == ["a", "b", "b", "a", "a"]
    assert [len(rounds.wall_ms[key]) for key in "ab"] == [3, 2]
    assert len(rounds.paired_ratios("a", "b")) == 2
    assert set(rounds.medians("cpu")) == {"a", "b"}


def test_ratio_targets_and_verdicts():
    ratio = harness.Ratio("a / b", "a", "b", "<=", 1.1, ("jax",))
    assert ratio.target == "<= 1.1"
    assert ratio.value({"a": 2.0, "b": 4.0}) == 0.5
    assert ratio.value({"a": 2.0}) is None
    assert ratio.verdict(0.5, "jax") == "PASS"
    assert ratio.verdict(1.5, "jax") == "MISS"
    assert ratio.verdict(1.5, "torch") == "report"
    assert harness.Ratio("a / b", "a", "b").verdict(1.5) == "-"
    assert harness.quartiles([1.0]) == (1.0, 1.0, 1.0)
    assert harness.quartiles([1.0, 2.0, 3.0])[1] == 2.0


def test_tables():
    table = harness.format_table(("name", "ms"), [("a", "1.0"), ("bb", "10.0")])
    assert table.splitlines() == [
        "name    ms", "----  ----", "a      1.0", "bb    10.0",
    ]
    assert harness.markdown_table(("mode", "MiB"), [("int8", "6.08")]) == (
        "| mode | MiB |\n|---|---|\n| int8 | 6.08 |"
    )


def test_busy_machine_is_refused_on_request():
    with harness.OtherCpuLoad(own="self") as load:
        pass
    assert load.cores >= 0.0
    # Any load is "busy" against a negative bound.
    with pytest.raises(SystemExit, match="Refusing to run"):
        harness.check_idle(refuse=True, sample_s=0.01, busy_cores=-1.0)
