"""Distributed runs for `test_distribution.py`, each in its own process.

JAX fixes its device count when it starts, so every scenario runs in a fresh
interpreter with `XLA_FLAGS=--xla_force_host_platform_device_count=8` set
before JAX is imported:

    python tests/distribution_scenarios.py SCENARIO OUTPUT_JSON

and writes what it measured to OUTPUT_JSON for the tests to check.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import layers  # noqa: E402
from keras_moe import presets  # noqa: E402
from keras_moe.distribution import get_layout_map  # noqa: E402

BATCH, LENGTH = 8, 16
# mixtral_small's architecture at toy sizes: 8 experts, top-2, GQA.
TINY = dict(
    num_layers=1,
    hidden_dim=32,
    num_query_heads=4,
    num_key_value_heads=2,
    moe_intermediate_dim=48,
)
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter")


def tiny_model(**overrides):
    return presets.load("mixtral_small", preprocessor=None, **{**TINY, **overrides})


def batch_data(seed=0, num_batches=1):
    rng = np.random.default_rng(seed)
    # A learnable sequence: each token is the previous one plus one.
    starts = rng.integers(0, 200, size=(BATCH * num_batches, 1))
    token_ids = (starts + np.arange(LENGTH + 1)).astype("int32")
    padding_mask = np.ones((BATCH * num_batches, LENGTH), "int32")
    padding_mask[1, 12:] = 0  # one padded row: masks go through the groups
    x = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask}
    return x, token_ids[:, 1:], padding_mask.astype("float32")


def logits_of(model, x):
    return np.asarray(model.predict(x, batch_size=BATCH, verbose=0))


def max_difference(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def mesh(shape, axis_names):
    return keras.distribution.DeviceMesh(
        shape, axis_names, keras.distribution.list_devices()
    )


def expert_kernels(model):
    return [v for v in model.weights if re.search(r"experts/\w+_kernel$", v.path)
            and "shared" not in v.path]


def shard_shapes(variables):
    """`{path: [global shape, [shard shapes of every device]]}`."""
    return {
        v.path: [
            list(v.shape),
            sorted({tuple(s.data.shape) for s in v.value.addressable_shards}),
        ]
        for v in variables
    }


def collectives(hlo_text):
    """`{op: [result shape strings]}` of the collectives in compiled HLO."""
    found = {}
    for op in COLLECTIVES:
        pattern = re.compile(rf"= (.+?) {op}(?:-start)?\(")
        found[op] = [m.group(1) for m in map(pattern.search, hlo_text.splitlines()) if m]
    return found


def element_counts(shape_text):
    """Element count of each array in an HLO result type like `f32[2,3]`."""
    return [
        int(np.prod([int(n) for n in dims.split(",") if n])) if dims else 1
        for dims in re.findall(r"\[([\d,]*)\]", shape_text)
    ]


def moe_layer_hlo(layer, backward=True):
    """Compiled HLO of a MoE layer alone: forward, and forward + backward."""
    distribution = keras.distribution.distribution()
    hidden = np.random.default_rng(1).normal(size=(BATCH, LENGTH, TINY["hidden_dim"]))
    hidden = jax.device_put(
        hidden.astype("float32"),
        distribution.get_data_layout(hidden.shape).backend_layout,
    )

    def loss(trainable, non_trainable, hidden):
        outputs, _ = layer.stateless_call(trainable, non_trainable, hidden, training=True)
        return keras.ops.sum(outputs**2)

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    forward = jax.jit(lambda *a: layer.stateless_call(*a)[0])
    hlo = {"forward": forward.lower(trainable, non_trainable, hidden)}
    if backward:
        hlo["backward"] = jax.jit(jax.grad(loss)).lower(
            trainable, non_trainable, hidden
        )
    return {name: lowered.compile().as_text() for name, lowered in hlo.items()}


def fit_losses(model, epochs=4, learning_rate=1e-2):
    x, y, sample_weight = batch_data(seed=2, num_batches=2)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = model.fit(
        x, y, sample_weight=sample_weight, batch_size=BATCH, epochs=epochs,
        shuffle=False, verbose=0,
    )
    return [float(v) for v in history.history["loss"]]


def one_sgd_step(model, x, y, sample_weight):
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
    return float(logs["loss"])


def expert_parallel():
    """Mesh 2 (batch) x 4 (expert): shards, logits, HLO, fit, checkpoints."""
    x, y, sample_weight = batch_data()
    keras.utils.set_random_seed(0)
    reference = tiny_model()
    reference_logits = logits_of(reference, x)
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh((2, 4), ("batch", "expert"))),
        batch_dim_name="batch",
    )
    result = {}
    with distribution.scope():
        model = tiny_model()
        model.set_weights(reference.get_weights())
        result["shards"] = shard_shapes(expert_kernels(model))
        result["logits_difference"] = max_difference(logits_of(model, x), reference_logits)
        layer_hlo = moe_layer_hlo(model.backbone.get_layer("decoder_block_0").feedforward)
        result["moe_layer_collectives"] = {
            name: collectives(text) for name, text in layer_hlo.items()
        }
        # Expert choice routes through the same groups and buffers.
        expert_choice = layers.SparseMoE(
            8, TINY["moe_intermediate_dim"], routing="expert_choice", name="moe"
        )
        expert_choice.build((None, TINY["hidden_dim"]))
        result["expert_choice_collectives"] = collectives(
            moe_layer_hlo(expert_choice, backward=False)["forward"]
        )
        # Dropless token choice keeps the exchange too, with buffers of one
        # group's tokens per expert: all a group can send any expert.
        dropless = layers.SparseMoE(
            8, TINY["moe_intermediate_dim"], capacity_factor=None, name="moe"
        )
        dropless.build((None, TINY["hidden_dim"]))
        result["dropless_collectives"] = collectives(
            moe_layer_hlo(dropless, backward=False)["forward"]
        )
        result["expert_kernel_sizes"] = sorted(
            {int(np.prod(v.shape)) for v in expert_kernels(model)}
        )
        result["fit_losses"] = fit_losses(model)
        # Expert dropout runs where the experts live (its masks are drawn
        # on the expert-sharded buffers) and trains as well.
        with_dropout = tiny_model(moe_options={"expert_dropout": 0.1})
        result["fit_losses_with_expert_dropout"] = fit_losses(with_dropout)
        result["shards_after_fit"] = shard_shapes(expert_kernels(model))
        trained_logits = logits_of(model, x)
        directory = tempfile.mkdtemp()
        sharded_file = os.path.join(directory, "sharded.weights.h5")
        model.save_weights(sharded_file)

    # Weights saved under sharding, reloaded on one device.
    single = tiny_model()
    single.load_weights(sharded_file)
    single_logits = logits_of(single, x)
    result["reload_on_one_device"] = {
        "weights_equal": all(
            np.array_equal(a, b)
            for a, b in zip(single.get_weights(), model.get_weights())
        ),
        "logits_difference": max_difference(single_logits, trained_logits),
    }
    # And back: those weights, saved by the one-device model, loaded into a
    # freshly initialised sharded model.
    single_file = os.path.join(directory, "single.weights.h5")
    single.save_weights(single_file)
    keras.utils.set_random_seed(1)
    with distribution.scope():
        resharded = tiny_model()
        initial = resharded.get_weights()
        resharded.load_weights(single_file)
        result["reload_under_sharding"] = {
            "initial_weights_differ": not all(
                np.array_equal(a, b) for a, b in zip(initial, single.get_weights())
            ),
            "weights_equal": all(
                np.array_equal(a, b)
                for a, b in zip(resharded.get_weights(), single.get_weights())
            ),
            "logits_difference": max_difference(
                logits_of(resharded, x), single_logits
            ),
            "shards": shard_shapes(expert_kernels(resharded)),
        }
    return result


def other_meshes():
    """DataParallel on 8 devices, and a batch x expert x model mesh.

    Routing is dropless, so one routing group on one device and one group per
    data shard compute the same thing: one SGD step from the same weights
    must give the same loss and the same new weights.
    """
    x, y, sample_weight = batch_data()
    dropless = {"moe_options": {"capacity_factor": None}}
    keras.utils.set_random_seed(0)
    reference = tiny_model(**dropless)
    weights = reference.get_weights()
    reference_loss = one_sgd_step(reference, x, y, sample_weight)

    def one_step_under(distribution):
        with distribution.scope():
            model = tiny_model(**dropless)
            model.set_weights(weights)
            loss = one_sgd_step(model, x, y, sample_weight)
            return model, {
                "loss": loss,
                "reference_loss": reference_loss,
                "weights_difference_after_step": max(
                    max_difference(a, b)
                    for a, b in zip(model.get_weights(), reference.get_weights())
                ),
            }

    _, data_parallel = one_step_under(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    )
    data_parallel["num_devices"] = len(keras.distribution.list_devices())
    layout_map = get_layout_map(
        mesh((2, 2, 2), ("batch", "expert", "model")), model_axis="model"
    )
    model, three_axis_mesh = one_step_under(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    three_axis_mesh["shards"] = shard_shapes(
        [
            v for v in model.weights
            if re.search(r"(experts/up_kernel|query/kernel|embeddings)$", v.path)
        ]
    )
    return {"data_parallel": data_parallel, "three_axis_mesh": three_axis_mesh}


def odd_batches():
    """Batch axis of 2: batches of odd size are padded, not refused.

    A single prompt to `generate()` (token ids, and text through the
    preprocessor), a last `fit` batch of 3, `evaluate` and `predict` on 7
    rows: the same numbers as on one device (dropless routing). A dataset
    whose batches do not divide fails with a ValueError stating the rule.
    """
    x, y, sample_weight = batch_data()
    x7 = {key: value[:7] for key, value in x.items()}
    y7, sample_weight7 = y[:7], sample_weight[:7]
    prompt = {
        "token_ids": np.pad(x["token_ids"][:1, :4], ((0, 0), (0, 8))),
        "padding_mask": np.arange(12)[None] < 4,
    }
    dropless = {"moe_options": {"capacity_factor": None}}

    def compiled(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            sampler="greedy",
        )
        return model

    def run(model, text_model):
        return {
            "generate": model.generate(prompt, stop_token_ids=None)["token_ids"],
            "generate_text": text_model.generate("def ", max_length=12),
            "generate_texts": text_model.generate(["def ", "x = ", "if "], max_length=12),
            "predict": model.predict(x7, batch_size=4, verbose=0),
            "predict_text": text_model.predict(
                ["def ", "x = ", "if "], batch_size=3, verbose=0
            ),
            "evaluate": model.evaluate(
                x7, y7, sample_weight=sample_weight7, batch_size=7, verbose=0,
                return_dict=True,
            )["loss"],
            "fit": model.fit(
                x7, y7, sample_weight=sample_weight7, batch_size=4, epochs=1,
                shuffle=False, verbose=0,
            ),
            "weights": model.get_weights(),
        }

    keras.utils.set_random_seed(0)
    reference = compiled(tiny_model(**dropless))
    weights = reference.get_weights()
    text_reference = compiled(presets.load("mixtral_small", **TINY, **dropless))
    backbone_weights = reference.backbone.get_weights()
    text_reference.backbone.set_weights(backbone_weights)
    expected = run(reference, text_reference)
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh((2, 4), ("batch", "expert"))),
        batch_dim_name="batch",
    )
    with distribution.scope():
        model = compiled(tiny_model(**dropless))
        model.set_weights(weights)
        text_model = compiled(presets.load("mixtral_small", **TINY, **dropless))
        text_model.backbone.set_weights(backbone_weights)
        got = run(model, text_model)
        odd_dataset = tf_dataset_of(x7, batch_size=7)
        try:
            model.predict(odd_dataset, verbose=0)
            dataset_error = None
        except ValueError as error:
            dataset_error = str(error)
    return {
        "generate_shape": list(np.shape(got["generate"])),
        "generate_equal": bool(np.array_equal(got["generate"], expected["generate"])),
        "generate_text": [got["generate_text"], expected["generate_text"]],
        "generate_texts": [got["generate_texts"], expected["generate_texts"]],
        "predict_shape": list(np.shape(got["predict"])),
        "predict_difference": max_difference(got["predict"], expected["predict"]),
        "predict_text_shapes": [
            list(np.shape(got["predict_text"])),
            list(np.shape(expected["predict_text"])),
        ],
        "predict_text_difference": max_difference(
            got["predict_text"], expected["predict_text"]
        ),
        "evaluate_loss": [got["evaluate"], expected["evaluate"]],
        "fit_steps": [
            len(got["fit"].history["loss"]), len(expected["fit"].history["loss"])
        ],
        "weights_difference_after_fit": max(
            max_difference(a, b) for a, b in zip(got["weights"], expected["weights"])
        ),
        "weights_moved": max(
            max_difference(a, b) for a, b in zip(expected["weights"], weights)
        ),
        "dataset_error": dataset_error,
    }


def tf_dataset_of(x, batch_size):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(x).batch(batch_size)


SCENARIOS = {
    "expert_parallel": expert_parallel,
    "other_meshes": other_meshes,
    "odd_batches": odd_batches,
}

if __name__ == "__main__":
    name, output = sys.argv[1], sys.argv[2]
    result = SCENARIOS[name]()
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
