"""Train a tiny MoE model under `keras.callbacks.BackupAndRestore`; maybe die.

Run by `tests/test_resume.py` in a subprocess:

    python tests/resume_training.py BACKUP_DIR OUTPUT.npz
        [--kill-at EPOCH BATCH] [--uninterrupted-first BACKUP_DIR OUTPUT.npz]

Fits token embeddings, a `SparseMoE` (sigmoid scores, grouped routing,
balancing bias, capacity, auxiliary loss) and output logits for 2 epochs of
2 steps on fixed data with fixed seeds. With `--kill-at`, the process sends
itself SIGKILL at the end of that (0-based) batch of that epoch, as a
preempted job would die: nothing is flushed or cleaned up. Otherwise it
writes every weight (and the optimizer's variables) and the per-epoch
history to OUTPUT.npz. `--uninterrupted-first` trains a complete run to
those paths before, in the same process (one interpreter start fewer).
"""

import argparse
import json
import os
import signal
import sys

import keras
import numpy as np

from keras_moe.layers import SparseMoE

EPOCHS = 2
BATCH_SIZE = 4
STEPS_PER_EPOCH = 2
LENGTH = 8
VOCABULARY_SIZE = 32


class KillAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.kill_epoch = epoch
        self.kill_batch = batch
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (self.kill_epoch, self.kill_batch):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def build_model():
    """Embeddings, a MoE layer with balancing bias and capacity, logits."""
    keras.utils.set_random_seed(1234)
    token_ids = keras.Input((LENGTH,), dtype="int32")
    hidden = keras.layers.Embedding(VOCABULARY_SIZE, 16)(token_ids)
    moe = SparseMoE(
        8, 16, top_k=2, score_function="sigmoid", expert_groups=4,
        top_groups=2, bias_update_rate=0.01, capacity_factor=1.0,
        aux_loss_weight=0.01,
    )
    hidden = keras.layers.Add()([hidden, moe(hidden)])
    model = keras.Model(token_ids, keras.layers.Dense(VOCABULARY_SIZE)(hidden))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def training_data():
    rng = np.random.default_rng(7)
    samples = BATCH_SIZE * STEPS_PER_EPOCH
    token_ids = rng.integers(0, VOCABULARY_SIZE, size=(samples, LENGTH))
    return token_ids.astype("int32"), np.roll(token_ids, -1, axis=1)


def train(backup_dir, output, kill_at=None):
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")]
    if kill_at is not None:
        callbacks.append(KillAt(*kill_at))
    model = build_model()
    x, y = training_data()
    history = model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False,
        callbacks=callbacks, verbose=0,
    )
    arrays = {
        f"weight_{i}": keras.ops.convert_to_numpy(w)
        for i, w in enumerate(model.weights)
    }
    arrays.update(
        {
            f"optimizer_{i}": keras.ops.convert_to_numpy(v)
            for i, v in enumerate(model.optimizer.variables)
        }
    )
    arrays["history"] = np.array(
        json.dumps({"epochs": history.epoch, "history": history.history})
    )
    np.savez(output, **arrays)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("backup_dir")
    parser.add_argument("output")
    parser.add_argument("--kill-at", nargs=2, type=int, metavar=("EPOCH", "BATCH"))
    parser.add_argument("--uninterrupted-first", nargs=2, metavar=("BACKUP_DIR", "OUTPUT"))
    args = parser.parse_args(argv)
    if args.uninterrupted_first:
        train(*args.uninterrupted_first)
    train(args.backup_dir, args.output, args.kill_at)


if __name__ == "__main__":
    main(sys.argv[1:])
