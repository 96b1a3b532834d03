"""Does balancing work? Router collapse on skewed inputs, with and without it.

A SparseMoE regression model is trained on tokens that all share a large
common component, so a freshly initialised router sends most of them to the
same few experts. Three runs with identical data, weights and steps:
  (a) no balancing at all,
  (b) the Switch load-balancing loss,
  (c) aux-loss-free bias balancing (sigmoid scores, DeepSeek-V3).
For each, MaxVio = (max load - mean load) / mean load of the experts' load on
held-out tokens (loads count routed choices, before capacity), at the start
and after training.

    python benchmarks/router_balance.py [--steps 300] [--seeds 0 1 2]
"""

import argparse
import os
import time

import numpy as np

NUM_EXPERTS = 8
TOP_K = 2
HIDDEN_DIM = 16
TOKENS_PER_SEQUENCE = 32

# Balancing settings compared: layer keyword arguments per variant.
VARIANTS = {
    "none": dict(aux_loss_weight=0.0),
    "switch_loss": dict(aux_loss_weight=0.1),
    "bias_balancing": dict(
        aux_loss_weight=0.0, score_function="sigmoid", bias_update_rate=0.01
    ),
}


def skewed_tokens(rng, num_sequences):
    """Tokens with a strong shared direction, and a nonlinear target."""
    shared = np.linspace(1.0, -1.0, HIDDEN_DIM) * 3.0
    x = rng.normal(size=(num_sequences, TOKENS_PER_SEQUENCE, HIDDEN_DIM)) + shared
    mixing = np.random.default_rng(1234).normal(size=(HIDDEN_DIM, HIDDEN_DIM))
    y = np.sin(x @ mixing / np.sqrt(HIDDEN_DIM))
    return x.astype("float32"), y.astype("float32")


def max_violation(expert_ids, num_experts):
    counts = np.bincount(np.asarray(expert_ids).reshape(-1), minlength=num_experts)
    mean = counts.mean()
    return float((counts.max() - mean) / mean)


def run(variant, steps, seed):
    """Train one variant; returns `(maxvio_before, maxvio_after, val_loss)`."""
    import keras

    from keras_moe.layers import SparseMoE

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train = skewed_tokens(rng, 16 * steps)
    x_val, y_val = skewed_tokens(rng, 64)

    inputs = keras.Input((TOKENS_PER_SEQUENCE, HIDDEN_DIM))
    moe = SparseMoE(
        NUM_EXPERTS,
        32,
        top_k=TOP_K,
        capacity_factor=None,
        name="moe",
        **VARIANTS[variant],
    )
    outputs = keras.layers.Dense(HIDDEN_DIM)(inputs + moe(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")

    def val_maxvio():
        routing = moe.router(keras.ops.reshape(x_val, (-1, HIDDEN_DIM)))
        return max_violation(keras.ops.convert_to_numpy(routing.expert_ids), NUM_EXPERTS)

    before = val_maxvio()
    model.fit(x_train, y_train, batch_size=16, epochs=1, verbose=0)
    after = val_maxvio()
    val_loss = float(model.evaluate(x_val, y_val, verbose=0))
    return before, after, val_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    import keras

    print(f"backend={keras.backend.backend()} steps={args.steps} seeds={args.seeds}")
    print(f"{'variant':<16}{'MaxVio start':>14}{'MaxVio end':>12}{'val loss':>10}{'seconds':>9}")
    for variant in VARIANTS:
        results = []
        start = time.perf_counter()
        for seed in args.seeds:
            results.append(run(variant, args.steps, seed))
        seconds = (time.perf_counter() - start) / len(args.seeds)
        before, after, loss = np.median(np.array(results), axis=0)
        print(f"{variant:<16}{before:>14.2f}{after:>12.2f}{loss:>10.4f}{seconds:>9.1f}")


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    main()
