"""A small Vision Transformer with SoftMoE layers, against the same ViT dense.

Soft MoE (Puigcerver et al. 2023) was made for vision transformers: each
expert processes a few *slots*, every slot a softmax-weighted mix of all
the image's patches, and every patch's output a softmax-weighted mix of all
slot outputs. Nothing is dropped and no balancing loss is needed.

The data is scikit-learn's bundled handwritten digits (1,797 grayscale
images of 8x8 pixels, 10 classes; `sklearn.datasets.load_digits`, nothing is
downloaded), split 80/20 into training and test images, stratified by class.
Each image is cut into 2x2-pixel patches: 16 tokens.

Two models with the same architecture (patch embedding, learned position
embeddings, pre-norm transformer blocks, mean pooling, a linear classifier):
- dense: every block's MLP is a SwiGLU layer of `--mlp-dim` units,
- SoftMoE: the MLPs of the last `--moe-layers` blocks are `SoftMoE` layers
  of `--num-experts` experts of `--mlp-dim` units with `--slots-per-expert`
  slots each. With the defaults there are as many slots as patches (8 x 2 =
  16), so a SoftMoE layer costs about what the dense MLP costs (the expert
  matmuls run on 16 slots instead of 16 tokens, plus the dispatch and
  combine einsums), with 8 times the MLP parameters.
Both train with the same optimizer, schedule, batches and number of steps,
once per seed in `--seeds`; the script reports test accuracy per seed and
the mean. With the defaults it takes a few minutes on a 2-core CPU.

Usage:

    python examples/soft_moe_vision.py
    KERAS_BACKEND=jax python examples/soft_moe_vision.py --seeds 0 1 2 3 4
    python examples/soft_moe_vision.py --num-experts 16 --slots-per-expert 1
    python examples/soft_moe_vision.py --help
"""

import argparse
import time

import keras
import numpy as np
from keras import ops

from keras_moe.layers import FeedForward
from keras_moe.layers import SoftMoE
from keras_moe.utils.command_line import non_negative_int
from keras_moe.utils.command_line import positive_float
from keras_moe.utils.command_line import positive_int

