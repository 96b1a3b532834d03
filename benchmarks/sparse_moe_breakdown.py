"""Where the time of a `keras_moe.layers.SparseMoE` training step goes.

Command, from the repository root (`sparse_moe_benchmark.py` runs it last,
unless given `--skip-breakdown`):

    .venv/bin/python benchmarks/sparse_moe_breakdown.py

Options: `--backends tensorflow,jax,torch`, `--repeats 5`, `--warmup 2`,
`--tokens 4096`, `--quick` (tiny sizes, a smoke run), `--json-out FILE`,
`--require-idle`.

The workload of sparse_moe_benchmark.py (T=4096 tokens of d=512 as
[8, 512, 512], f=1024 SwiGLU experts, top-2, float32, `SparseMoE` with 8
and 64 experts at capacity factor 1.25). Its step is split into its stages
(router, dispatch plan, dispatch gather, experts, combine, load-balancing
loss), mirroring `SparseMoE.call`; each stage is compiled (on PyTorch: run
eagerly) and timed alone, forward and forward+backward, beside the whole
step. Timed alone, a stage misses the fusion XLA does across stages, so on
JAX the whole jitted step is also profiled (`jax.profiler`) and the time of
each XLA op is attributed to the keras_moe function that produced it, from
the Python stack XLA records for every op (backward ops included). Each
backend runs in its own subprocess.
"""

import argparse

import harness

# (key, number of experts, capacity factor), as in sparse_moe_benchmark.py.
CONFIGS = (("sparse_e8", 8, 1.25), ("sparse_e64", 64, 1.25))
LABELS = {"sparse_e8": "SparseMoE E=8 cf=1.25",
          "sparse_e64": "SparseMoE E=64 cf=1.25"}

ROUTER_STAGE = "router (matmul, softmax, top-k)"
PLAN_STAGE = "dispatch plan (argsorts, counts)"
DISPATCH_STAGE = "dispatch (gather to [E, C, d])"
EXPERTS_STAGE = "experts (3 batched einsums)"
COMBINE_STAGE = "combine (gather back, weight, sum)"
AUX_LOSS_STAGE = "load-balancing loss"
# keras_moe functions -> stage, to attribute profiled XLA ops to stages
# (the innermost listed function of an op's stack wins).
STAGE_OF_FUNCTION = {
    "TopKRouter.call": ROUTER_STAGE,
    "compute_dispatch_plan": PLAN_STAGE,
    "dispatch": DISPATCH_STAGE,
    "FeedForwardWeights.call": EXPERTS_STAGE,  # the expert bank's call
    "MoELayer._run_experts": EXPERTS_STAGE,  # where the layer calls it
    "combine": COMBINE_STAGE,
    "load_balancing_loss": AUX_LOSS_STAGE,
    "SparseMoE.call": "SparseMoE.call (reshapes)",
}
OUTSIDE_STAGE = "outside the layer (loss)"


def build_layer(num_experts, capacity_factor, sizes):
    import keras

    from keras_moe.layers import SparseMoE

    keras.utils.set_random_seed(harness.SEED)
    layer = SparseMoE(
        num_experts=num_experts,
        intermediate_dim=sizes.intermediate_dim,
        top_k=sizes.top_k,
        capacity_factor=capacity_factor,
    )
    layer.build(sizes.input_shape)
    return layer


