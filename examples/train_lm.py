"""Train a preset MoE language model with `model.fit`, then sample from it.

Loads a preset (`mixtral_small` by default: 8 SwiGLU experts, top-2 routing,
grouped-query attention with RoPE, a byte-level tokenizer) with
`keras_moe.presets.load`, trains it on text with `model.fit` (progress bar,
validation loss after every epoch, TensorBoard logs), and saves the trained
model as a `.keras` file. It ends on what the training did: a sample from
`model.generate()` before and after training, side by side, and the
validation loss before and after against a simple baseline, the loss of
byte frequencies alone (a unigram model of the training bytes), with the
command that trains longer.

The default text is the Python standard library's own source code, read
from the folder `sysconfig` reports, so nothing is downloaded; pass
`--text-files` to train on your own files instead. With the defaults the run
takes about two minutes on a 2-core CPU.

Usage:

    python examples/train_lm.py
    KERAS_BACKEND=jax python examples/train_lm.py --preset deepseek_small
    python examples/train_lm.py --text-files notes/*.md --epochs 10
    tensorboard --logdir logs/train_lm/tensorboard
    python examples/train_lm.py --help
"""

import argparse
import math
import sys
import sysconfig
import time
import unicodedata
from pathlib import Path

import keras
import keras_hub
import numpy as np

from keras_moe import presets
from keras_moe.utils.command_line import fraction
from keras_moe.utils.command_line import non_negative_int
from keras_moe.utils.command_line import positive_float
from keras_moe.utils.command_line import positive_int

# Standard library folders that are tests, bundled third-party code or tools
# rather than library source.
SKIPPED_STDLIB_FOLDERS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "ensurepip",
    "__pycache__",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Train a keras-moe preset language model with model.fit on text "
            "(by default the Python standard library's source), then sample."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--preset",
        default="mixtral_small",
        help="preset to train; one with the byte tokenizer: "
        + ", ".join(small_presets()),
    )
    add(
        "--text-files",
        nargs="+",
        type=Path,
        help="UTF-8 text files to train on (default: the Python standard "
        "library's source files)",
    )
    add(
        "--max-bytes",
        type=positive_int,
        default=3_000_000,
        help="read at most this many bytes of text",
    )
    add(
        "--validation-fraction",
        type=fraction,
        default=0.05,
        help="fraction of the text, taken from its end, held out for "
        "validation",
    )
    # Training.
    add("--epochs", type=positive_int, default=6, help="epochs to train for")
    add(
        "--steps",
        type=positive_int,
        default=25,
        help="training steps (batches) per epoch",
    )
    add(
        "--batch-size",
        type=positive_int,
        help="sequences per batch (default: the preset's)",
    )
    add(
        "--sequence-length",
        type=positive_int,
        default=128,
        help="tokens per training sequence (the preset suggests "
        "a longer one; shorter steps are faster on a CPU)",
    )
    add(
        "--learning-rate",
        type=positive_float,
        help="peak learning rate (default: the preset's)",
    )
    add(
        "--validation-steps",
        type=positive_int,
        default=8,
        help="validation batches evaluated after each epoch",
    )
    add(
        "--time-budget",
        type=positive_float,
        help="stop training after this many seconds (checked after each "
        "step); the run then continues with evaluation and sampling",
    )
    add(
        "--num-layers",
        type=positive_int,
        help="override the preset's number of layers",
    )
    # Outputs.
    add(
        "--output-dir",
        type=Path,
        default=Path("logs/train_lm"),
        help="where the trained model is saved",
    )
    add(
        "--tensorboard-dir",
        type=Path,
        help="Keras TensorBoard logs (default: OUTPUT_DIR/tensorboard)",
    )
    add("--prompt", default="def ", help="text that sampling starts from")
    add(
        "--sample-length",
        type=non_negative_int,
        default=160,
        help="tokens to generate after training (0 to skip)",
    )
    add("--seed", type=int, default=0, help="seed of weights and data order")
    add(
        "--fast",
        action="store_true",
        help="a seconds-long smoke run (tiny model, data and steps) for tests",
    )
    args = parser.parse_args(argv)
    if args.preset not in presets.names():
        parser.error(
            f"--preset {args.preset!r} is not a preset; choose one of "
            + ", ".join(small_presets())
        )
    if args.preset not in small_presets():
        parser.error(
            f"--preset {args.preset!r} is not a small causal LM (full-size "
            "presets need a converted checkpoint, `switch_t5_small` is an "
            "encoder-decoder); choose one of "
            + ", ".join(small_presets())
        )
    for path in args.text_files or []:
        if not path.is_file():
            parser.error(f"--text-files: {str(path)!r} is not a file")
    if args.fast:
        args.epochs = 1
        args.steps = 2
        args.batch_size = 2
        args.sequence_length = 32
        args.validation_steps = 1
        args.max_bytes = min(args.max_bytes, 100_000)
        args.num_layers = args.num_layers or 1
        args.sample_length = min(args.sample_length, 8)
    return args


