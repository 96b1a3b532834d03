"""Forward+backward benchmark of `keras_moe.layers.SparseMoE`.

Command, from the repository root (also `make benchmark`):

    .venv/bin/python benchmarks/sparse_moe_benchmark.py

Options: `--backends tensorflow,jax,torch`, `--repeats 7`, `--tokens 4096`,
`--quick` (tiny sizes, a smoke run), `--skip-keras-hub`, `--skip-memory`,
`--skip-breakdown`, `--torch-compile`, `--json-out FILE`.

Workload: one training step without an optimizer, i.e. the loss
`mean(outputs ** 2) + sum(layer losses)` (the router's auxiliary losses where a
layer adds them) and its gradients with respect to the input and every
trainable weight, on `T` tokens shaped `[T / seq_len, seq_len, d]` in float32.
Every layer is built from the same seed. Configurations:

- `SparseMoE` with 8 and 64 experts at capacity factor 1.25, and 8 experts at
  capacity factor 1.0 (called with `training=True`, so the training capacity
  is used and the load-balancing loss is added);
- a dense SwiGLU feed-forward layer of `top_k * intermediate_dim` units, the
  same expert FLOPs as top-k routing without capacity slack;
- keras-hub's `MixtralSparseMoeBlock` with 8 and 64 experts, which runs every
  expert on every token.

Each backend runs in its own subprocess with `KERAS_BACKEND` set: TensorFlow
under `tf.function(jit_compile=True)`, JAX under `jax.jit` of
`jax.value_and_grad` over `stateless_call`, PyTorch in eager autograd (and
`torch.compile` with `--torch-compile`). Each step is compiled and warmed up
first, then repetitions of all configurations are interleaved (round-robin) so
that a disturbance on the machine hits every configuration alike, and the
median wall time is reported. Each keras-hub layer is timed in a subprocess
of its own: after its GB-sized steps, SparseMoE steps in the same JAX process
ran 10% (E=8 keras-hub) to 70% (E=64) slower, while the dense layer was
barely affected. keras-hub with 64 experts, about 25 times the work of the
rest, runs at most `--heavy-repeats` (3) times. The CPU time that other
processes take meanwhile is measured from /proc/stat and reported: ratios are
only meaningful when it is near zero.

Peak memory "weights aside" is measured per backend in a separate subprocess
whose malloc returns freed memory to the system at once: the growth of the
peak resident set size during one step (TensorFlow: the peak of its CPU
allocator's bytes in use, as it keeps freed memory), minus the weight
gradients, which are outputs of the step and scale with the number of
experts like the weights. For JAX, the temporary (scratch) bytes that XLA's
buffer assignment gives the compiled step are reported too.

Finally, `SparseMoE`'s step is split into its stages (router, dispatch plan,
dispatch gather, experts, combine, load-balancing loss), each compiled (on
PyTorch: run eagerly) and timed alone, forward and forward+backward, to show
where the time goes. Timed alone, a stage misses the fusion XLA does across
stages, so on JAX the whole jitted step is also profiled (`jax.profiler`) and
the time of each XLA op is attributed to the keras_moe function that produced
it, from the Python stack XLA records for every op (backward ops included).
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SEED = 1337
RESULT_PREFIX = "BENCHMARK_RESULT "
BACKENDS = ("tensorflow", "jax", "torch")
TIMED_TARGET_BACKENDS = ("tensorflow", "jax")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes: `tokens = batch_size * seq_len` tokens of width `d`."""

    tokens: int
    seq_len: int
    hidden_dim: int
    intermediate_dim: int
    top_k: int

    @property
    def input_shape(self):
        return (self.tokens // self.seq_len, self.seq_len, self.hidden_dim)


FULL_SIZES = Sizes(
    tokens=4096, seq_len=512, hidden_dim=512, intermediate_dim=1024, top_k=2
)
QUICK_SIZES = Sizes(
    tokens=256, seq_len=64, hidden_dim=64, intermediate_dim=128, top_k=2
)


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One benchmarked layer.

    Attributes:
        key: short identifier used in results and ratios.
        label: human-readable name.
        kind: "sparse_moe", "dense" or "keras_hub_mixtral".
        num_experts: experts of an MoE layer (0 for the dense layer).
        capacity_factor: training capacity factor of a `SparseMoE`.
        own_process: timed in a subprocess of its own rather than
            interleaved with the others.
        heavy: runs at most `--heavy-repeats` times.
    """

    key: str
    label: str
    kind: str
    num_experts: int = 0
    capacity_factor: float = None
    own_process: bool = False
    heavy: bool = False


LAYER_CONFIGS = (
    LayerConfig("sparse_e8", "SparseMoE E=8 cf=1.25", "sparse_moe", 8, 1.25),
    LayerConfig("sparse_e64", "SparseMoE E=64 cf=1.25", "sparse_moe", 64, 1.25),
    LayerConfig("sparse_e8_cf1", "SparseMoE E=8 cf=1.0", "sparse_moe", 8, 1.0),
    LayerConfig("dense", "Dense SwiGLU k*f units", "dense"),
    LayerConfig(
        "mixtral_e8", "keras-hub Mixtral E=8", "keras_hub_mixtral", 8,
        own_process=True,
    ),
    LayerConfig(
        "mixtral_e64", "keras-hub Mixtral E=64", "keras_hub_mixtral", 64,
        own_process=True, heavy=True,
    ),
)
CONFIGS_BY_KEY = {config.key: config for config in LAYER_CONFIGS}
# Peak memory is measured on these (the E=64 / E=8 target and a reference).
MEMORY_CONFIG_KEYS = ("sparse_e8", "sparse_e64", "dense")
# torch.compile variants, timed only with --torch-compile.
TORCH_COMPILE_CONFIG_KEYS = ("sparse_e8", "sparse_e64", "dense")


@dataclasses.dataclass(frozen=True)
class RatioTarget:
    """`time(numerator) / time(denominator)` compared against `bound`."""

    label: str
    numerator: str
    denominator: str
    comparison: str  # "<=" or ">="
    bound: float
    backends: tuple  # where the target applies; elsewhere it is reported


TIME_TARGETS = (
    RatioTarget(
        "SparseMoE E=64 / E=8 (cf 1.25)", "sparse_e64", "sparse_e8", "<=",
        1.10, TIMED_TARGET_BACKENDS,
    ),
    RatioTarget(
        "SparseMoE E=8 cf=1.25 / dense", "sparse_e8", "dense", "<=", 1.30,
        TIMED_TARGET_BACKENDS,
    ),
    RatioTarget(
        "SparseMoE E=8 cf=1.0 / dense", "sparse_e8_cf1", "dense", "<=", 1.10,
        TIMED_TARGET_BACKENDS,
    ),
    RatioTarget(
        "keras-hub E=8 / SparseMoE E=8 cf=1.25", "mixtral_e8", "sparse_e8",
        ">=", 4.5, BACKENDS,
    ),
    RatioTarget(
        "keras-hub E=64 / SparseMoE E=64 cf=1.25", "mixtral_e64",
        "sparse_e64", ">=", 25.0, BACKENDS,
    ),
)
# Printed next to the targets for reference, without a target.
REFERENCE_RATIOS = (
    ("keras-hub E=8 / SparseMoE E=8 cf=1.0", "mixtral_e8", "sparse_e8_cf1"),
    ("SparseMoE E=8 cf=1.25 / cf=1.0", "sparse_e8", "sparse_e8_cf1"),
)
MEMORY_TARGET_BOUND = 1.2


# --------------------------------------------------------------------------
# Worker side: runs inside a subprocess with KERAS_BACKEND set.
# --------------------------------------------------------------------------


def emit(record):
    """Send one result record to the parent process."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def progress(message):
    print(message, flush=True)


def make_dense_swiglu(intermediate_dim):
    """A dense SwiGLU feed-forward layer: `down(silu(x @ gate) * (x @ up))`."""
    import keras
    from keras import ops

    class DenseSwiGLU(keras.layers.Layer):
        def __init__(self, intermediate_dim, **kwargs):
            super().__init__(**kwargs)
            self.intermediate_dim = intermediate_dim

        def build(self, input_shape):
            hidden_dim = input_shape[-1]
            up_shape = (hidden_dim, self.intermediate_dim)
            self.gate_kernel = self.add_weight(
                name="gate_kernel", shape=up_shape,
                initializer="glorot_uniform",
            )
            self.up_kernel = self.add_weight(
                name="up_kernel", shape=up_shape, initializer="glorot_uniform"
            )
            self.down_kernel = self.add_weight(
                name="down_kernel",
                shape=(self.intermediate_dim, hidden_dim),
                initializer="glorot_uniform",
            )

        def call(self, inputs, training=None):
            gate = ops.silu(ops.matmul(inputs, self.gate_kernel))
            up = ops.matmul(inputs, self.up_kernel)
            return ops.matmul(gate * up, self.down_kernel)

    return DenseSwiGLU(intermediate_dim, name="dense_swiglu")


def build_layer(config, sizes):
    """Build the layer of `config` from the shared seed."""
    import keras

    keras.utils.set_random_seed(SEED)
    if config.kind == "sparse_moe":
        import keras_moe

        layer = keras_moe.layers.SparseMoE(
            num_experts=config.num_experts,
            intermediate_dim=sizes.intermediate_dim,
            top_k=sizes.top_k,
            capacity_factor=config.capacity_factor,
        )
    elif config.kind == "dense":
        layer = make_dense_swiglu(sizes.top_k * sizes.intermediate_dim)
    elif config.kind == "keras_hub_mixtral":
        from keras_hub.src.models.mixtral.mixtral_decoder import (
            MixtralSparseMoeBlock,
        )

        layer = MixtralSparseMoeBlock(
            hidden_dim=sizes.hidden_dim,
            intermediate_dim=sizes.intermediate_dim,
            num_experts=config.num_experts,
            top_k=sizes.top_k,
        )
    else:
        raise ValueError(f"Unknown layer kind: {config.kind}")
    layer.build(sizes.input_shape)
    return layer


def make_inputs(sizes):
    import numpy as np

    rng = np.random.default_rng(SEED)
    return rng.standard_normal(sizes.input_shape).astype("float32")


def training_loss(outputs, losses):
    """`mean(outputs ** 2)` plus the losses the layer added."""
    from keras import ops

    if isinstance(outputs, (tuple, list)):  # keras-hub: (out, router_logits)
        outputs = outputs[0]
    loss = ops.mean(ops.square(outputs))
    for added_loss in losses:
        loss = loss + added_loss
    return loss


def expert_rows(config, sizes):
    """Rows that go through the expert matmuls (each `3 * d * f` MACs)."""
    if config.kind == "dense":
        return sizes.tokens * sizes.top_k  # k*f units = k rows of f units
    if config.kind == "keras_hub_mixtral":
        return sizes.tokens * config.num_experts
    from keras_moe.ops.dispatch import expert_capacity

    capacity = expert_capacity(
        sizes.tokens, config.num_experts, sizes.top_k, config.capacity_factor
    )
    return config.num_experts * capacity


def expert_gflops(config, sizes):
    """Expert matmul GFLOPs of forward+backward (backward = 2x forward)."""
    forward = 2 * 3 * sizes.hidden_dim * sizes.intermediate_dim
    return 3 * forward * expert_rows(config, sizes) / 1e9


def weight_bytes(layer):
    return sum(
        math.prod(variable.shape) * 4 for variable in layer.trainable_variables
    )


@dataclasses.dataclass
class CompiledStep:
    """A ready-to-time training step: `run()` returns once results exist."""

    run: object
    xla_memory: dict = None  # JAX only: XLA's buffer assignment sizes
    compiled: object = None  # JAX only: the compiled executable


def make_jax_step(layer, inputs):
    import jax
    import jax.numpy as jnp

    trainable = [variable.value for variable in layer.trainable_variables]
    non_trainable = [
        variable.value for variable in layer.non_trainable_variables
    ]

    def loss_fn(trainable, x):
        outputs, _, losses = layer.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        return training_loss(outputs, losses)

    x = jnp.asarray(inputs)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    compiled = grad_fn.lower(trainable, x).compile()
    analysis = compiled.memory_analysis()
    xla_memory = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
    }

    def run():
        jax.block_until_ready(compiled(trainable, x))

    return CompiledStep(run, xla_memory, compiled)


