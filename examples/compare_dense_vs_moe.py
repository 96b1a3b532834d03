"""Dense vs Mixture-of-Experts decoders at equal active parameters per token.

Trains several byte-level decoder language models (`MoEBackbone` +
`MoECausalLM`: RMSNorm, grouped-query attention with RoPE, SwiGLU
feed-forward layers) on the same text, with the same batches in the same
order, the same number of steps and the same optimizer and learning-rate
schedule. They differ only in their feed-forward layers, which all use the
same number of parameters per token:

- `dense`: one SwiGLU layer of `--ffn-dim` units,
- `switch-E` (Switch Transformer style): E experts of `--ffn-dim` units,
  each token routed to its top-1 expert,
- `mixtral-E` (Mixtral style): E experts of `--ffn-dim / 2` units, each
  token routed to its top-2 experts, the two weights renormalised,

for each E in `--num-experts` (8 and 32 by default). So every model does the
same feed-forward matmuls per token (the MoE models `capacity_factor` times
as many in training, for the slack of their expert buffers) and differs in
how many parameters it can choose them from: the claim of Switch
(Fedus et al. 2021) and Mixtral (Jiang et al. 2024) is that the sparse
models learn more per step.

Every `--eval-every` steps each model's validation loss (mean next-byte
cross-entropy on held-out text, router losses excluded) is measured, with
the training wall-clock time so far (compilation and evaluation excluded).
The models train in turns, `--eval-every` steps each, so that changes in
the machine's load affect them alike. At the end the script prints a table, and writes it
(`results.md`), every measurement (`results.json`) and a plot of validation
loss vs steps and vs wall-clock (`dense_vs_moe.png`, if matplotlib is
installed) to `--output-dir`.

The default text is Python's reference documentation, which ships with
CPython (`keras_moe.datasets.offline_corpus`): nothing is downloaded. With
the defaults the five models train in about 15 minutes on a 2-core CPU with
the JAX backend.

Usage:

    KERAS_BACKEND=jax python examples/compare_dense_vs_moe.py
    python examples/compare_dense_vs_moe.py --steps 300 --num-experts 8
    python examples/compare_dense_vs_moe.py --variants dense mixtral-8
    python examples/compare_dense_vs_moe.py --help
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import keras
import numpy as np

from keras_moe import presets
from keras_moe.datasets import byte_lm_arrays
from keras_moe.datasets import offline_corpus
from keras_moe.models import MoEBackbone
from keras_moe.models import MoECausalLM
from keras_moe.utils.command_line import non_negative_float
from keras_moe.utils.command_line import positive_float
from keras_moe.utils.command_line import positive_int

VOCABULARY_SIZE = 256  # One token per byte value.
VARIANT_PATTERN = re.compile(r"^(dense|switch-(\d+)|mixtral-(\d+))$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Train a dense decoder and MoE decoders with the same active "
            "parameters per token (Switch-style top-1, Mixtral-style top-2) "
            "on identical data, steps and optimizer; compare validation "
            "loss vs steps and vs wall-clock."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--variants",
        nargs="+",
        help="models to train: dense, switch-E, mixtral-E (E experts); "
        "default: dense, then switch-E and mixtral-E for each "
        "--num-experts",
    )
    add(
        "--num-experts",
        nargs="+",
        type=positive_int,
        default=[8, 32],
        help="expert counts of the default variants",
    )
    # Data and training, identical for every model.
    add("--steps", type=positive_int, default=500, help="training steps")
    add(
        "--eval-every",
        type=positive_int,
        default=50,
        help="steps between validation measurements",
    )
    add("--batch-size", type=positive_int, default=16, help="sequences per batch")
    add(
        "--sequence-length",
        type=positive_int,
        default=64,
        help="bytes per sequence",
    )
    add(
        "--validation-sequences",
        type=positive_int,
        default=192,
        help="held-out sequences (from the end of the text) for the "
        "validation loss",
    )
    add(
        "--learning-rate",
        type=positive_float,
        default=3e-3,
        help="peak learning rate (AdamW, linear warmup over 5%% of the "
        "steps, cosine decay to 10%%)",
    )
    add(
        "--text-files",
        nargs="+",
        type=Path,
        help="UTF-8 text files to train on (default: Python's bundled "
        "reference documentation)",
    )
    # Model, identical except for the feed-forward layers.
    add("--hidden-dim", type=positive_int, default=128, help="model width d")
    add("--num-layers", type=positive_int, default=2, help="decoder blocks")
    add("--num-heads", type=positive_int, default=4, help="attention heads")
    add(
        "--ffn-dim",
        type=positive_int,
        default=512,
        help="active feed-forward units per token: the dense layer's width, "
        "a Switch expert's width, twice a Mixtral expert's width (even)",
    )
    add(
        "--capacity-factor",
        type=positive_float,
        default=1.25,
        help="MoE expert capacity factor in training (evaluation is "
        "dropless)",
    )
    add(
        "--dropless",
        action="store_true",
        help="train the MoE models without a capacity limit too (no "
        "token is ever dropped; --capacity-factor is ignored)",
    )
    add(
        "--aux-loss-weight",
        type=non_negative_float,
        default=0.01,
        help="weight of the Switch load-balancing loss",
    )
    # Outputs.
    add(
        "--output-dir",
        type=Path,
        default=Path("logs/compare_dense_vs_moe"),
        help="where results.md, results.json and dense_vs_moe.png go",
    )
    add("--seed", type=int, default=0, help="seed of weights and data order")
    add(
        "--fast",
        action="store_true",
        help="a seconds-long smoke run (tiny models, few steps) for tests",
    )
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = ["dense"]
        for experts in args.num_experts:
            args.variants += [f"switch-{experts}", f"mixtral-{experts}"]
    for variant in args.variants:
        match = VARIANT_PATTERN.match(variant)
        if not match:
            parser.error(
                f"--variants: {variant!r} is not dense, switch-E or "
                "mixtral-E (E an integer)"
            )
        if variant.startswith("mixtral") and int(match.group(3)) < 2:
            parser.error(f"--variants: {variant!r} needs at least 2 experts")
    if len(set(args.variants)) != len(args.variants):
        parser.error("--variants: each variant may appear once")
    if args.hidden_dim % args.num_heads:
        parser.error(
            f"--hidden-dim ({args.hidden_dim}) must be a multiple of "
            f"--num-heads ({args.num_heads})"
        )
    if args.ffn_dim % 2:
        parser.error(
            f"--ffn-dim ({args.ffn_dim}) must be even: Mixtral-style experts "
            "have half of it each"
        )
    for path in args.text_files or []:
        if not path.is_file():
            parser.error(f"--text-files: {str(path)!r} is not a file")
    if args.fast:
        args.variants = [
            v for v in args.variants if v in ("dense", "switch-8", "mixtral-8")
        ] or ["dense"]
        args.num_experts = [8]
        args.steps = 4
        args.eval_every = 2
        args.batch_size = 4
        args.sequence_length = 32
        args.validation_sequences = 4
        args.hidden_dim = 32
        args.num_layers = 1
        args.num_heads = 2
        args.ffn_dim = 64
    if args.steps % args.eval_every:
        parser.error(
            f"--steps ({args.steps}) must be a multiple of --eval-every "
            f"({args.eval_every})"
        )
    return args


def feedforward_config(variant, args):
    """The `MoEBackbone` arguments that make `variant`'s feed-forward layers."""
    if variant == "dense":
        return {"intermediate_dim": args.ffn_dim, "moe_layers": []}
    kind, experts = variant.split("-")
    top_k = 1 if kind == "switch" else 2
    return {
        "num_experts": int(experts),
        "top_k": top_k,
        "moe_intermediate_dim": args.ffn_dim // top_k,
        "moe_options": {
            "capacity_factor": None if args.dropless else args.capacity_factor,
            # Evaluation routes every token (no capacity limit), so the
            # validation loss measures the model, not its buffer sizes.
            "eval_capacity_factor": None,
            "aux_loss_weight": args.aux_loss_weight,
            # Mixtral renormalises its two weights; with top-1 that would
            # make every weight 1 and leave the router no gradient from the
            # language-model loss, so Switch scales by the probability.
            "normalize_top_k": top_k > 1,
        },
    }