def small_presets():
    # Causal LMs only: `switch_t5_small` is an encoder-decoder (seq2seq).
    return [
        name
        for name in presets.names()
        if presets.info(name).get("tokenizer") == "byte"
        and "encoder_sparse_step" not in presets.config(name)
    ]


def stdlib_source_files():
    """The standard library's `.py` files, in a fixed order.

    Top-level modules come first, then packages, skipping tests and bundled
    tools, so that a byte budget takes the core library.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if len(relative.parts) > 1 and not (
            SKIPPED_STDLIB_FOLDERS & set(relative.parts[:-1])
        ):
            files.append(path)
    return files


def read_corpus(files, max_bytes):
    """Concatenates files (each ending with a blank line) up to `max_bytes`."""
    texts = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            text = text.encode("utf-8")[: max_bytes - total].decode(
                "utf-8", errors="ignore"
            )
            size = len(text.encode("utf-8"))
        texts.append(text.rstrip("\n") + "\n\n")
        total += size
        if total >= max_bytes:
            break
    return "".join(texts)


def split_into_sequences(text, sequence_length):
    """Non-overlapping pieces of `sequence_length` characters.

    The preprocessor adds a start token in front, so a model input holds the
    start token and the first `sequence_length - 1` characters, and the
    labels are those characters shifted by one.
    """
    count = len(text) // sequence_length
    return np.array(
        [
            text[i * sequence_length : (i + 1) * sequence_length]
            for i in range(count)
        ]
    )


class TimeBudget(keras.callbacks.Callback):
    """Stops `fit` once `seconds` have passed since training began."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.stopped_at_step = None

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if time.perf_counter() - self.started > self.seconds:
            self.model.stop_training = True
            self.stopped_at_step = self.steps


def unigram_counts(sequences, sequence_length, vocabulary_size, end_token_id):
    """How often each token is a training label: bytes and end tokens.

    The preprocessor's labels for a sequence are its first
    `sequence_length - 1` bytes and the end token.

    Args:
        sequences: the training sequences (strings).
        sequence_length: the preprocessor's `sequence_length`.
        vocabulary_size: the number of token ids.
        end_token_id: the id of the end token.
    """
    counts = np.zeros(vocabulary_size, "float64")
    for sequence in sequences:
        data = sequence.encode("utf-8")[: sequence_length - 1]
        counts += np.bincount(
            np.frombuffer(data, np.uint8), minlength=vocabulary_size
        )
        counts[end_token_id] += 1
    return counts


def unigram_loss(counts, labels, sample_weight):
    """The loss of predicting every token from its frequency alone.

    The cross-entropy (nats per token) of `labels` under the add-one
    smoothed unigram distribution of `counts`, reduced as Keras reduces
    the model's loss (weighted sum over all label positions).

    Args:
        counts: `[vocabulary_size]` token counts (`unigram_counts`).
        labels: int `[batch, length]` labels.
        sample_weight: `[batch, length]` weights (0 on padding).
    """
    probabilities = (counts + 1) / (counts.sum() + len(counts))
    labels = np.asarray(labels)
    weights = np.asarray(sample_weight, "float64")
    return float(-(np.log(probabilities[labels]) * weights).sum() / weights.size)


def printable(text):
    """`text` with tabs as spaces, and as `·` the characters that would
    break a column: control characters, wide (CJK) and zero-width ones."""
    text = text.replace("\t", "    ")
    return "".join(
        c
        if c == "\n"
        or (
            c.isprintable()
            and unicodedata.east_asian_width(c) not in ("W", "F")
            and not unicodedata.combining(c)
            and unicodedata.category(c) not in ("Mn", "Me", "Cf")
        )
        else "\u00b7"
        for c in text
    )


