"""Worker subprocesses: one Keras backend per process.

A benchmark script re-runs itself with worker arguments and `KERAS_BACKEND`
set. The worker prints progress lines and result records (`emit`); the
parent (`spawn_worker`) streams the progress, collects the records and
measures the CPU that other processes used meanwhile.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from harness.load import OtherCpuLoad

RESULT_PREFIX = "BENCHMARK_RESULT "
BACKENDS = ("tensorflow", "jax", "torch")


def emit(record):
    """Worker side: send one result record (a JSON-able dict) to the parent."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def parse_backends(text):
    """`"tensorflow,jax"` -> `["tensorflow", "jax"]`; exits on unknown names."""
    backends = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"Unknown backends: {sorted(unknown)}")
    return backends


def single_thread_env():
    """Environment that keeps every backend's math on one thread."""
    return {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1",
    }


@dataclasses.dataclass
class WorkerRun:
    """What one worker process returned.

    Attributes:
        records: the records it emitted, each with `backend` and
            `background_cores` added.
        background_cores: cores other processes kept busy meanwhile.
        wall_s: its wall time.
        returncode: its exit status.
    """

    records: list
    background_cores: float
    wall_s: float
    returncode: int


def spawn_worker(script, worker_args, backend, label=None, extra_env=None,
                 check=True):
    """Run `script` as a worker on `backend`; stream progress, return records.

    Args:
        script: path of the benchmark script (usually `__file__`).
        worker_args: its command-line arguments for the worker run.
        backend: the `KERAS_BACKEND` of the worker.
        label: prefix of its progress lines (default: the backend).
        extra_env: more environment variables for the worker.
        check: exit when the worker fails (otherwise print its stderr's
            tail and return what it emitted).

    Returns:
        a `WorkerRun`.
    """
    label = label or backend
    command = [sys.executable, os.path.abspath(script), *worker_args]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra_env or {})
    records = []
    with OtherCpuLoad() as load, tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr_file, text=True,
            env=env,
        )
        for line in process.stdout:
            if line.startswith(RESULT_PREFIX):
                records.append(json.loads(line[len(RESULT_PREFIX):]))
            else:
                print(f"[{label}] {line.rstrip()}", flush=True)
        process.wait()
        stderr_file.seek(0)
        stderr_tail = stderr_file.read()[-3000:]
    if process.returncode:
        message = (f"[{label}] worker failed (exit {process.returncode}):\n"
                   f"{stderr_tail}")
        if check:
            raise SystemExit(message)
        print(message, flush=True)
    print(f"[{label}] done in {load.wall_s:.0f} s; other processes kept "
          f"{load.cores:.2f} of {os.cpu_count()} cores busy meanwhile",
          flush=True)
    for record in records:
        record.setdefault("backend", backend)
        record["background_cores"] = load.cores
    return WorkerRun(records, load.cores, load.wall_s, process.returncode)
