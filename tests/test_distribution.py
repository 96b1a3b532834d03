"""Data, expert and model parallelism: `keras_moe.distribution`.

Layouts and argument errors are checked in this process on every backend.
The distributed runs need 8 devices, which JAX only makes on a CPU when
`XLA_FLAGS=--xla_force_host_platform_device_count=8` is set before it
starts: they run in subprocesses (`distribution_scenarios.py`) with
`KERAS_BACKEND=jax`, once, in the jax run of this file. The
`tf.distribute.MirroredStrategy` run belongs to the tensorflow run.
"""

import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_moe import layers
from keras_moe.distribution import get_layout_map
from testing import load_preset

BACKEND = keras.backend.backend()
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
DEVICES = [f"cpu:{i}" for i in range(8)]  # names are enough for layouts

jax_only = pytest.mark.skipif(
    BACKEND != "jax",
    reason="runs JAX on 8 virtual CPU devices in a subprocess; the jax run "
    "of this file covers it",
)
tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="tf.distribute runs in a TensorFlow subprocess; the tensorflow "
    "run of this file covers it",
)


# The subprocess runs are `slow`: `make test-fast` leaves them out.
def jax_run(test):
    return pytest.mark.slow(jax_only(test))


def tensorflow_run(test):
    return pytest.mark.slow(tensorflow_only(test))


def mesh(shape=(2, 4), axis_names=("batch", "expert")):
    return keras.distribution.DeviceMesh(shape, axis_names, DEVICES)


def run_python(arguments, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    completed = subprocess.run(
        [sys.executable, *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def run_scenario(script, name, tmp_path_factory, env=None):
    output = str(tmp_path_factory.mktemp(name or "scenario") / "result.json")
    arguments = [os.path.join(TESTS, script)]
    arguments += [name, output] if name else [output]
    run_python(arguments, env=env)
    with open(output) as f:
        return json.load(f)


JAX_ENV = {
    "KERAS_BACKEND": "jax",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
}


@pytest.fixture(scope="module")
def expert_parallel(tmp_path_factory):
    return run_scenario(
        "distribution_scenarios.py", "expert_parallel", tmp_path_factory, JAX_ENV
    )


@pytest.fixture(scope="module")
def other_meshes(tmp_path_factory):
    return run_scenario(
        "distribution_scenarios.py", "other_meshes", tmp_path_factory, JAX_ENV
    )


# --- Layouts (every backend, no devices needed) ---------------------------


def tiny_preset(name, **overrides):
    return load_preset(
        name, num_layers=2, hidden_dim=32, moe_intermediate_dim=16, **overrides
    ).backbone


@pytest.mark.parametrize("name", ["mixtral_small", "deepseek_small"])
def test_every_preset_weight_has_one_layout(name):
    # deepseek_small: MLA, a dense first layer, shared experts, expert bias.
    backbone = tiny_preset(name)
    layout_map = get_layout_map(
        mesh((2, 2, 2), ("batch", "expert", "model")), model_axis="model"
    )
    for variable in backbone.weights:
        layout = layout_map[variable.path]  # raises if two keys match
        axes = layout.axes if layout is not None else (None,) * len(variable.shape)
        assert len(axes) == len(variable.shape), variable.path
        if re.fullmatch(r".*/moe/experts/\w+_kernel", variable.path):
            assert axes[0] == "expert"
        elif "router" in variable.path or "norm" in variable.path:
            assert layout is None, variable.path
        else:
            assert "expert" not in axes, variable.path


def test_layouts_split_experts_and_model_axes():
    layout_map = get_layout_map(
        mesh((2, 2, 2), ("batch", "expert", "model")), model_axis="model"
    )
    expected = {
        "decoder_block_1/moe/experts/gate_kernel": ("expert", None, "model"),
        "decoder_block_1/moe/experts/down_kernel": ("expert", "model", None),
        "decoder_block_1/moe/experts/up_bias": ("expert", "model"),
        "decoder_block_1/moe/shared_experts/up_kernel": (None, "model"),
        "decoder_block_1/moe/shared_experts/down_kernel": ("model", None),
        "decoder_block_0/feedforward/up_kernel": (None, "model"),
        "decoder_block_0/attention/query/kernel": (None, "model", None),
        "decoder_block_0/attention/attention_output/kernel": ("model", None, None),
        "decoder_block_0/attention/kv_b_proj/kernel": (None, "model", None),
        "decoder_block_0/attention/o_proj/kernel": ("model", None, None),
        "token_embedding/embeddings": (None, "model"),
        "token_embedding/reverse_embeddings": ("model", None),
        "moe/experts/up_kernel": ("expert", None, "model"),  # a layer alone
    }
    for path, axes in expected.items():
        assert layout_map[path].axes == axes, path
    for path in ("decoder_block_1/moe/router/kernel", "final_norm/scale"):
        assert layout_map[path] is None


def test_without_a_model_axis_only_experts_are_split():
    layout_map = get_layout_map(mesh())
    assert layout_map["decoder_block_0/moe/experts/up_kernel"].axes == (
        "expert",
        None,
        None,
    )
    assert layout_map["decoder_block_0/attention/query/kernel"] is None
    assert layout_map["token_embedding/embeddings"] is None


def test_experts_may_share_the_batch_axis():
    layout_map = get_layout_map(mesh((8,), ("batch",)), expert_axis="batch")
    assert layout_map["moe/experts/down_kernel"].axes == ("batch", None, None)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"batch_axis": "data"}, "`batch_axis` must be the name of an axis"),
        ({"expert_axis": "experts"}, "`expert_axis` must be the name of an axis"),
        ({"model_axis": "model"}, "`model_axis` must be the name of an axis"),
        ({"model_axis": "expert"}, "`model_axis` must differ"),
    ],
)
def test_axis_names_must_be_in_the_mesh(arguments, message):
    with pytest.raises(ValueError, match=message):
        get_layout_map(mesh(), **arguments)


