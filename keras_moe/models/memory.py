"""Refusing to build a model that cannot fit in the memory available.

Used by `keras_moe.presets.load` and `keras_moe.convert.from_transformers`
before they build anything; re-exported by `keras_moe.presets`.
"""

import os
import re

import keras

GIB = 1024**3


class PresetTooLargeError(MemoryError):
    """A model's weights do not fit in the memory available to build it.

    Raised by `keras_moe.presets.load` (and
    `keras_moe.convert.from_transformers`) before anything is allocated, instead
    of letting the process run out of memory halfway through building. It is
    a `MemoryError`, so code that already handles running out of memory
    handles it too. The message says how much memory the weights need in the
    requested dtype and how to make them fit.

    Attributes:
        needed_bytes: int, the bytes of the weights.
        available_bytes: int, the memory available when `load` was called.
    """

    def __init__(self, message, needed_bytes, available_bytes):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


def host_memory_bytes():
    """Host memory that new allocations can use now, in bytes.

    Reads `MemAvailable` from `/proc/meminfo` (Linux: free memory plus what
    the kernel can reclaim), else the free physical pages from `os.sysconf`.

    Returns:
        An int, or None where neither source exists.

    Example:

    >>> from keras_moe.models.memory import host_memory_bytes
    >>> available = host_memory_bytes()
    >>> available is None or available > 0
    True
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # Reported in kB.
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def accelerator_memory_bytes():
    """Free memory of the accelerator new weights go to, if one is used.

    On JAX, the first device when it is not a CPU (its `bytes_limit` minus
    `bytes_in_use`); on PyTorch, the current CUDA device
    (`torch.cuda.mem_get_info`). TensorFlow reports no free GPU memory, so
    there (and on CPU-only machines) this returns None.

    Returns:
        `(device_name, free_bytes)`, or None.

    Example:

    >>> from keras_moe.models.memory import accelerator_memory_bytes
    >>> found = accelerator_memory_bytes()
    >>> found is None or found[1] >= 0
    True
    """
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            stats = device.memory_stats() if device.platform != "cpu" else None
            if stats and "bytes_limit" in stats:
                free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                return str(device), int(free)
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                index = torch.cuda.current_device()
                free, _ = torch.cuda.mem_get_info(index)
                return f"cuda:{index}", int(free)
    except Exception:  # A query that fails must not stop a load.
        return None
    return None


def available_memory():
    """Where new weights will be stored, and how many bytes are free there.

    The accelerator when one is in use (see `accelerator_memory_bytes`),
    else the host (`host_memory_bytes`).

    Returns:
        `(where, free_bytes)`, e.g. `("this machine", 22_000_000_000)` or
        `("the accelerator cuda:0", ...)`, or None when unknown.

    Example:

    >>> from keras_moe.models.memory import available_memory
    >>> where, free_bytes = available_memory() or ("unknown", 1)
    >>> free_bytes > 0
    True
    """
    accelerator = accelerator_memory_bytes()
    if accelerator is not None:
        return f"the accelerator {accelerator[0]}", accelerator[1]
    host = host_memory_bytes()
    return None if host is None else ("this machine", host)


def weight_dtype(dtype=None):
    """The dtype weights are stored in under a dtype (policy) setting.

    Args:
        dtype: None (the global Keras dtype policy), a dtype or policy name
            (`"bfloat16"`, `"mixed_bfloat16"`, ...), a `keras.DTypePolicy`
            or its serialized dict.

    Returns:
        The variable dtype name: `"mixed_bfloat16"` keeps float32 weights.

    Example:

    >>> from keras_moe.models.memory import weight_dtype
    >>> weight_dtype("bfloat16"), weight_dtype("mixed_bfloat16")
    ('bfloat16', 'float32')
    """
    if dtype is None:
        policy = keras.config.dtype_policy()
    else:
        policy = keras.dtype_policies.get(dtype)
    return keras.backend.standardize_dtype(policy.variable_dtype)


def bytes_per_parameter(dtype):
    """Bytes one weight takes in a (variable) dtype.

    Args:
        dtype: str, a dtype name ending in its bit width (`"bfloat16"`).

    Returns:
        An int.

    Example:

    >>> from keras_moe.models.memory import bytes_per_parameter
    >>> bytes_per_parameter("float32"), bytes_per_parameter("bfloat16")
    (4, 2)
    """
    bits = re.search(r"(\d+)$", dtype)
    if not bits:
        raise ValueError(f"Cannot tell the size of dtype {dtype!r}.")
    return max(int(bits.group(1)) // 8, 1)


# Loading a variable stages its new value once on the host (read from the
# checkpoint, in the variable's dtype) and once as a backend tensor before it
# replaces the old value: two extra copies of one variable at a time.
STAGING_COPIES = 2


def loading_memory_bytes(total_params, dtype=None, largest_params=0):
    """Peak memory loading weights into a new model needs, in bytes.

    The weights, `total_params` times the bytes of the weight dtype, plus
    `STAGING_COPIES` copies of the largest variable: checkpoint conversion
    (`keras_moe.convert.from_transformers`) reads one tensor at a time,
    stages it in the variable's dtype, and assigns it (a backend copy)
    before the next. `benchmarks/loading_memory_benchmark.py` checks this
    estimate against the measured growth of the peak resident memory.

    Args:
        total_params: int, the model's parameter count.
        dtype: the backbone's `dtype` setting (None: the Keras default).
        largest_params: int, the values of its largest variable (0: count
            the weights alone).

    Returns:
        An int.

    Example:

    >>> from keras_moe.models.memory import loading_memory_bytes
    >>> loading_memory_bytes(1_000_000, "bfloat16", largest_params=50_000)
    2200000
    """
    per_parameter = bytes_per_parameter(weight_dtype(dtype))
    return (total_params + STAGING_COPIES * largest_params) * per_parameter


def check_fits_in_memory(description, total_params, dtype=None, largest_params=0):
    """Raise `PresetTooLargeError` if the weights cannot fit in memory.

    The need counted is `loading_memory_bytes`: the weights,
    `total_params` times the bytes of the weight dtype, plus the staging of
    the largest variable while it loads (`largest_params`, when given):
    enough to build or load the model and run inference. It is
    compared with the free memory of where the weights go: the accelerator
    on JAX and PyTorch when one is used, else the host (`available_memory`;
    TensorFlow reports no free GPU memory, so there the host is checked).
    Training with Adam holds about four times that (weights, gradients and
    two moments), so a model that passes here may still not train.

    No check is made when the available memory is unknown, or when a
    `keras.distribution` is set: the weights are then spread over the
    distribution's devices, whose memory this function does not see.

    Args:
        description: str naming the model in the message, e.g.
            `"Preset 'deepseek_v3'"`.
        total_params: int, the model's parameter count.
        dtype: the backbone's `dtype` setting (None: the Keras default).
        largest_params: int, the values of the largest variable when the
            weights are loaded from a checkpoint (0: the weights alone).

    Raises:
        PresetTooLargeError: with the bytes needed and the ways to shard
            or shrink the model.

    Example:

    >>> from keras_moe.models.memory import PresetTooLargeError, check_fits_in_memory
    >>> check_fits_in_memory("A small model", 1_000_000)  # Fits: no error.
    >>> try:
    ...     check_fits_in_memory("A huge model", 10**15, dtype="bfloat16")
    ... except PresetTooLargeError as error:
    ...     print(error.needed_bytes)
    2000000000000000
    """
    if keras.distribution.distribution() is not None:
        return
    found = available_memory()
    if found is None:
        return
    where, available = found
    stored_as = weight_dtype(dtype)
    needed = loading_memory_bytes(total_params, dtype, largest_params)
    if needed <= available:
        return
    ways = []
    if bytes_per_parameter(stored_as) > 2:
        half = total_params * 2
        ways.append(
            f'load it in half precision, `dtype="bfloat16"` ({half / GIB:,.1f} '
            "GiB), if that fits"
        )
    ways.append(
        "shard it over several devices (JAX backend): before `load`, call "
        "`keras.distribution.set_distribution(keras.distribution."
        "ModelParallel(layout_map=keras_moe.distribution.get_layout_map("
        'mesh, expert_axis="expert", model_axis="model"), '
        'batch_dim_name="batch"))` with a `keras.distribution.DeviceMesh` '
        f"`mesh` whose devices hold {needed / GIB:,.1f} GiB together"
    )
    ways.append("use a machine with more memory, or more devices")
    numbered = "; ".join(f"({i}) {way}" for i, way in enumerate(ways, 1))
    raise PresetTooLargeError(
        f"{description} has {total_params:,} parameters: "
        f"{'loading its weights needs' if largest_params else 'its weights need'} "
        f"{needed / GIB:,.1f} GiB ({needed:,} bytes) in {stored_as}, but "
        f"{where} has {available / GIB:,.1f} GiB of memory available, so "
        f"building it would run out of memory. To make it fit: {numbered}. "
        "Training with Adam needs about 4x the weights' memory.",
        needed_bytes=needed,
        available_bytes=available,
    )
