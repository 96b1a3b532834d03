"""Peak memory of one step, and the bytes variables hold.

Measure in a worker started with `LOW_MMAP_MALLOC_ENV`: large buffers are
then mmapped and unmapped when freed, so the resident set size follows the
live buffers instead of keeping freed memory in malloc's heap. TensorFlow
keeps freed memory in its own allocator, so there its allocator's
statistics are the measure (its RSS growth is reported too).
"""

import gc

LOW_MMAP_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
}


def variable_bytes(variables):
    """Bytes the variables hold, at their own dtypes."""
    import keras
    import numpy as np

    return sum(
        int(np.prod(variable.shape))
        * np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
        for variable in variables
    )


def _proc_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss():
    """Make VmHWM (the peak RSS) restart from the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _tensorflow_allocator_bytes(stat):
    """TensorFlow's CPU allocator statistic: "current" or "peak" bytes."""
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("CPU:0")[stat]


def step_memory(backend, run):
    """Memory one call of `run()` needs beyond what is resident before it.

    Returns:
        a dict with `peak_rss_growth_bytes` (peak RSS during the call minus
        the RSS before it) and, on TensorFlow, `allocator_peak_growth_bytes`
        (peak bytes held by its CPU allocator during the call minus the
        bytes it held before).
    """
    gc.collect()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")
        allocated_before = _tensorflow_allocator_bytes("current")
    resident_before = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    run()
    measured = {
        "peak_rss_growth_bytes": (
            _proc_status_kib("VmHWM") - resident_before
        ) * 1024
    }
    if backend == "tensorflow":
        measured["allocator_peak_growth_bytes"] = (
            _tensorflow_allocator_bytes("peak") - allocated_before
        )
    return measured


def min_step_memory(backend, run, tries=2):
    """`step_memory`, each field the least of `tries` calls."""
    measurements = [step_memory(backend, run) for _ in range(tries)]
    return {name: min(m[name] for m in measurements)
            for name in measurements[0]}