def test_a_device_mesh_is_required():
    with pytest.raises(ValueError, match="`device_mesh` must be"):
        get_layout_map((2, 4))


def test_num_experts_not_divisible_by_the_expert_axis_at_layout_time():
    moe = layers.SparseMoE(6, 16, name="moe")
    moe.build((None, 8))
    with pytest.raises(ValueError, match=r"`num_experts`=6 .* size 4 of the mesh"):
        get_layout_map(mesh(), model=moe)
    get_layout_map(mesh((4, 2), ("batch", "expert")), model=moe)  # 6 % 2 == 0


def test_other_indivisible_dimensions_at_layout_time():
    moe = layers.SparseMoE(8, 15, name="moe")
    moe.build((None, 8))
    with pytest.raises(
        ValueError,
        match=r"Dimension 2 \(size 15\) of `moe/experts/gate_kernel` .* is not "
        r"divisible by the size 2 of the mesh axis 'model'",
    ):
        get_layout_map(
            mesh((2, 2, 2), ("batch", "expert", "model")),
            model_axis="model",
            model=moe,
        )


def test_num_experts_not_divisible_by_the_expert_axis_at_build():
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh()), batch_dim_name="batch"
    )
    # Built under the distribution: the check comes before any weight is
    # placed (this process has no 8 devices to place them on).
    for layer in (
        layers.SparseMoE(6, 16, name="moe"),
        layers.SharedExpertMoE(6, 16, name="shared_moe"),
    ):
        with distribution.scope():
            with pytest.raises(ValueError, match=r"`num_experts`=6 of `\w+/experts`"):
                layer.build((None, 8))


# --- Distributed runs (JAX, 8 virtual devices, subprocesses) --------------


@jax_run
def test_each_expert_kernel_shard_holds_a_quarter_of_the_experts(expert_parallel):
    for key in ("shards", "shards_after_fit"):
        for path, (shape, shard_shapes) in expert_parallel[key].items():
            assert shape[0] == 8
            assert shard_shapes == [[2] + shape[1:]], path


@jax_run
def test_sharded_logits_equal_one_device_logits(expert_parallel):
    assert expert_parallel["logits_difference"] < 1e-4


def array_sizes(shape):
    """Element counts of the arrays in an HLO result type like `f32[2,3]`."""
    return [
        int(np.prod([int(n) for n in dims.split(",") if n]))
        for dims in re.findall(r"\[([\d,]*)\]", shape)
    ]


def all_gathered_sizes(collectives):
    return [size for shape in collectives["all-gather"] for size in array_sizes(shape)]


