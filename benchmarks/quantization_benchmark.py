"""What quantization does to a preset: expert memory, step time, logits.

    KERAS_BACKEND=jax python benchmarks/quantization_benchmark.py
    KERAS_BACKEND=jax python benchmarks/quantization_benchmark.py --quick

For each preset (at its own widths) the float32 model and its
`model.quantize("int8")`, `model.quantize("int4")` and
`model.quantize("float8")` copies are built from the same seed, and one
mixed recipe: the routed experts (`Experts`) in int4, every other layer
weight-only int8 (two `model.quantize` calls with complementary `filters`):

- memory: bytes of the routed experts' variables (`*/experts/*`), and of
  every feed-forward variable (routed experts, shared experts and dense
  layers: what `Experts` and `FeedForward` quantize);
- logits: correlation with the float model over the real tokens of a padded
  batch, for Keras' default int8 (weights and, per token, activations) and
  weight-only int8 (`Int8QuantizationConfig(activation_quantizer=None)`)
  and float8 (float kernels, each projection computed in float8 with
  delayed scaling) and int4 (Keras' default `Int4QuantizationConfig`:
  packed 4-bit kernels with a float32 scale per output channel and group of
  128 input rows; Keras' own int4 for the attention), over several seeds (the models are untrained: near-tied routing choices
  can flip, which is what moves the correlation);
- step time: the median over `--repeats` of a compiled inference step
  (`predict_on_batch`) and of a training step (`train_on_batch`) on
  `[batch, length]` tokens; int8 and int4 kernels are frozen, so those
  models train their other weights (float8 trains every weight).

Prints one table per preset, Markdown-ready.
"""

import argparse
import warnings

import keras
import numpy as np
from keras import ops

from keras_moe import presets
from keras_moe.layers import Experts
from keras_moe.layers import FeedForward

import harness


def weight_only_int8():
    return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)


# name -> the arguments of each `model.quantize` call, in order.
MODES = {
    "float32": (),
    "int8 (W8A8)": ({"mode": "int8"},),
    "int8 weight-only": ({"mode": "int8", "config": weight_only_int8()},),
    "float8": ({"mode": "float8"},),
    "int4 (all layers)": ({"mode": "int4"},),
    "int4 experts + int8 w-o": (
        {"mode": "int4", "filters": lambda layer: isinstance(layer, Experts)},
        {"config": weight_only_int8(),
         "filters": lambda layer: not isinstance(layer, Experts)},
    ),
}


def build(name, seed, mode, overrides):
    keras.utils.set_random_seed(seed)
    model = presets.load(name, preprocessor=None, **overrides)
    for arguments in MODES[mode]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers Keras does not quantize
            model.quantize(**arguments)
    return model


def feed_forward_weights(model):
    return [
        w
        for layer in model._flatten_layers()
        if isinstance(layer, (Experts, FeedForward))
        for w in layer.weights
    ]


def token_batch(batch, length, vocabulary_size, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocabulary_size, size=(batch, length)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[0, length // 2 :] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def run(name, args):
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    vocabulary_size = presets.config(name)["vocabulary_size"]
    inputs = token_batch(args.batch, args.length, vocabulary_size)
    real = inputs["padding_mask"].astype(bool)
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    rows = []
    for mode in args.modes.split(","):
        correlations = []
        for seed in range(args.seeds):
            model = build(name, seed, mode, overrides)
            reference = build(name, seed, "float32", overrides) if MODES[mode] else model
            logits = ops.convert_to_numpy(model(inputs))
            expected = ops.convert_to_numpy(reference(inputs))
            correlations.append(
                np.corrcoef(logits[real].ravel(), expected[real].ravel())[0, 1]
            )
        model = build(name, 0, mode, overrides)
        experts = [w for w in model.weights if "/experts/" in w.path]
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        infer_ms = harness.median_ms(
            lambda: model.predict_on_batch(inputs), 2, args.repeats
        )
        train_ms = harness.median_ms(
            lambda: model.train_on_batch(inputs, labels), 2, args.repeats
        )
        rows.append((
            mode, harness.variable_bytes(experts),
            harness.variable_bytes(feed_forward_weights(model)),
            min(correlations), max(correlations), infer_ms, train_ms,
        ))
    float_row = rows[0]
    print(f"\n{name} ({keras.backend.backend()}, {overrides or 'all layers'}, "
          f"batch {args.batch} x {args.length} tokens, {args.seeds} seeds)\n")
    print(harness.markdown_table(
        ("mode", "routed experts MiB", "all FFN MiB", "experts smaller",
         "logits corr. (min-max)", "inference ms", "train step ms"),
        [(mode, f"{experts / 2**20:.2f}", f"{ffn / 2**20:.2f}",
          f"{float_row[1] / experts:.2f}x", f"{low:.4f}-{high:.4f}",
          f"{infer_ms:.1f}", f"{train_ms:.1f}")
         for mode, experts, ffn, low, high, infer_ms, train_ms in rows],
    ))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", default="mixtral_small,deepseek_small")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated names of MODES (float32 first)")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    harness.add_idle_argument(parser)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "float32" or not set(modes) <= set(MODES):
        parser.error(f"--modes: names of {sorted(MODES)}, float32 first. "
                     f"Received: {args.modes!r}")
    harness.check_idle(refuse=args.require_idle)
    if args.quick:
        # Two layers: deepseek_small's first layer is dense.
        args.num_layers, args.batch, args.length = 2, 2, 16
        args.seeds, args.repeats = 1, 1
    background = {}
    for name in args.presets.split(","):
        with harness.OtherCpuLoad(own="self") as load:
            run(name, args)
        background[name] = load.cores
    harness.warn_if_busy(background)


if __name__ == "__main__":
    main()
