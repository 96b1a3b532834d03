"""Train a small byte-level language model whose feed-forward layers are MoE.

The model reads UTF-8 bytes (256 token ids, so no tokenizer) and predicts the
next byte. Each of its transformer blocks is pre-LayerNorm causal
self-attention followed by a pre-LayerNorm `SparseMoE` layer, both with
residual connections. The text is Python's reference documentation, which
ships with CPython (`keras_moe.datasets.offline_corpus`): nothing is
downloaded. With the defaults the run takes about a minute on a 2-core CPU.

Usage:

    python examples/train_sparse_moe.py
    KERAS_BACKEND=jax python examples/train_sparse_moe.py --epochs 2
    python examples/train_sparse_moe.py --help
"""

import argparse
import math
import time

import keras
import numpy as np
from keras import ops

from keras_moe.datasets import byte_lm_arrays
from keras_moe.datasets import offline_corpus
from keras_moe.layers import SparseMoE
from keras_moe.utils.command_line import non_negative_float
from keras_moe.utils.command_line import non_negative_int
from keras_moe.utils.command_line import positive_float
from keras_moe.utils.command_line import positive_int

VOCABULARY_SIZE = 256  # One token per byte value.


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Train a byte-level causal language model built from SparseMoE "
            "layers on Python's bundled documentation, then sample from it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    # Training.
    add("--epochs", type=positive_int, default=5, help="epochs to train for")
    add(
        "--steps-per-epoch",
        type=positive_int,
        default=30,
        help="training batches per epoch; epochs continue through the data",
    )
    add(
        "--batch-size",
        type=positive_int,
        default=32,
        help="sequences per batch",
    )
    add(
        "--sequence-length",
        type=positive_int,
        default=128,
        help="bytes per sequence",
    )
    add(
        "--learning-rate",
        type=positive_float,
        default=3e-3,
        help="peak learning rate, after a warmup over the first 10%% of steps",
    )
    add(
        "--validation-sequences",
        type=positive_int,
        default=128,
        help="validation sequences, taken from the end of the text",
    )
    # Model.
    add(
        "--hidden-dim",
        type=positive_int,
        default=128,
        help="width of the embeddings and residual stream",
    )
    add(
        "--num-layers",
        type=positive_int,
        default=2,
        help="transformer blocks",
    )
    add(
        "--num-heads",
        type=positive_int,
        default=4,
        help="attention heads per block",
    )
    add(
        "--num-experts",
        type=positive_int,
        default=8,
        help="experts per SparseMoE layer",
    )
    add(
        "--intermediate-dim",
        type=positive_int,
        default=256,
        help="hidden width of each expert",
    )
    add(
        "--top-k",
        type=positive_int,
        default=2,
        help="experts each byte is routed to",
    )
    # Sampling after training.
    add(
        "--sample-length",
        type=non_negative_int,
        default=120,
        help="bytes to generate after training (0 to skip)",
    )
    add(
        "--temperature",
        type=non_negative_float,
        default=0.7,
        help="sampling temperature; 0 for greedy decoding",
    )
    add(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, the data order and the sampling",
    )
    args = parser.parse_args(argv)
    if args.hidden_dim % args.num_heads:
        parser.error(
            f"--hidden-dim ({args.hidden_dim}) must be a multiple of "
            f"--num-heads ({args.num_heads})"
        )
    if args.top_k > args.num_experts:
        parser.error(
            f"--top-k ({args.top_k}) must be at most --num-experts "
            f"({args.num_experts})"
        )
    return args


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position to `[batch, length, dim]` inputs."""

    def __init__(self, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length

    def build(self, input_shape):
        self.position_embeddings = self.add_weight(
            shape=(self.sequence_length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="position_embeddings",
        )

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        return inputs + ops.cast(
            self.position_embeddings[:length], inputs.dtype
        )


def build_byte_language_model(
    sequence_length,
    hidden_dim=128,
    num_layers=2,
    num_heads=4,
    num_experts=8,
    intermediate_dim=256,
    top_k=2,
):
    """A causal transformer over bytes with `SparseMoE` feed-forward layers.

    Returns a `keras.Model` mapping int byte ids `[batch, sequence_length]`
    to next-byte logits `[batch, sequence_length, 256]`.
    """
    byte_ids = keras.Input((sequence_length,), dtype="int32", name="byte_ids")
    hidden = keras.layers.Embedding(
        VOCABULARY_SIZE, hidden_dim, name="byte_embedding"
    )(byte_ids)
    hidden = PositionEmbedding(sequence_length, name="position_embedding")(
        hidden
    )
    for index in range(num_layers):
        normalized = keras.layers.LayerNormalization(
            epsilon=1e-5, name=f"block_{index}_attention_norm"
        )(hidden)
        attended = keras.layers.MultiHeadAttention(
            num_heads=num_heads,
            key_dim=hidden_dim // num_heads,
            name=f"block_{index}_attention",
        )(normalized, normalized, use_causal_mask=True)
        hidden = hidden + attended
        normalized = keras.layers.LayerNormalization(
            epsilon=1e-5, name=f"block_{index}_moe_norm"
        )(hidden)
        hidden = hidden + SparseMoE(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            top_k=top_k,
            name=f"block_{index}_moe",
        )(normalized)
    hidden = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(
        hidden
    )
    logits = keras.layers.Dense(VOCABULARY_SIZE, name="logits")(hidden)
    return keras.Model(byte_ids, logits, name="byte_moe_language_model")


def training_order(x_train, y_train, num_sequences, seed):
    """The `num_sequences` training pairs to fit on, in order.

    Short "epochs" of `steps_per_epoch` batches continue where the previous
    one stopped, so one shuffled pass over the data is followed by another
    until `num_sequences` pairs are drawn: no sequence repeats before every
    sequence has been seen.
    """
    rng = np.random.default_rng(seed)
    num_passes = -(-num_sequences // len(x_train))  # Ceiling division.
    order = np.concatenate(
        [rng.permutation(len(x_train)) for _ in range(num_passes)]
    )[:num_sequences]
    return x_train[order], y_train[order]


def pick_prompt(sequences):
    """The first sequence that ends inside prose (a letter, then a space).

    A prompt that ends in code indentation would mostly be continued with
    spaces, which shows little of what the model learned.
    """
    for sequence in sequences:
        if chr(sequence[-2]).isalpha() and sequence[-1] == ord(" "):
            return sequence
    return sequences[0]


def generate(model, prompt_ids, num_bytes, temperature, seed):
    """Extends `prompt_ids` by `num_bytes` bytes drawn one at a time.

    The model has a fixed input length, so each step feeds the last
    `sequence_length` bytes (the prompt must be at least that long) and reads
    the prediction at the last position. `temperature=0` picks the most
    likely byte (greedy decoding).
    """
    sequence_length = model.input.shape[1]
    rng = np.random.default_rng(seed)
    byte_ids = list(prompt_ids)
    for _ in range(num_bytes):
        window = np.array([byte_ids[-sequence_length:]], dtype="int32")
        logits = np.asarray(model.predict_on_batch(window)[0, -1], "float64")
        if temperature == 0:
            byte_ids.append(int(np.argmax(logits)))
            continue
        scaled = logits / temperature
        probabilities = np.exp(scaled - scaled.max())
        probabilities /= probabilities.sum()
        byte_ids.append(int(rng.choice(VOCABULARY_SIZE, p=probabilities)))
    return byte_ids[len(prompt_ids) :]


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()

    (x_train, y_train), (x_val, y_val) = byte_lm_arrays(
        offline_corpus(), args.sequence_length, validation_split=0.1
    )
    x_val = x_val[: args.validation_sequences]
    y_val = y_val[: args.validation_sequences]
    x_fit, y_fit = training_order(
        x_train,
        y_train,
        args.epochs * args.steps_per_epoch * args.batch_size,
        seed=args.seed,
    )
    print(
        f"Backend: {keras.backend.backend()}. Data: {len(x_train)} training "
        f"and {len(x_val)} validation sequences of "
        f"{args.sequence_length} bytes."
    )

    model = build_byte_language_model(
        args.sequence_length,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_experts=args.num_experts,
        intermediate_dim=args.intermediate_dim,
        top_k=args.top_k,
    )
    total_steps = args.epochs * args.steps_per_epoch
    # A short warmup then cosine decay: a fast and stable descent for a run
    # of only a few hundred steps.
    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.1 * args.learning_rate,
        decay_steps=max(total_steps - total_steps // 10, 1),
        warmup_target=args.learning_rate,
        warmup_steps=total_steps // 10,
        alpha=0.1,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.summary()

    initial_loss = model.evaluate(
        x_val, y_val, batch_size=args.batch_size, verbose=0
    )
    print(
        f"Validation loss before training: {initial_loss:.4f} "
        f"(uniform guess: ln 256 = {math.log(VOCABULARY_SIZE):.4f})"
    )
    history = model.fit(
        x_fit,
        y_fit,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        shuffle=False,  # `training_order` already shuffled.
        validation_data=(x_val, y_val),
        verbose=1,
    )
    losses = history.history["loss"]
    final_val_loss = history.history["val_loss"][-1]
    # The training loss includes the routers' load-balancing losses.
    print(
        f"Training loss, first epoch: {losses[0]:.4f}, "
        f"last epoch: {losses[-1]:.4f}"
    )
    print(
        f"Validation loss after training: {final_val_loss:.4f} "
        f"({final_val_loss / math.log(2):.2f} bits per byte)"
    )

    if args.sample_length > 0:
        prompt_ids = pick_prompt(x_val).tolist()
        sample_ids = generate(
            model,
            prompt_ids,
            args.sample_length,
            temperature=args.temperature,
            seed=args.seed,
        )
        prompt_tail = bytes(prompt_ids[-60:]).decode("utf-8", errors="replace")
        sample = bytes(sample_ids).decode("utf-8", errors="replace")
        print(f"Prompt (last 60 bytes): {prompt_tail!r}")
        print(f"Continuation (temperature {args.temperature}): {sample!r}")
    print(f"Done in {time.perf_counter() - started:.1f}s.")


if __name__ == "__main__":
    main()