def backbone_config(variant, args):
    """The `MoEBackbone` config of `variant`: all shared but the FFN layers."""
    return dict(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=args.num_layers,
        hidden_dim=args.hidden_dim,
        num_query_heads=args.num_heads,
        **feedforward_config(variant, args),
    )


def build_model(variant, args):
    backbone = MoEBackbone(**backbone_config(variant, args))
    return MoECausalLM(backbone, preprocessor=None)


def make_optimizer(args):
    warmup_steps = max(args.steps // 20, 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(args.steps - warmup_steps, 1),
        warmup_target=args.learning_rate,
        warmup_steps=warmup_steps,
        alpha=0.1,
    )
    return keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=0.01, clipnorm=1.0
    )


def model_inputs(token_ids):
    return {
        "token_ids": token_ids,
        "padding_mask": np.ones_like(token_ids),
    }


class Run:
    """One model, trained `eval_every` steps at a time, and its measurements."""

    def __init__(self, variant, args, validation_data):
        self.variant = variant
        self.args = args
        keras.utils.set_random_seed(args.seed)
        self.model = build_model(variant, args)
        counts = presets.count_params(self.model.backbone.get_config())
        self.model.compile(
            optimizer=make_optimizer(args),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        self.validation_data = validation_data
        self.result = {
            "variant": variant,
            "total_params": counts["total"],
            "active_params": counts["active"],
            "steps": [0],
            "seconds": [0.0],
            "val_loss": [self.validation_loss()],
            "train_loss": [],
            # Router statistics of each chunk's training steps (MoE only):
            # the share of routed choices dropped by the capacity limit, and
            # MaxVio, how far the busiest expert is above an even share.
            "dropped_fraction": [],
            "maxvio": [],
        }
        print(
            f"{variant:>11}: {counts['total']:,} parameters, "
            f"{counts['active']:,} active per token; validation loss "
            f"{self.result['val_loss'][0]:.4f} before training",
            flush=True,
        )

    def compile_training_step(self, train_data):
        """Compiles the training step, so that the clock measures training.

        One step on the first batch triggers the compilation; then the
        weights are restored and the optimizer's state (its step count and
        moment estimates, all created as zeros) is zeroed, so training
        starts exactly where it would have without this step.
        """
        weights = [keras.ops.convert_to_numpy(v) for v in self.model.weights]
        x_train, y_train = train_data
        batch = slice(0, self.args.batch_size)
        self.model.fit(
            model_inputs(x_train[batch]),
            y_train[batch],
            batch_size=self.args.batch_size,
            shuffle=False,
            verbose=0,
        )
        for variable, value in zip(self.model.weights, weights):
            variable.assign(value)
        for variable in self.model.optimizer.variables:
            variable.assign(np.zeros(variable.shape, variable.dtype))

    def validation_loss(self):
        x_val, y_val = self.validation_data
        return float(
            self.model.evaluate(
                model_inputs(x_val),
                y_val,
                batch_size=self.args.batch_size,
                verbose=0,
                return_dict=True,
            )["loss"]
        )

    def train(self, chunk, train_data):
        """Trains steps `[chunk * eval_every, (chunk + 1) * eval_every)`."""
        args = self.args
        rows = slice(
            chunk * args.eval_every * args.batch_size,
            (chunk + 1) * args.eval_every * args.batch_size,
        )
        x_train, y_train = train_data
        started = time.perf_counter()
        history = self.model.fit(
            model_inputs(x_train[rows]),
            y_train[rows],
            batch_size=args.batch_size,
            epochs=chunk + 1,
            initial_epoch=chunk,
            shuffle=False,  # The rows are already in the shared random order.
            verbose=0,
        )
        # The logs are Python floats, so every step has finished here.
        train_loss = float(history.history["loss"][-1])
        seconds = time.perf_counter() - started
        result = self.result
        result["steps"].append((chunk + 1) * args.eval_every)
        result["seconds"].append(result["seconds"][-1] + seconds)
        result["train_loss"].append(train_loss)
        result["val_loss"].append(self.validation_loss())
        routing = ""
        if "moe_maxvio" in history.history:
            result["dropped_fraction"].append(
                float(history.history["moe_dropped_fraction"][-1])
            )
            result["maxvio"].append(float(history.history["moe_maxvio"][-1]))
            routing = (
                f", dropped {result['dropped_fraction'][-1]:.1%}, "
                f"MaxVio {result['maxvio'][-1]:.2f}"
            )
        print(
            f"{self.variant:>11} step {result['steps'][-1]:5d}: train loss "
            f"{train_loss:.4f}, validation loss {result['val_loss'][-1]:.4f}, "
            f"{result['seconds'][-1]:6.1f}s of training{routing}",
            flush=True,
        )


def read_text(args):
    if not args.text_files:
        return offline_corpus(), "Python's reference documentation (offline)"
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in args.text_files)
    return text, f"{len(args.text_files)} file(s) given"


