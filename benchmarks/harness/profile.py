"""Where the time of a whole jitted JAX step goes, by source function.

Timed alone, the parts of a step miss the fusion XLA does across them, so
the whole step is profiled (`jax.profiler`) and the time of each XLA op is
attributed to the Python function that produced it, from the stack XLA
records for every op (backward ops get the stack of the forward op they
differentiate).
"""

import glob
import gzip
import json
import re
import tempfile
import time


def hlo_instruction_stages(hlo_text, stage_of_function, package, outside):
    """Map each instruction of compiled HLO text to the stage it comes from.

    XLA keeps the Python stack of every op in the module's FileNames,
    FunctionNames, FileLocations and StackFrames tables; the innermost
    function of `package` named in `stage_of_function` names the stage.

    Args:
        hlo_text: `compiled.as_text()`.
        stage_of_function: dict function name (e.g. `"Experts.call"`) ->
            stage name.
        package: only frames of files whose path contains this count.
        outside: the stage of ops no listed function produced.
    """

    def table(name):
        match = re.search(rf"^{name}\n(.*?)\n\n", hlo_text, re.S | re.M)
        rows = match.group(1).splitlines() if match else []
        return {int(row.split()[0]): row.split(None, 1)[1] for row in rows}

    def fields(row):
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", row)}

    file_names = {i: v.strip('"') for i, v in table("FileNames").items()}
    function_names = {
        i: v.strip('"') for i, v in table("FunctionNames").items()
    }
    locations = {}
    for i, row in table("FileLocations").items():
        ids = fields(row)
        locations[i] = (
            file_names[ids["file_name_id"]],
            function_names[ids["function_name_id"]],
        )
    frames = {
        i: (fields(row)["file_location_id"], fields(row)["parent_frame_id"])
        for i, row in table("StackFrames").items()
    }

    def stage_of(frame_id):
        while frame_id in frames:
            location_id, parent_id = frames[frame_id]
            file_name, function_name = locations[location_id]
            if package in file_name and function_name in stage_of_function:
                return stage_of_function[function_name]
            frame_id = parent_id - 1  # as printed, the parent is id - 1
        return outside

    stages = {}
    for match in re.finditer(
        r"^\s*(?:ROOT )?%([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo_text, re.M
    ):
        stages.setdefault(match.group(1), stage_of(int(match.group(2))))
    return stages


def profile_jax_step(step, stage_of_function, package, outside, num_runs=3):
    """Time per stage inside a whole jitted step, from a profiler trace.

    Args:
        step: a JAX `harness.steps.Step` (with its `compiled` executable).
        stage_of_function, package, outside: as in `hlo_instruction_stages`.
        num_runs: traced steps, after two untraced ones.

    Returns:
        (milliseconds per stage per step, wall milliseconds per step).
        XLA:CPU runs independent ops concurrently, so the stage times can
        add up to more than the wall time.
    """
    import jax

    instruction_stages = hlo_instruction_stages(
        step.compiled.as_text(), stage_of_function, package, outside
    )
    for _ in range(2):
        step.run()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(num_runs):
                step.run()
            wall_ms = (time.perf_counter() - start) * 1e3 / num_runs
        (trace_file,) = glob.glob(
            f"{trace_dir}/**/*.trace.json.gz", recursive=True
        )
        with gzip.open(trace_file) as trace:
            events = json.load(trace)["traceEvents"]
    stage_ms = {}
    for event in events:
        stage = instruction_stages.get(event.get("name"))
        if event.get("ph") == "X" and stage is not None:
            stage_ms[stage] = (
                stage_ms.get(stage, 0.0) + event["dur"] / 1e3 / num_runs
            )
    return stage_ms, wall_ms