@jax_run
def test_moe_layer_moves_tokens_with_all_to_all_not_expert_weights(expert_parallel):
    # Mesh 2 x 4, 8 sequences of 16 tokens, 8 experts of [32, 48].
    tokens, num_experts = 8 * 16, 8
    (kernel_size,) = expert_parallel["expert_kernel_sizes"]
    forward = expert_parallel["moe_layer_collectives"]["forward"]
    backward = expert_parallel["moe_layer_collectives"]["backward"]
    # The buffers go to the experts' devices and come back.
    assert len(forward["all-to-all"]) == 2
    assert len(backward["all-to-all"]) >= 2
    for collectives in (forward, backward):
        # The only all-gather is of the router scores [tokens, E] (XLA does
        # not partition `top_k`): never an expert kernel.
        for size in all_gathered_sizes(collectives):
            assert size <= tokens * num_experts < kernel_size
    # Expert gradients stay in shards of 2 experts, summed over the batch axis.
    assert any("f32[2,48,32]" in shape for shape in backward["all-reduce"])


@jax_run
def test_expert_choice_moves_tokens_the_same_way(expert_parallel):
    tokens, num_experts = 8 * 16, 8
    forward = expert_parallel["expert_choice_collectives"]
    assert len(forward["all-to-all"]) == 2
    for size in all_gathered_sizes(forward):
        assert size <= tokens * num_experts


@jax_run
def test_dropless_exchanges_bounded_group_buffers(expert_parallel):
    # 2 groups (the batch shards) of 4 * 16 tokens, 8 experts, d = 32: a
    # group sends each expert a buffer of its own 64 tokens at most, so each
    # all-to-all moves [2 groups, 8 experts, 64, 32], never more.
    group_tokens, num_groups, num_experts, hidden_dim = 4 * 16, 2, 8, 32
    forward = expert_parallel["dropless_collectives"]
    assert len(forward["all-to-all"]) == 2
    bound = num_groups * num_experts * group_tokens * hidden_dim
    for shape in forward["all-to-all"]:
        assert max(array_sizes(shape)) <= bound, shape


@jax_run
def test_fit_trains_under_the_distribution(expert_parallel):
    for key in ("fit_losses", "fit_losses_with_expert_dropout"):
        losses = expert_parallel[key]
        assert all(np.isfinite(losses)), key
        assert losses[-1] < 0.9 * losses[0], key


@jax_run
def test_weights_saved_under_sharding_reload_on_one_device(expert_parallel):
    reloaded = expert_parallel["reload_on_one_device"]
    assert reloaded["weights_equal"]
    assert reloaded["logits_difference"] < 1e-4


@jax_run
def test_weights_saved_on_one_device_reload_under_sharding(expert_parallel):
    reloaded = expert_parallel["reload_under_sharding"]
    assert reloaded["initial_weights_differ"]
    assert reloaded["weights_equal"]
    assert reloaded["logits_difference"] < 1e-4
    for path, (shape, shard_shapes) in reloaded["shards"].items():
        assert shard_shapes == [[2] + shape[1:]], path


@jax_run
def test_data_parallel_on_8_devices_matches_one_device(other_meshes):
    result = other_meshes["data_parallel"]
    assert result["num_devices"] == 8
    assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-5)
    assert result["weights_difference_after_step"] < 1e-5


@jax_run
def test_batch_expert_model_mesh(other_meshes):
    result = other_meshes["three_axis_mesh"]
    shards = {path: shard_shapes for path, (_, shard_shapes) in result["shards"].items()}
    # 8 experts of [32, 48] over 2 expert x 2 model devices; 4 query heads
    # and the hidden axis of the embeddings over 2 model devices.
    assert shards["decoder_block_0/moe/experts/up_kernel"] == [[4, 32, 24]]
    assert shards["decoder_block_0/attention/query/kernel"] == [[32, 2, 8]]
    assert shards["token_embedding/embeddings"] == [[259, 16]]
    assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-5)
    assert result["weights_difference_after_step"] < 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@jax_run
