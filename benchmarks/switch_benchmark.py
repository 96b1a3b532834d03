"""Switch Transformer encoder-decoder training throughput, three ways.

Trains, on the current Keras backend, side by side and on the same random
token batches:
- `keras_moe`: a `SwitchSeq2SeqLM` shaped like Switch-Base-8 (T5 v1.0
  blocks, ReLU feed-forward, a top-1 Switch layer of 8 experts in every
  other block, capacity factor 1.25), scaled down to fit a CPU;
- `keras_moe dense`: the same `SwitchSeq2SeqLM` without Switch layers
  (`encoder_sparse_step=0, decoder_sparse_step=0`): what the experts,
  router and dispatch cost, against the same stack;
- `keras_hub T5`: keras-hub's `T5Seq2SeqLM` of the same dense shape (ReLU,
  not gated, tied embeddings): the model without its experts, written by
  keras-hub;
- `transformers`: Hugging Face's `SwitchTransformersForConditionalGeneration`
  of the same shape in PyTorch (eager, `torch.optim.AdamW`);
- `transformers T5`: Hugging Face's `T5ForConditionalGeneration` of the
  same dense shape: what transformers' own Switch layers cost.

Each model takes `--warmup` training steps (compilation), then
`--steps` timed steps; the report gives the median step and the training
tokens per second (source plus target tokens of a batch over the median
step), and each model's throughput relative to keras-moe. The machine is
checked before the run (`--require-idle` stops a run on a busy machine)
and the CPU other processes took while each model was timed is reported:
eager PyTorch suffers from competing load far more than the compiled
backends, so ratios taken under load mislead.

Usage:
    KERAS_BACKEND=jax python benchmarks/switch_benchmark.py
    KERAS_BACKEND=torch python benchmarks/switch_benchmark.py --quick
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import harness  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = {
    # d_model, heads, d_kv, d_ff, layers per stack, experts.
    "default": dict(hidden_dim=256, num_heads=4, key_value_dim=64,
                    intermediate_dim=1024, num_layers=4, num_experts=8),
    "quick": dict(hidden_dim=32, num_heads=2, key_value_dim=16,
                  intermediate_dim=64, num_layers=2, num_experts=8),
}


def batches(args, vocabulary_size, count):
    rng = np.random.default_rng(0)
    for _ in range(count):
        size = (args.batch_size, args.encoder_length)
        encoder = rng.integers(2, vocabulary_size, size)
        size = (args.batch_size, args.decoder_length + 1)
        decoder = rng.integers(2, vocabulary_size, size)
        yield (
            {
                "encoder_token_ids": encoder.astype("int32"),
                "encoder_padding_mask": np.ones_like(encoder, "int32"),
                "decoder_token_ids": decoder[:, :-1].astype("int32"),
                "decoder_padding_mask": np.ones_like(decoder[:, :-1], "int32"),
            },
            decoder[:, 1:].astype("int32"),
        )


def time_steps(step, data, warmup):
    """Run `step(x, y)` on each batch; the seconds of the steps after `warmup`."""
    seconds = []
    for i, (x, y) in enumerate(data):
        start = time.perf_counter()
        step(x, y)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def keras_moe_steps(args, shape, sparse_step=2):
    from keras_moe.models import SwitchEncoderDecoderBackbone
    from keras_moe.models import SwitchSeq2SeqLM

    backbone = SwitchEncoderDecoderBackbone(
        vocabulary_size=args.vocabulary_size, **shape,
        encoder_sparse_step=sparse_step, decoder_sparse_step=sparse_step,
        dropout=0.0, capacity_factor=1.25,
    )
    model = SwitchSeq2SeqLM(backbone)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))

    def step(x, y):
        model.train_on_batch(x, y)

    return step


def keras_hub_t5_steps(args, shape):
    import keras_hub

    dense = {k: v for k, v in shape.items() if k != "num_experts"}
    backbone = keras_hub.models.T5Backbone(
        vocabulary_size=args.vocabulary_size, dropout=0.0, activation="relu",
        use_gated_activation=False, tie_embedding_weights=True, **dense,
    )
    model = keras_hub.models.T5Seq2SeqLM(backbone)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))

    def step(x, y):
        model.train_on_batch(x, y)

    return step


def _torch_training_step(model, **call_arguments):
    """A PyTorch training step of a transformers seq2seq `model` (AdamW)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        outputs = model(
            input_ids=torch.from_numpy(x["encoder_token_ids"]).long(),
            attention_mask=torch.from_numpy(x["encoder_padding_mask"]).long(),
            decoder_input_ids=torch.from_numpy(x["decoder_token_ids"]).long(),
            labels=torch.from_numpy(y).long(),
            **call_arguments,
        )
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()

    return step