IMAGE_SIZE = 8
NUM_CLASSES = 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Train a small ViT with SoftMoE layers and the same ViT with "
            "dense MLPs on scikit-learn's digits; report test accuracy."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--epochs", type=positive_int, default=40, help="training epochs")
    add("--batch-size", type=positive_int, default=64, help="images per batch")
    add(
        "--learning-rate",
        type=positive_float,
        default=2e-3,
        help="peak learning rate (AdamW, warmup then cosine decay)",
    )
    add(
        "--patch-size",
        type=positive_int,
        default=2,
        help="patch side in pixels; must divide 8",
    )
    add("--hidden-dim", type=positive_int, default=64, help="token width")
    add("--num-layers", type=positive_int, default=4, help="transformer blocks")
    add("--num-heads", type=positive_int, default=4, help="attention heads")
    add(
        "--mlp-dim",
        type=positive_int,
        default=128,
        help="units of the dense MLPs and of each expert",
    )
    add(
        "--moe-layers",
        type=non_negative_int,
        default=2,
        help="the last this many blocks get SoftMoE instead of a dense MLP",
    )
    add("--num-experts", type=positive_int, default=8, help="SoftMoE experts")
    add(
        "--slots-per-expert",
        type=positive_int,
        default=2,
        help="SoftMoE slots per expert",
    )
    add(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one training run of each model per seed (weights, data split "
        "and order)",
    )
    add(
        "--fast",
        action="store_true",
        help="a seconds-long smoke run (one seed, two epochs) for tests",
    )
    args = parser.parse_args(argv)
    if IMAGE_SIZE % args.patch_size:
        parser.error(f"--patch-size ({args.patch_size}) must divide 8")
    if args.hidden_dim % args.num_heads:
        parser.error(
            f"--hidden-dim ({args.hidden_dim}) must be a multiple of "
            f"--num-heads ({args.num_heads})"
        )
    if args.moe_layers > args.num_layers:
        parser.error(
            f"--moe-layers ({args.moe_layers}) must be at most --num-layers "
            f"({args.num_layers})"
        )
    if args.fast:
        args.epochs = 2
        args.seeds = args.seeds[:1]
        args.hidden_dim = 32
        args.num_layers = 2
        args.moe_layers = 1
        args.mlp_dim = 32
    return args


def load_digits(seed):
    """`(x_train, y_train), (x_test, y_test)`: images `[n, 8, 8]` in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target.astype("int32"),
        test_size=0.2,
        stratify=digits.target,
        random_state=seed,
    )
    return (x_train, y_train), (x_test, y_test)


class Patches(keras.layers.Layer):
    """`[batch, 8, 8]` images to `[batch, patches, patch_size ** 2]`."""

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, images):
        p, n = self.patch_size, IMAGE_SIZE // self.patch_size
        x = ops.reshape(images, (-1, n, p, n, p))
        x = ops.transpose(x, (0, 1, 3, 2, 4))
        return ops.reshape(x, (-1, n * n, p * p))

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per token position."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embeddings",
        )

    def call(self, inputs):
        return inputs + ops.cast(self.embeddings, inputs.dtype)


def vision_transformer(args, use_soft_moe):
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE))
    x = Patches(args.patch_size)(images)
    x = keras.layers.Dense(args.hidden_dim, name="patch_embedding")(x)
    x = PositionEmbedding()(x)
    for i in range(args.num_layers):
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        x = x + keras.layers.MultiHeadAttention(
            args.num_heads, args.hidden_dim // args.num_heads
        )(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        if use_soft_moe and i >= args.num_layers - args.moe_layers:
            mlp = SoftMoE(
                args.num_experts,
                args.mlp_dim,
                slots_per_expert=args.slots_per_expert,
                name=f"soft_moe_{i}",
            )
        else:
            mlp = FeedForward(args.mlp_dim, name=f"mlp_{i}")
        x = x + mlp(h)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    return keras.Model(
        images, outputs, name="soft_moe_vit" if use_soft_moe else "dense_vit"
    )


def train_and_test(args, use_soft_moe, seed, data):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = vision_transformer(args, use_soft_moe)
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    warmup = max(steps // 10, 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=steps - warmup,
        warmup_target=args.learning_rate,
        warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
    )
    seconds = time.perf_counter() - started
    test = model.evaluate(
        x_test, y_test, batch_size=256, verbose=0, return_dict=True
    )
    return {
        "params": model.count_params(),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "test_accuracy": float(test["accuracy"]),
        "test_loss": float(test["loss"]),
        "seconds": seconds,
    }


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    tokens = (IMAGE_SIZE // args.patch_size) ** 2
    print(
        f"Backend: {keras.backend.backend()}. scikit-learn digits: 8x8 "
        f"images in {tokens} patches of {args.patch_size}x{args.patch_size}; "
        f"SoftMoE: {args.num_experts} experts x {args.slots_per_expert} "
        f"slots = {args.num_experts * args.slots_per_expert} slots in the "
        f"last {args.moe_layers} of {args.num_layers} blocks.",
        flush=True,
    )
    results = {"dense": [], "SoftMoE": []}
    for seed in args.seeds:
        data = load_digits(seed)
        if seed == args.seeds[0]:
            print(
                f"{len(data[0][0])} training and {len(data[1][0])} test "
                f"images; {args.epochs} epochs of batches of "
                f"{args.batch_size}.",
                flush=True,
            )
        for name in results:
            result = train_and_test(args, name == "SoftMoE", seed, data)
            results[name].append(result)
            print(
                f"seed {seed}, {name:>7}: test accuracy "
                f"{result['test_accuracy']:.2%} (train "
                f"{result['train_accuracy']:.2%}), {result['params']:,} "
                f"parameters, {result['seconds']:.0f}s",
                flush=True,
            )
    print()
    print("| model | parameters | test accuracy, mean over seeds | per seed |")
    print("|---|---:|---:|---|")
    for name, runs in results.items():
        accuracies = [run["test_accuracy"] for run in runs]
        print(
            f"| {name} ViT | {runs[0]['params']:,} | "
            f"{np.mean(accuracies):.2%} | "
            + ", ".join(f"{a:.2%}" for a in accuracies)
            + " |"
        )
    print(f"Done in {time.perf_counter() - started:.1f}s.")


if __name__ == "__main__":
    main()