def side_by_side(left, right, width=38, titles=("", "")):
    """Two texts in two columns of `width` characters (long lines wrap).

    Args:
        left: the text of the left column.
        right: the text of the right column.
        width: the width of each column.
        titles: the headings of the two columns.
    """

    def column(text):
        lines = []
        for line in printable(text).split("\n"):
            lines += [line[i : i + width] for i in range(0, len(line), width)]
            if not line:
                lines.append("")
        return lines

    left, right = column(left), column(right)
    left += [""] * (len(right) - len(left))
    right += [""] * (len(left) - len(right))
    rows = [(titles[0], titles[1]), ("-" * width, "-" * width)]
    rows += list(zip(left, right))
    return "\n".join(f"  {a:<{width}} | {b}".rstrip() for a, b in rows)


def longer_run_command(argv, epochs):
    """The command line of this run with `--epochs` set to `epochs`.

    `--fast` (which fixes a single epoch) and `--time-budget` (which
    would stop it as early) are left out.

    Args:
        argv: the command-line arguments of this run.
        epochs: the number of epochs of the longer run.
    """
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument in ("--epochs", "--time-budget"):
            skip = True
        elif argument != "--fast" and not argument.startswith(
            ("--epochs=", "--time-budget=")
        ):
            kept.append(argument)
    return " ".join(["python", "examples/train_lm.py", *kept, f"--epochs {epochs}"])