def prepare_data(args):
    text, source = read_text(args)
    (x, y), (x_val, y_val) = byte_lm_arrays(
        text, args.sequence_length, validation_split=0.1
    )
    if len(x_val) < args.validation_sequences:
        sys.exit(
            f"The text gives only {len(x_val)} validation sequences of "
            f"{args.sequence_length} bytes; lower --validation-sequences or "
            "give more text."
        )
    x_val = x_val[: args.validation_sequences]
    y_val = y_val[: args.validation_sequences]
    # One random order, as many passes over the training text as the steps
    # need, shared by every model.
    needed = args.steps * args.batch_size
    rng = np.random.default_rng(args.seed)
    passes = -(-needed // len(x))
    order = np.concatenate([rng.permutation(len(x)) for _ in range(passes)])
    order = order[:needed]
    print(
        f"Backend: {keras.backend.backend()}. Text: {source}, "
        f"{len(text.encode('utf-8')):,} bytes: {len(x):,} training "
        f"sequences of {args.sequence_length} bytes ({needed / len(x):.1f} "
        f"passes over them in {args.steps} steps of {args.batch_size}), "
        f"{len(x_val)} validation sequences.",
        flush=True,
    )
    return (x[order], y[order]), (x_val, y_val)


def loss_at(result, step):
    return result["val_loss"][result["steps"].index(step)]


def seconds_to_reach(result, target):
    """Training seconds until the validation loss first reaches `target`."""
    for loss, seconds in zip(result["val_loss"], result["seconds"]):
        if loss <= target:
            return seconds
    return None


def results_table(results, args):
    dense = next((r for r in results if r["variant"] == "dense"), None)
    final_step = results[0]["steps"][-1]
    half_step = results[0]["steps"][len(results[0]["steps"]) // 2]
    header = (
        "| model | experts x width, top-k | total params | active params "
        f"| val loss @ {half_step} steps | val loss @ {final_step} steps "
        "| training time | s/step |"
    )
    if dense:
        header += " time to dense's final loss |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for result in results:
        variant = result["variant"]
        if variant == "dense":
            shape = f"dense {args.ffn_dim}"
        else:
            kind, experts = variant.split("-")
            top_k = 1 if kind == "switch" else 2
            shape = f"{experts} x {args.ffn_dim // top_k}, top-{top_k}"
        seconds = result["seconds"][-1]
        row = (
            f"| {variant} | {shape} | {result['total_params']:,} "
            f"| {result['active_params']:,} | {loss_at(result, half_step):.4f} "
            f"| {result['val_loss'][-1]:.4f} | {seconds:.0f}s "
            f"| {seconds / final_step:.3f} |"
        )
        if dense:
            reached = seconds_to_reach(result, dense["val_loss"][-1])
            row += " - |" if reached is None else f" {reached:.0f}s |"
        lines.append(row)
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib).")
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dense = next((r for r in results if r["variant"] == "dense"), None)
    panels = 3 if dense else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    by_step, by_time = axes[:2]
    for result in results:
        variant = result["variant"]
        style = "-" if variant == "dense" else "-." if "mixtral" in variant else "--"
        line = dict(linewidth=2.5 if variant == "dense" else 1.6, label=variant)
        # Step 0 (the untrained loss) would squash the interesting part.
        steps, seconds = result["steps"][1:], result["seconds"][1:]
        losses = np.array(result["val_loss"][1:])
        by_step.plot(steps, losses, style, **line)
        by_time.plot(seconds, losses, style, **line)
        if dense:
            gap = losses - np.array(dense["val_loss"][1:])
            axes[2].plot(steps, gap, style, **line)
    by_step.set_xlabel("training step")
    by_step.set_title("Equal steps")
    by_time.set_xlabel("training wall-clock, compilation excluded (s)")
    by_time.set_title("Equal wall-clock")
    for axis in (by_step, by_time):
        axis.set_ylabel("validation loss (nats per byte)")
    if dense:
        axes[2].axhline(0.0, color="black", linewidth=0.8)
        axes[2].set_xlabel("training step")
        axes[2].set_ylabel("validation loss minus dense's")
        axes[2].set_title("Below 0: better than dense")
    for axis in axes:
        axis.grid(alpha=0.3)
    by_step.legend()
    figure.suptitle(
        "Dense vs MoE decoders at equal active parameters per token"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    train_data, validation_data = prepare_data(args)
    runs = [Run(variant, args, validation_data) for variant in args.variants]
    for run in runs:
        run.compile_training_step(train_data)
    # Round robin: every model trains its next `eval_every` steps before any
    # model goes further, so that a change in the machine's load during the
    # run slows all of them alike.
    for chunk in range(args.steps // args.eval_every):
        for run in runs:
            run.train(chunk, train_data)
    results = [run.result for run in runs]

    table = results_table(results, args)
    print()
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = "python examples/compare_dense_vs_moe.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    (args.output_dir / "results.md").write_text(
        f"Backend: {keras.backend.backend()}. Command: `{command.strip()}`\n\n"
        + table
        + "\n"
    )
    (args.output_dir / "results.json").write_text(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "arguments": {
                    k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items()
                    if k != "text_files"
                },
                "results": results,
            },
            indent=1,
        )
    )
    wrote = [args.output_dir / "results.md", args.output_dir / "results.json"]
    if plot(results, args.output_dir / "dense_vs_moe.png"):
        wrote.append(args.output_dir / "dense_vs_moe.png")
    print("Wrote " + ", ".join(str(path) for path in wrote) + ".")
    print(f"Done in {time.perf_counter() - started:.1f}s.")


if __name__ == "__main__":
    main()