def _transformers_shape(args, shape):
    """The `T5Config`-style arguments of `shape`."""
    return dict(
        vocab_size=args.vocabulary_size, d_model=shape["hidden_dim"],
        d_kv=shape["key_value_dim"], d_ff=shape["intermediate_dim"],
        num_layers=shape["num_layers"], num_decoder_layers=shape["num_layers"],
        num_heads=shape["num_heads"], dropout_rate=0.0,
    )


def transformers_steps(args, shape):
    import torch
    import transformers

    config = transformers.SwitchTransformersConfig(
        **_transformers_shape(args, shape), num_experts=shape["num_experts"],
        num_sparse_encoder_layers=shape["num_layers"] // 2,
        num_sparse_decoder_layers=shape["num_layers"] // 2,
        # Switch's capacity factor 1.25 over one sequence's tokens.
        expert_capacity=int(np.ceil(1.25 * args.encoder_length / shape["num_experts"])),
    )
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).train()
    # With the router logits, the router losses are part of the loss.
    return _torch_training_step(model, output_router_logits=True)


def transformers_t5_steps(args, shape):
    import torch
    import transformers

    config = transformers.T5Config(
        **_transformers_shape(args, shape), feed_forward_proj="relu"
    )
    torch.manual_seed(0)
    return _torch_training_step(
        transformers.T5ForConditionalGeneration(config).train()
    )


MODELS = {
    "keras_moe": keras_moe_steps,
    "keras_moe dense": lambda args, shape: keras_moe_steps(args, shape, sparse_step=0),
    "keras_hub T5": keras_hub_t5_steps,
    "transformers": transformers_steps,
    "transformers T5": transformers_t5_steps,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder-length", type=int, default=128)
    parser.add_argument("--decoder-length", type=int, default=32)
    parser.add_argument("--vocabulary-size", type=int, default=8192)
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS)
    )
    harness.add_idle_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
        args.batch_size, args.encoder_length, args.decoder_length = 2, 16, 8
        args.vocabulary_size = 128
    shape = SHAPES["quick" if args.quick else "default"]
    tokens = args.batch_size * (args.encoder_length + args.decoder_length)
    print(f"Backend: {keras.backend.backend()}; shape: {shape}; batch "
          f"{args.batch_size} x ({args.encoder_length} + {args.decoder_length}) tokens")
    harness.check_idle(refuse=args.require_idle)
    results, others = {}, {}
    for name in args.models:
        step = MODELS[name](args, shape)
        data = batches(args, args.vocabulary_size, args.warmup + args.steps)
        with harness.OtherCpuLoad(own="self") as load:
            median = statistics.median(time_steps(step, data, args.warmup))
        others[name] = load.cores
        results[name] = tokens / median
        print(f"{name:>14}: median step {median * 1000:8.1f} ms, "
              f"{results[name]:9.0f} training tokens/s")
    harness.warn_if_busy(others)
    if "keras_moe" in results:
        for name, rate in results.items():
            print(f"{name:>14} / keras_moe tokens/s: {rate / results['keras_moe']:.2f}")


if __name__ == "__main__":
    main()