def make_optimizer(training, learning_rate, total_steps):
    warmup_steps = int(total_steps * training.get("warmup_fraction", 0.1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.1 * learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
        alpha=0.1,
    )
    return keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=training.get("weight_decay", 0.01),
        clipnorm=training.get("clipnorm", 1.0),
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    training = presets.info(args.preset).get("training", {})
    batch_size = args.batch_size or training.get("batch_size", 8)
    learning_rate = args.learning_rate or training.get("learning_rate", 1e-3)

    if args.text_files:
        source = f"{len(args.text_files)} file(s) given"
        files = args.text_files
    else:
        files = stdlib_source_files()
        source = f"Python standard library source ({files[0].parent})"
    text = read_corpus(files, args.max_bytes)
    split = int(len(text) * (1 - args.validation_fraction))
    train_sequences = split_into_sequences(text[:split], args.sequence_length)
    val_sequences = split_into_sequences(text[split:], args.sequence_length)
    if len(train_sequences) < batch_size or len(val_sequences) < 1:
        sys.exit(
            f"Not enough text: {len(text):,} characters give "
            f"{len(train_sequences)} training and {len(val_sequences)} "
            f"validation sequences of {args.sequence_length}; need at least "
            f"{batch_size} and 1. Pass more --text-files or a shorter "
            "--sequence-length."
        )
    print(
        f"Backend: {keras.backend.backend()}. Text: {source}, "
        f"{len(text.encode('utf-8')):,} bytes: {len(train_sequences):,} "
        f"training and {len(val_sequences):,} validation sequences of "
        f"{args.sequence_length} characters."
    )

    overrides = {}
    if args.num_layers:
        overrides["num_layers"] = args.num_layers
    if args.fast:
        overrides.update(hidden_dim=64, moe_intermediate_dim=64)
    model = presets.load(args.preset, **overrides)
    # The preprocessor packs `sequence_length` tokens: the start token and
    # `sequence_length - 1` characters as inputs, the characters as labels.
    model.preprocessor.sequence_length = args.sequence_length
    counts = presets.count_params(model.backbone.get_config())
    print(
        f"Preset {args.preset!r}: {counts['total']:,} parameters, "
        f"{counts['active']:,} active per token."
    )
    total_steps = args.epochs * args.steps
    model.compile(
        optimizer=make_optimizer(training, learning_rate, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["sparse_categorical_accuracy"],
        # Sampling from the 10 likeliest tokens, a little sharpened.
        sampler=keras_hub.samplers.TopKSampler(
            k=10, seed=args.seed, temperature=0.8
        ),
    )

    rng = np.random.default_rng(args.seed)
    # Epochs of `--steps` batches run through one shuffled pass of the
    # training text after another, so no sequence repeats early.
    passes = -(-total_steps * batch_size // len(train_sequences))
    order = np.concatenate(
        [rng.permutation(len(train_sequences)) for _ in range(passes)]
    )[: total_steps * batch_size]
    val_sequences = val_sequences[: args.validation_steps * batch_size]

    initial_loss = model.evaluate(
        val_sequences, batch_size=batch_size, verbose=0, return_dict=True
    )["loss"]
    vocabulary_size = model.backbone.vocabulary_size
    print(
        f"Validation loss before training: {initial_loss:.4f} "
        f"(a uniform guess over the {vocabulary_size} "
        f"tokens: {math.log(vocabulary_size):.4f})"
    )
    # The baseline: a model that knows only how often each byte occurs in
    # the training text, evaluated on the validation labels.
    counts = unigram_counts(
        train_sequences,
        args.sequence_length,
        vocabulary_size,
        model.preprocessor.tokenizer.end_token_id,
    )
    _, val_labels, val_weights = model.preprocessor(val_sequences)
    baseline_loss = unigram_loss(counts, val_labels, val_weights)
    print(
        f"Bytes-unigram baseline on the validation text: {baseline_loss:.4f} "
        "(byte frequencies of the training text, no context)"
    )
    prompt_length = len(args.prompt.encode("utf-8")) + 1  # + start token.
    max_length = prompt_length + args.sample_length
    sample_before = None
    if args.sample_length > 0:
        sample_before = model.generate(args.prompt, max_length=max_length)

    tensorboard_dir = args.tensorboard_dir or args.output_dir / "tensorboard"
    callbacks = [keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir))]
    budget = None
    if args.time_budget:
        budget = TimeBudget(args.time_budget)
        callbacks.append(budget)
    history = model.fit(
        train_sequences[order],
        batch_size=batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        shuffle=False,  # `order` is already shuffled.
        validation_data=(val_sequences,),
        callbacks=callbacks,
        verbose=1,
    )
    steps_done = total_steps
    if budget and budget.stopped_at_step:
        steps_done = budget.stopped_at_step
        print(
            f"Stopped after {budget.stopped_at_step} steps: the time budget "
            f"of {args.time_budget:g}s was used up."
        )
    losses = history.history["loss"]
    final_val_loss = history.history["val_loss"][-1]
    # The training loss includes the routers' balancing losses.
    print(
        f"Training loss, first epoch: {losses[0]:.4f}, "
        f"last epoch: {losses[-1]:.4f}"
    )
    print(
        f"Validation loss after training: {final_val_loss:.4f} "
        f"({final_val_loss / math.log(2):.2f} bits per token)"
    )

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.output_dir / f"{args.preset}.keras"
    model.save(model_path)
    print(f"Saved the trained model to {model_path}.")
    print(f"TensorBoard logs: tensorboard --logdir {tensorboard_dir}")

    # The ending: what training did, side by side and against a baseline.
    print()
    if sample_before is not None:
        sample_after = model.generate(args.prompt, max_length=max_length)
        print(
            f"Sample from generate() (prompt {args.prompt!r}), before and "
            "after training:"
        )
        print(
            side_by_side(
                sample_before,
                sample_after,
                titles=("before training", f"after {steps_done} steps"),
            )
        )
        print()
    gain = baseline_loss - final_val_loss
    print("Validation loss, nats per token (lower is better):")
    print(f"  before training:         {initial_loss:.4f}")
    print(f"  bytes-unigram baseline:  {baseline_loss:.4f}")
    print(
        f"  after {steps_done} steps:{' ' * max(1, 12 - len(str(steps_done)))}"
        f"{final_val_loss:.4f}  "
        + (
            f"({gain:.2f} below the baseline: the model uses the context "
            "before each byte, not only byte frequencies)"
            if gain > 0
            else f"({-gain:.2f} above the baseline: not yet better than "
            "byte frequencies; train longer)"
        )
    )
    val_losses = history.history["val_loss"]
    if len(val_losses) >= 2 and val_losses[-1] < val_losses[-2]:
        print(
            f"{steps_done} steps are a short run: the validation loss was "
            f"still falling at the end ({val_losses[-2]:.4f} -> "
            f"{val_losses[-1]:.4f} over the last epoch), so more steps lower "
            "it further and the samples become more like the training text. "
            "Four times as many steps (about four times as long):"
        )
    else:
        print(
            f"{steps_done} steps are a short run: more steps usually lower "
            "the validation loss further, and the samples become more like "
            "the training text. Four times as many steps (about four times "
            "as long):"
        )
    epochs = parse_args([]).epochs if args.fast else args.epochs
    print(f"  {longer_run_command(argv, epochs * 4)}")
    print(f"Done in {time.perf_counter() - started:.1f}s.")


if __name__ == "__main__":
    main()