def test_two_processes_train_like_one(tmp_path):
    """`examples/train_distributed.py` as 2 processes x 4 devices vs 1 x 8."""
    script = os.path.join(ROOT, "examples", "train_distributed.py")
    common = ["--mesh", "8", "--tiny", "--steps", "3"]
    single = str(tmp_path / "single.json")
    run_python(
        [script, *common, "--cpu-devices", "8", "--output", single],
        env={"KERAS_BACKEND": "jax"},
    )
    port = free_port()
    outputs = [str(tmp_path / f"process_{i}.json") for i in range(2)]
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": "jax"}
    processes = [
        subprocess.Popen(
            [
                sys.executable, script, *common, "--cpu-devices", "4",
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i), "--output", outputs[i],
            ],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        log, _ = process.communicate(timeout=600)
        assert process.returncode == 0, log[-4000:]
    with open(single) as f:
        expected = json.load(f)
    for output in outputs:
        with open(output) as f:
            result = json.load(f)
        assert result["num_processes"] == 2 and result["num_devices"] == 8
        # Every process holds 4 of the 8 experts' shards: 1 expert per device.
        assert result["local_expert_shards"] == [[1, 32, 48]]
        np.testing.assert_allclose(result["losses"], expected["losses"], rtol=1e-5)


# --- TensorFlow: tf.distribute ---------------------------------------------


@tensorflow_run
def test_mirrored_strategy_on_two_logical_devices(tmp_path_factory):
    result = run_scenario("tf_distribute_scenario.py", None, tmp_path_factory)
    assert result["num_replicas"] == 2
    assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-5)
    assert result["logits_difference_after_step"] < 1e-4
    losses = result["fit_losses"]
    assert losses[-1] < 0.9 * losses[0]


# --- Batches the batch axis does not divide (JAX, 8 virtual devices) -------


@pytest.fixture(scope="module")
def odd_batches(tmp_path_factory):
    return run_scenario(
        "distribution_scenarios.py", "odd_batches", tmp_path_factory, JAX_ENV
    )


@jax_run
def test_odd_batches_are_padded_and_give_one_device_numbers(odd_batches):
    # A batch axis of 2: one prompt, 3 prompts, a last fit batch of 3 rows,
    # evaluate and predict on 7 rows run, and agree with one device.
    result = odd_batches
    assert result["generate_shape"] == [1, 12] and result["generate_equal"]
    got, expected = result["generate_text"]
    assert isinstance(got, str) and got == expected
    got, expected = result["generate_texts"]
    assert len(got) == 3 and got == expected
    assert result["predict_shape"] == [7, 16, 259]
    assert result["predict_difference"] < 1e-5
    got, expected = result["predict_text_shapes"]
    assert got == expected and got[0] == 3
    assert result["predict_text_difference"] < 1e-5
    got, expected = result["evaluate_loss"]
    assert got == pytest.approx(expected, rel=1e-5)
    # The padding rows weigh nothing: the SGD steps move the weights alike.
    assert result["weights_moved"] > 1e-3
    assert result["weights_difference_after_fit"] < 1e-6


@jax_run
def test_a_dataset_of_odd_batches_fails_stating_the_rule(odd_batches):
    message = odd_batches["dataset_error"]
    assert message is not None
    assert "multiple of 2" in message and "drop_remainder=True" in message


def test_padding_rows_weigh_nothing_in_the_loss():
    # What `MoECausalLM` does to a batch of 3 under a batch axis of 2, on
    # NumPy batches and inside a `tf.data` pipeline (dynamic batch size).
    from keras_moe.distribution.batch_padding import pad_training_batch

    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 5, (3, 4)).astype("int32"),
         "padding_mask": np.ones((3, 4), "int32")}
    y = rng.integers(0, 5, (3, 4)).astype("int32")
    weights = np.array([[1, 1, 1, 0]] * 3, "float32")
    logits = rng.normal(size=(3, 4, 5)).astype("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(loss(y, logits, sample_weight=weights))

    px, py, pw = pad_training_batch((x, y, weights), 2)
    assert px["token_ids"].shape == (4, 4) and not px["padding_mask"][3].any()
    padded_logits = np.concatenate([logits, np.zeros((1, 4, 5), "float32")])
    assert float(loss(py, padded_logits, sample_weight=pw)) == pytest.approx(expected)
    # Already a multiple, or no labels (prediction): unchanged.
    assert pad_training_batch((x, y, weights), 3)[0] is x
    assert pad_training_batch((x,), 2) is x

    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(3)
    dataset = dataset.map(lambda *data: pad_training_batch(data, 2))
    tx, ty, tw = next(iter(dataset))
    np.testing.assert_array_equal(tx["padding_mask"].numpy(), px["padding_mask"])
    np.testing.assert_allclose(tw.numpy(), pw)
    with pytest.raises(ValueError, match="`multiple` must be an integer >= 1"):
        pad_training_batch((x, y), 0)