def make_tensorflow_step(layer, inputs):
    import tensorflow as tf

    x = tf.constant(inputs)
    variables = list(layer.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = training_loss(layer(x, training=True), layer.losses)
        return loss, tape.gradient(loss, [x] + variables)

    def run():
        loss, _ = step(x)
        loss.numpy()  # the XLA cluster computes loss and gradients together

    return CompiledStep(run)


def make_torch_step(layer, inputs, compile_forward=False):
    import torch

    x = torch.tensor(inputs, requires_grad=True)
    weights = [variable.value for variable in layer.trainable_variables]

    def forward_loss(x):
        return training_loss(layer(x, training=True), layer.losses)

    if compile_forward:  # AOTAutograd compiles the backward along with it
        forward_loss = torch.compile(forward_loss)

    def run():
        torch.autograd.grad(forward_loss(x), [x] + weights)

    return CompiledStep(run)


def make_step(backend, layer, inputs, torch_compile=False):
    if backend == "jax":
        return make_jax_step(layer, inputs)
    if backend == "tensorflow":
        return make_tensorflow_step(layer, inputs)
    return make_torch_step(layer, inputs, compile_forward=torch_compile)


def timed_call(run):
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def time_interleaved(runs, repeats):
    """Time `runs[key]()` `repeats[key]` times each, round-robin.

    Returns:
        dict key -> list of milliseconds.
    """
    times = {key: [] for key in runs}
    for round_index in range(max(repeats.values())):
        for key, run in runs.items():
            if round_index < repeats[key]:
                times[key].append(timed_call(run))
    return times


def time_worker(backend, sizes, args):
    """Time every configuration on this backend; emit one record each."""
    inputs = make_inputs(sizes)
    config_keys = args.configs.split(",")
    variants = [(CONFIGS_BY_KEY[key], False) for key in config_keys]
    if args.torch_compile and backend == "torch":
        variants += [
            (CONFIGS_BY_KEY[key], True)
            for key in TORCH_COMPILE_CONFIG_KEYS
            if key in config_keys
        ]
    runs, repeats, records = {}, {}, {}
    for config, torch_compile in variants:
        key = config.key + ("+compile" if torch_compile else "")
        layer = build_layer(config, sizes)
        start = time.perf_counter()
        try:
            step = make_step(backend, layer, inputs, torch_compile)
            for _ in range(1 if config.heavy else args.warmup):
                step.run()
        except Exception as error:  # reported, the other configs still run
            emit({"kind": "error", "config": key, "error": repr(error)[:500]})
            continue
        warmup_s = time.perf_counter() - start
        progress(f"  {key}: compiled and warmed up in {warmup_s:.1f} s")
        runs[key] = step.run
        repeats[key] = (
            min(args.repeats, args.heavy_repeats)
            if config.heavy
            else args.repeats
        )
        records[key] = {
            "kind": "time",
            "config": key,
            "label": config.label
            + (" (torch.compile)" if torch_compile else ""),
            "warmup_s": warmup_s,
            "expert_gflops": expert_gflops(config, sizes),
            "weight_bytes": weight_bytes(layer),
            "xla_memory": step.xla_memory,
        }
    if not runs:
        return
    progress(f"  timing {len(runs)} configurations, interleaved ...")
    times = time_interleaved(runs, repeats)
    for key, record in records.items():
        record["times_ms"] = times[key]
        record["median_ms"] = statistics.median(times[key])
        emit(record)


def read_proc_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss():
    """Make VmHWM (the peak RSS) restart from the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def tensorflow_allocator_bytes(stat):
    """TensorFlow's CPU allocator statistic: "current" or "peak" bytes."""
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("CPU:0")[stat]


def measure_step_memory(backend, step):
    """Memory one step needs beyond what is resident before it starts.

    Returns a dict with `peak_rss_growth_bytes` (peak RSS during the step
    minus the RSS before it) and, on TensorFlow, `allocator_peak_growth_bytes`
    (peak bytes held by TensorFlow's CPU allocator during the step minus the
    bytes it held before).
    """
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")
        allocated_before = tensorflow_allocator_bytes("current")
    resident_before = read_proc_status_kib("VmRSS")
    reset_peak_rss()
    step.run()
    measured = {
        "peak_rss_growth_bytes": (
            read_proc_status_kib("VmHWM") - resident_before
        ) * 1024
    }
    if backend == "tensorflow":
        measured["allocator_peak_growth_bytes"] = (
            tensorflow_allocator_bytes("peak") - allocated_before
        )
    return measured


def memory_worker(backend, sizes, args):
    """Peak memory growth during one step, after compilation and warm-up.

    Run with `MALLOC_MMAP_THRESHOLD_` set low, so that large buffers are
    mmapped and unmapped when freed: the RSS then follows the live buffers
    instead of keeping freed memory in malloc's heap. TensorFlow keeps freed
    memory in its own allocator, so there its allocator's statistics are the
    measure (its RSS growth is reported too).
    """
    inputs = make_inputs(sizes)
    for key in MEMORY_CONFIG_KEYS:
        config = CONFIGS_BY_KEY[key]
        layer = build_layer(config, sizes)
        step = make_step(backend, layer, inputs)
        for _ in range(args.warmup):
            step.run()
        measurements = []
        for _ in range(2):
            gc.collect()
            measurements.append(measure_step_memory(backend, step))
        record = {"kind": "memory", "config": key,
                  "weight_bytes": weight_bytes(layer)}
        for name in measurements[0]:
            record[name] = min(m[name] for m in measurements)
        emit(record)
        del step, layer
        gc.collect()


def block(result):
    """Wait until `result` (any nest of backend tensors) is computed."""
    import keras

    leaves = [leaf for leaf in keras.tree.flatten(result) if leaf is not None]
    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(leaves)
    elif keras.backend.backend() == "tensorflow":
        for leaf in leaves:
            leaf.numpy()
    # PyTorch on CPU returns computed tensors.


def stage_runners(backend, stage, num_differentiable, stage_args):
    """Compiled forward and forward+backward of one stage, as callables.

    `stage(*stage_args)` returns `(outputs, aux)`; the backward pass takes
    the gradient of `outputs` (ones as output gradient) with respect to the
    first `num_differentiable` arguments (tensors or lists of tensors).
    """
    import keras

    differentiable = stage_args[:num_differentiable]
    rest = stage_args[num_differentiable:]
    ones_like = lambda nest: keras.tree.map_structure(keras.ops.ones_like, nest)
    if backend == "jax":
        import jax

        def forward_backward(*differentiable):
            outputs, pullback, _ = jax.vjp(
                lambda *d: stage(*d, *rest), *differentiable, has_aux=True
            )
            return outputs, pullback(ones_like(outputs))

        forward = jax.jit(lambda *d: stage(*d, *rest)[0])
        forward_backward = jax.jit(forward_backward)
    elif backend == "tensorflow":
        import tensorflow as tf

        def forward_backward(*differentiable):
            with tf.GradientTape() as tape:
                tape.watch(differentiable)
                outputs = stage(*differentiable, *rest)[0]
            return outputs, tape.gradient(
                outputs, differentiable, output_gradients=ones_like(outputs)
            )

        forward = tf.function(
            lambda *d: stage(*d, *rest)[0], jit_compile=True
        )
        forward_backward = tf.function(forward_backward, jit_compile=True)
    else:
        import torch

        differentiable = keras.tree.map_structure(
            lambda t: t.detach().requires_grad_(), differentiable
        )

        def forward_backward(*differentiable):
            outputs = keras.tree.flatten(stage(*differentiable, *rest)[0])
            return torch.autograd.grad(
                outputs, keras.tree.flatten(differentiable),
                grad_outputs=ones_like(outputs),
            )

        def forward(*differentiable):
            with torch.no_grad():
                return stage(*differentiable, *rest)[0]

    return (
        lambda: block(forward(*differentiable)),
        lambda: block(forward_backward(*differentiable)),
    )


def median_of_runs(run, args):
    for _ in range(args.warmup):
        run()
    return statistics.median(
        time_interleaved({"run": run}, {"run": args.breakdown_repeats})["run"]
    )


ROUTER_STAGE = "router (matmul, softmax, top-k)"
PLAN_STAGE = "dispatch plan (argsorts, counts)"
DISPATCH_STAGE = "dispatch (gather to [E, C, d])"
EXPERTS_STAGE = "experts (3 batched einsums)"
COMBINE_STAGE = "combine (gather back, weight, sum)"
AUX_LOSS_STAGE = "load-balancing loss"
# keras_moe functions -> stage, to attribute profiled XLA ops to stages.
STAGE_OF_FUNCTION = {
    "TopKRouter.call": ROUTER_STAGE,
    "compute_dispatch_plan": PLAN_STAGE,
    "dispatch": DISPATCH_STAGE,
    "Experts.call": EXPERTS_STAGE,
    "combine": COMBINE_STAGE,
    "load_balancing_loss": AUX_LOSS_STAGE,
    "SparseMoE.call": "SparseMoE.call (reshapes)",
}
OUTSIDE_STAGE = "outside the layer (loss)"


def hlo_instruction_stages(hlo_text):
    """Map each instruction of compiled HLO text to the stage it comes from.

    XLA keeps the Python stack of every op (backward ops get the stack of
    the forward op they differentiate) in the module's FileNames,
    FunctionNames, FileLocations and StackFrames tables; the innermost
    keras_moe function of that stack names the stage.
    """
    import re

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
            if "keras_moe" in file_name and function_name in STAGE_OF_FUNCTION:
                return STAGE_OF_FUNCTION[function_name]
            frame_id = parent_id - 1  # as printed, the parent is id - 1
        return OUTSIDE_STAGE

    stages = {}
    for match in re.finditer(
        r"^\s*(?:ROOT )?%([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo_text, re.M
    ):
        stages.setdefault(match.group(1), stage_of(int(match.group(2))))
    return stages


def profile_jax_step(layer, inputs, num_runs=3):
    """Time per stage inside the whole jitted step, from a profiler trace.

    Returns (milliseconds per stage per step, wall milliseconds per step).
    XLA:CPU runs independent ops concurrently, so the stage times can add up
    to more than the wall time.
    """
    import glob
    import gzip

    import jax

    step = make_jax_step(layer, inputs)
    instruction_stages = hlo_instruction_stages(step.compiled.as_text())
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


def breakdown_worker(backend, sizes, args):
    """Time SparseMoE's stages, each compiled alone (mirrors its `call`)."""
    from keras import ops

    from keras_moe.ops.dispatch import combine
    from keras_moe.ops.dispatch import compute_dispatch_plan
    from keras_moe.ops.dispatch import dispatch
    from keras_moe.ops.dispatch import expert_capacity
    from keras_moe.ops.router_losses import load_balancing_loss

    inputs = make_inputs(sizes)
    for key in ("sparse_e8", "sparse_e64"):
        config = CONFIGS_BY_KEY[key]
        layer = build_layer(config, sizes)
        num_experts = config.num_experts
        capacity = expert_capacity(
            sizes.tokens, num_experts, sizes.top_k, config.capacity_factor
        )
        weights_of = lambda sublayer: [
            ops.convert_to_tensor(v.value)
            for v in sublayer.trainable_variables
        ]

        def router_stage(router_weights, tokens):
            routing, _ = layer.router.stateless_call(router_weights, [], tokens)
            floats = (routing.expert_weights, routing.router_probs)
            return floats, routing.expert_ids

        def plan_stage(expert_ids):
            plan = compute_dispatch_plan(expert_ids, num_experts, capacity)
            return plan, None

        def dispatch_stage(tokens, plan):
            return dispatch(tokens, plan), None

        def experts_stage(expert_weights, buffers):
            outputs, _ = layer.experts.stateless_call(
                expert_weights, [], buffers[0]
            )
            return ops.expand_dims(outputs, 0), None

        def combine_stage(expert_outputs, combine_weights, plan):
            return combine(expert_outputs, plan, combine_weights), None

        def aux_loss_stage(router_probs, expert_counts):
            loss = layer.aux_loss_weight * load_balancing_loss(
                router_probs, expert_counts
            )
            return loss, None

        # Each stage's inputs: the previous stages run once, eagerly.
        tokens = ops.reshape(
            ops.convert_to_tensor(inputs), (1, sizes.tokens, sizes.hidden_dim)
        )
        router_weights = weights_of(layer.router)
        expert_weights = weights_of(layer.experts)
        (combine_weights, router_probs), expert_ids = router_stage(
            router_weights, tokens
        )
        plan, _ = plan_stage(expert_ids)
        buffers, _ = dispatch_stage(tokens, plan)
        expert_outputs, _ = experts_stage(expert_weights, buffers)

        stages = (
            (ROUTER_STAGE, router_stage, 2, (router_weights, tokens)),
            (PLAN_STAGE, plan_stage, 0, (expert_ids,)),
            (DISPATCH_STAGE, dispatch_stage, 1, (tokens, plan)),
            (EXPERTS_STAGE, experts_stage, 2, (expert_weights, buffers)),
            (COMBINE_STAGE, combine_stage, 2,
             (expert_outputs, combine_weights, plan)),
            (AUX_LOSS_STAGE, aux_loss_stage, 1,
             (router_probs, plan.expert_counts)),
        )
        stage_records = []
        for name, stage, num_differentiable, stage_args in stages:
            forward, forward_backward = stage_runners(
                backend, stage, num_differentiable, stage_args
            )
            forward_ms = median_of_runs(forward, args)
            stage_records.append({
                "stage": name,
                "forward_ms": forward_ms,
                "forward_backward_ms": (
                    median_of_runs(forward_backward, args)
                    if num_differentiable else forward_ms  # integers only
                ),
            })
        whole_step = make_step(backend, layer, inputs)
        record = {
            "kind": "breakdown",
            "config": key,
            "capacity": capacity,
            "stages": stage_records,
            "whole_step_ms": median_of_runs(whole_step.run, args),
        }
        if backend == "jax":
            record["profiled_stage_ms"], record["profiled_wall_ms"] = (
                profile_jax_step(layer, inputs)
            )
        emit(record)
        progress(f"  breakdown of {key} done")


def run_worker(args):
    sizes = sizes_from_args(args)
    import keras

    assert keras.backend.backend() == args.backend, keras.backend.backend()
    if args.mode == "time":
        time_worker(args.backend, sizes, args)
    elif args.mode == "memory":
        memory_worker(args.backend, sizes, args)
    elif args.mode == "breakdown":
        breakdown_worker(args.backend, sizes, args)


# --------------------------------------------------------------------------
# Parent side: spawns the workers, collects records, prints the report.
# --------------------------------------------------------------------------


def sizes_from_args(args):
    base = QUICK_SIZES if args.quick else FULL_SIZES
    tokens = args.tokens or base.tokens
    seq_len = min(base.seq_len, tokens)
    if tokens % seq_len:
        raise SystemExit(f"--tokens must be a multiple of {seq_len}")
    return dataclasses.replace(base, tokens=tokens, seq_len=seq_len)


def busy_cpu_seconds():
    """CPU time every process on the machine has used since boot."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _, _, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf(
        "SC_CLK_TCK"
    )


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spawn_worker(backend, mode, args, configs=(), extra_env=None):
    """Run this script as a worker; stream its progress, return its records."""
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", mode,
        "--backend", backend, "--repeats", str(args.repeats),
        "--heavy-repeats", str(args.heavy_repeats),
        "--warmup", str(args.warmup),
        "--breakdown-repeats", str(args.breakdown_repeats),
    ]
    for flag in ("quick", "torch_compile"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    if args.tokens:
        command += ["--tokens", str(args.tokens)]
    if configs:
        command += ["--configs", ",".join(config.key for config in configs)]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra_env or {})
    records = []
    started = time.perf_counter()
    busy_before, own_before = busy_cpu_seconds(), children_cpu_seconds()
    with tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr_file, text=True,
            env=env,
        )
        for line in process.stdout:
            if line.startswith(RESULT_PREFIX):
                records.append(json.loads(line[len(RESULT_PREFIX):]))
            else:
                print(f"[{backend} {mode}] {line.rstrip()}", flush=True)
        process.wait()
        if process.returncode:
            stderr_file.seek(0)
            tail = stderr_file.read()[-3000:]
            print(
                f"[{backend} {mode}] worker failed (exit {process.returncode})"
                f":\n{tail}",
                flush=True,
            )
    wall_s = time.perf_counter() - started
    # Cores kept busy by anything but this worker (other processes, steal).
    background_cores = max(
        0.0,
        (busy_cpu_seconds() - busy_before)
        - (children_cpu_seconds() - own_before),
    ) / wall_s
    print(f"[{backend} {mode}] done in {wall_s:.0f} s; other processes kept "
          f"{background_cores:.2f} of {os.cpu_count()} cores busy meanwhile",
          flush=True)
    for record in records:
        record["backend"] = backend
        record["background_cores"] = background_cores
        if record["kind"] == "error":
            print(f"[{backend} {mode}] {record['config']} failed: "
                  f"{record['error']}", flush=True)
    return records


def format_table(headers, rows):
    widths = [
        max(len(str(cell)) for cell in column)
        for column in zip(headers, *rows)
    ]
    line = lambda cells: "  ".join(
        str(cell).ljust(width) if index == 0 else str(cell).rjust(width)
        for index, (cell, width) in enumerate(zip(cells, widths))
    )
    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), separator] + [line(row) for row in rows])


def mib(num_bytes):
    return f"{num_bytes / 2**20:.1f}"


def verdict(value, comparison, bound):
    met = value <= bound if comparison == "<=" else value >= bound
    return "PASS" if met else "MISS"


def report_times(time_records, backends):
    order = [config.key for config in LAYER_CONFIGS]
    order += [key + "+compile" for key in order]
    for backend in backends:
        records = sorted(
            (r for r in time_records if r["backend"] == backend),
            key=lambda record: order.index(record["config"]),
        )
        if not records:
            continue
        rows = [
            (
                record["label"],
                f"{record['median_ms']:.1f}",
                f"{min(record['times_ms']):.1f}",
                f"{max(record['times_ms']):.1f}",
                len(record["times_ms"]),
                f"{record['expert_gflops']:.0f}",
                f"{record['expert_gflops'] / record['median_ms'] * 1e3:.0f}",
                f"{record['warmup_s']:.1f}",
            )
            for record in records
        ]
        print(f"\n== {backend}: forward+backward step, milliseconds ==")
        print(format_table(
            ("configuration", "median", "min", "max", "runs",
             "expert GFLOP", "GFLOP/s", "warmup s"),
            rows,
        ))


def compute_ratios(time_records, backends):
    """Rows of (label, backend, ratio, target text, verdict)."""
    medians = {
        (r["backend"], r["config"]): r["median_ms"] for r in time_records
    }
    flops = {r["config"]: r["expert_gflops"] for r in time_records}
    rows = []
    for target in TIME_TARGETS:
        for backend in backends:
            numerator = medians.get((backend, target.numerator))
            denominator = medians.get((backend, target.denominator))
            if numerator is None or denominator is None:
                continue
            ratio = numerator / denominator
            applies = backend in target.backends
            rows.append({
                "label": target.label,
                "backend": backend,
                "ratio": ratio,
                "flop_ratio": (
                    flops[target.numerator] / flops[target.denominator]
                ),
                "target": f"{target.comparison} {target.bound:g}",
                "verdict": (
                    verdict(ratio, target.comparison, target.bound)
                    if applies else "report"
                ),
                "bound": target.bound,
            })
    for label, numerator_key, denominator_key in REFERENCE_RATIOS:
        for backend in backends:
            numerator = medians.get((backend, numerator_key))
            denominator = medians.get((backend, denominator_key))
            if numerator is None or denominator is None:
                continue
            rows.append({
                "label": label,
                "backend": backend,
                "ratio": numerator / denominator,
                "flop_ratio": flops[numerator_key] / flops[denominator_key],
                "target": "-",
                "verdict": "-",
                "bound": None,
            })
    return rows


def compute_memory_rows(time_records, memory_records, backends):
    """E=64 / E=8 peak-memory ratios, weights (and their gradients) aside."""
    rows = []

    def add_row(measure, e8_bytes, e64_bytes):
        ratio = e64_bytes / e8_bytes
        rows.append({
            "measure": measure,
            "e8_mib": mib(e8_bytes),
            "e64_mib": mib(e64_bytes),
            "ratio": ratio,
            "verdict": verdict(ratio, "<=", MEMORY_TARGET_BOUND),
        })

    xla = {
        r["config"]: r
        for r in time_records
        if r["backend"] == "jax" and r.get("xla_memory")
    }
    if "sparse_e8" in xla and "sparse_e64" in xla:
        add_row(
            "jax XLA temp bytes",
            xla["sparse_e8"]["xla_memory"]["temp_bytes"],
            xla["sparse_e64"]["xla_memory"]["temp_bytes"],
        )
        live_without_weight_grads = {
            key: xla[key]["xla_memory"]["temp_bytes"]
            + xla[key]["xla_memory"]["output_bytes"]
            - xla[key]["weight_bytes"]
            for key in ("sparse_e8", "sparse_e64")
        }
        add_row(
            "jax XLA temp + outputs - weight grads",
            live_without_weight_grads["sparse_e8"],
            live_without_weight_grads["sparse_e64"],
        )
    # TensorFlow's allocator keeps freed memory, so its RSS says little
    # there; its allocator statistics are used instead.
    measure_by_backend = {
        "tensorflow": ("allocator_peak_growth_bytes", "allocator peak growth"),
        "jax": ("peak_rss_growth_bytes", "peak RSS growth"),
        "torch": ("peak_rss_growth_bytes", "peak RSS growth"),
    }
    for backend in backends:
        field, description = measure_by_backend[backend]
        peaks = {
            r["config"]: r[field] - r["weight_bytes"]
            for r in memory_records
            if r["backend"] == backend
        }
        if "sparse_e8" in peaks and "sparse_e64" in peaks:
            add_row(
                f"{backend} {description} - weight grads",
                peaks["sparse_e8"], peaks["sparse_e64"],
            )
    return rows


def report_memory(memory_records, memory_rows):
    if memory_records:
        print("\n== Memory growth during one step, MiB (TensorFlow: its "
              "allocator's peak; RSS growth shown for reference) ==")
        rows = []
        for r in memory_records:
            growth = r.get(
                "allocator_peak_growth_bytes", r["peak_rss_growth_bytes"]
            )
            rows.append((
                r["backend"], CONFIGS_BY_KEY[r["config"]].label,
                mib(growth), mib(r["peak_rss_growth_bytes"]),
                mib(r["weight_bytes"]), mib(growth - r["weight_bytes"]),
            ))
        print(format_table(
            ("backend", "configuration", "peak growth", "RSS growth",
             "weight grads", "peak growth - weight grads"),
            rows,
        ))
    if memory_rows:
        print(f"\n== Peak memory E=64 / E=8 (weights aside), target <= "
              f"{MEMORY_TARGET_BOUND:g} ==")
        print(format_table(
            ("measure", "E=8 MiB", "E=64 MiB", "ratio", "verdict"),
            [(r["measure"], r["e8_mib"], r["e64_mib"], f"{r['ratio']:.2f}",
              r["verdict"]) for r in memory_rows],
        ))


def report_breakdown(breakdown_records):
    for record in breakdown_records:
        how = "run eagerly" if record["backend"] == "torch" else "compiled"
        print(f"\n== {record['backend']}: "
              f"{CONFIGS_BY_KEY[record['config']].label}, C="
              f"{record['capacity']}: stages {how} alone (ms; other processes "
              f"used {record['background_cores']:.2f} cores meanwhile) ==")
        alone = {stage["stage"]: stage for stage in record["stages"]}
        profiled = record.get("profiled_stage_ms")  # JAX only
        stage_names = list(alone) + [
            name for name in profiled or {} if name not in alone
        ]
        rows = []
        for name in stage_names:
            if name in alone:
                row = (name, f"{alone[name]['forward_ms']:.1f}",
                       f"{alone[name]['forward_backward_ms']:.1f}")
            else:
                row = (name, "-", "-")
            rows.append(row + ((f"{profiled.get(name, 0.0):.1f}",)
                               if profiled is not None else ()))
        total = (
            "sum",
            f"{sum(stage['forward_ms'] for stage in alone.values()):.1f}",
            f"{sum(s['forward_backward_ms'] for s in alone.values()):.1f}",
        )
        whole = ("whole step (wall)", "-", f"{record['whole_step_ms']:.1f}")
        headers = ("stage", "alone: forward", "alone: forward+backward")
        if profiled is not None:
            headers += ("in the whole step (profiler)",)
            total += (f"{sum(profiled.values()):.1f}",)
            whole += (f"{record['profiled_wall_ms']:.1f}",)
        print(format_table(headers, rows + [total, whole]))


def report_summary(ratio_rows, memory_rows):
    print("\n== Targets ==")
    rows = [
        (row["label"], row["backend"], f"{row['ratio']:.2f}",
         f"{row['flop_ratio']:.2f}", row["target"], row["verdict"])
        for row in ratio_rows
    ]
    rows += [
        ("peak memory E=64 / E=8: " + row["measure"], "", f"{row['ratio']:.2f}",
         "", f"<= {MEMORY_TARGET_BOUND:g}", row["verdict"])
        for row in memory_rows
    ]
    print(format_table(
        ("ratio", "backend", "measured", "expert-FLOP ratio", "target",
         "verdict"),
        rows,
    ))
    print("(keras-hub is compared with SparseMoE at capacity factor 1.25, "
          "the default; 'report' = no target on that backend.)")


def report_background_load(time_records):
    """Warn when other processes competed for the CPU during timing."""
    loads = {}
    for record in time_records:
        loads[record["backend"]] = max(
            loads.get(record["backend"], 0.0), record["background_cores"]
        )
    print("\nCPU used by other processes while timing (cores, average): "
          + ", ".join(f"{b} {load:.2f}" for b, load in loads.items()))
    if any(load > 0.1 for load in loads.values()):
        print("WARNING: the machine was not idle; timings may be disturbed. "
              "Re-run on an idle machine.")


def run_parent(args):
    sizes = sizes_from_args(args)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"Unknown backends: {sorted(unknown)}")
    print(
        f"T={sizes.tokens} tokens as {list(sizes.input_shape)}, d="
        f"{sizes.hidden_dim}, f={sizes.intermediate_dim} per expert, top-"
        f"{sizes.top_k}, float32; median of {args.repeats} runs "
        f"(keras-hub E=64: {min(args.repeats, args.heavy_repeats)}); "
        f"SparseMoE and dense interleaved in one process per backend, each "
        f"keras-hub layer in its own.",
        flush=True,
    )
    started = time.perf_counter()
    configs = [
        config
        for config in LAYER_CONFIGS
        if not (args.skip_keras_hub and config.kind == "keras_hub_mixtral")
    ]
    # SparseMoE and dense are interleaved in one process; each keras-hub
    # layer gets a process of its own, as its GB-sized buffers leave the
    # process (its allocator) in a state where the others run slower.
    config_groups = [[c for c in configs if not c.own_process]]
    config_groups += [[c] for c in configs if c.own_process]
    time_records, memory_records, breakdown_records = [], [], []
    for backend in backends:
        for group in config_groups:
            if group:
                records = spawn_worker(backend, "time", args, group)
                time_records += [r for r in records if r["kind"] == "time"]
    if not args.skip_memory:
        # Large buffers are mmapped, so freed memory leaves the RSS at once.
        malloc_env = {
            "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
        }
        for backend in backends:
            records = spawn_worker(
                backend, "memory", args, extra_env=malloc_env
            )
            memory_records += [r for r in records if r["kind"] == "memory"]
    if not args.skip_breakdown:
        for backend in backends:
            records = spawn_worker(backend, "breakdown", args)
            breakdown_records += [
                r for r in records if r["kind"] == "breakdown"
            ]

    ratio_rows = compute_ratios(time_records, backends)
    memory_rows = compute_memory_rows(time_records, memory_records, backends)
    report_times(time_records, backends)
    report_memory(memory_records, memory_rows)
    report_breakdown(breakdown_records)
    report_summary(ratio_rows, memory_rows)
    report_background_load(time_records)
    print(f"\nTotal wall time: {time.perf_counter() - started:.0f} s")
    if args.json_out:
        with open(args.json_out, "w") as json_file:
            json.dump(
                {
                    "sizes": dataclasses.asdict(sizes),
                    "times": time_records,
                    "memory": memory_records,
                    "breakdown": breakdown_records,
                    "ratios": ratio_rows,
                    "memory_ratios": memory_rows,
                },
                json_file,
                indent=1,
            )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated Keras backends to run")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per configuration (median reported)")
    parser.add_argument("--heavy-repeats", type=int, default=3,
                        help="at most this many runs of keras-hub E=64")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs first (the first one compiles)")
    parser.add_argument("--breakdown-repeats", type=int, default=5,
                        help="timed runs per stage in the breakdown")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per step (default 4096, 256 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, for a smoke run")
    parser.add_argument("--skip-keras-hub", action="store_true",
                        help="leave out the keras-hub Mixtral blocks")
    parser.add_argument("--skip-memory", action="store_true",
                        help="leave out the peak-memory measurement")
    parser.add_argument("--skip-breakdown", action="store_true",
                        help="leave out the per-stage time breakdown")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time torch.compile on SparseMoE and dense")
    parser.add_argument("--json-out", default=None,
                        help="write every record to this JSON file")
    parser.add_argument("--worker", choices=("time", "memory", "breakdown"),
                        dest="mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.mode is None:
        run_parent(args)
    else:
        sys.path.insert(0, os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        run_worker(args)


if __name__ == "__main__":
    main()