def sparse_moe_stages(layer, capacity, sizes, inputs):
    """SparseMoE's step as stages, mirroring its `call`.

    Returns:
        stages as (name, function, number of differentiable arguments,
        arguments), as `harness.function_steps` takes them; each stage's
        arguments come from running the previous stages once, eagerly.
    """
    from keras import ops

    from keras_moe.ops import combine
    from keras_moe.ops import compute_dispatch_plan
    from keras_moe.ops import dispatch
    from keras_moe.ops import load_balancing_loss

    num_experts = layer.num_experts

    def weights_of(sublayer):
        return [ops.convert_to_tensor(v.value)
                for v in sublayer.trainable_variables]

    def router_stage(router_weights, tokens):
        routing, _ = layer.router.stateless_call(router_weights, [], tokens)
        floats = (routing.expert_weights, routing.router_probs)
        return floats, routing.expert_ids

    def plan_stage(expert_ids):
        return compute_dispatch_plan(expert_ids, num_experts, capacity), None

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
    return (
        (ROUTER_STAGE, router_stage, 2, (router_weights, tokens)),
        (PLAN_STAGE, plan_stage, 0, (expert_ids,)),
        (DISPATCH_STAGE, dispatch_stage, 1, (tokens, plan)),
        (EXPERTS_STAGE, experts_stage, 2, (expert_weights, buffers)),
        (COMBINE_STAGE, combine_stage, 2,
         (expert_outputs, combine_weights, plan)),
        (AUX_LOSS_STAGE, aux_loss_stage, 1,
         (router_probs, plan.expert_counts)),
    )


def worker(backend, sizes, args):
    """Time SparseMoE's stages, each compiled alone, and its whole step."""
    from keras_moe.ops import expert_capacity

    inputs = harness.make_inputs(sizes)

    def median_ms(run):
        return harness.median_ms(run, args.warmup, args.repeats)

    for key, num_experts, capacity_factor in CONFIGS:
        layer = build_layer(num_experts, capacity_factor, sizes)
        capacity = expert_capacity(
            sizes.tokens, num_experts, sizes.top_k, capacity_factor
        )
        stage_records = []
        for name, stage, num_differentiable, stage_args in sparse_moe_stages(
            layer, capacity, sizes, inputs
        ):
            forward, forward_backward = harness.function_steps(
                backend, stage, num_differentiable, stage_args
            )
            forward_ms = median_ms(forward)
            stage_records.append({
                "stage": name,
                "forward_ms": forward_ms,
                "forward_backward_ms": (
                    median_ms(forward_backward)
                    if num_differentiable else forward_ms  # integers only
                ),
            })
        whole_step = harness.gradient_step(backend, layer, inputs)
        record = {
            "kind": "breakdown",
            "config": key,
            "capacity": capacity,
            "stages": stage_records,
            "whole_step_ms": median_ms(whole_step.run),
        }
        if backend == "jax":
            record["profiled_stage_ms"], record["profiled_wall_ms"] = (
                harness.profile_jax_step(
                    whole_step, STAGE_OF_FUNCTION, "keras_moe", OUTSIDE_STAGE
                )
            )
        harness.emit(record)
        print(f"  breakdown of {key} done", flush=True)


def report(record):
    how = "run eagerly" if record["backend"] == "torch" else "compiled"
    print(f"\n== {record['backend']}: {LABELS[record['config']]}, C="
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
    print(harness.format_table(headers, rows + [total, whole]))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default=",".join(harness.BACKENDS),
                        help="comma-separated Keras backends to run")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per stage (median reported)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs first (the first one compiles)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per step (default 4096, 256 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, for a smoke run")
    harness.add_json_argument(parser)
    harness.add_idle_argument(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = harness.sizes_for(args.quick, args.tokens)
    if args.worker:
        worker(args.worker, sizes, args)
        return

    harness.check_idle(refuse=args.require_idle)
    records = []
    for backend in harness.parse_backends(args.backends):
        worker_args = ["--worker", backend, "--repeats", str(args.repeats),
                       "--warmup", str(args.warmup)]
        worker_args += ["--tokens", str(args.tokens)] if args.tokens else []
        worker_args += ["--quick"] if args.quick else []
        records += harness.spawn_worker(
            __file__, worker_args, backend, label=f"{backend} breakdown",
            check=False,
        ).records
    for record in records:
        report(record)
    harness.write_json(args.json_out, {"breakdown": records})


if __name__ == "__main__":
    main()
