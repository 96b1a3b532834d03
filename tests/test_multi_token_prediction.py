"""DeepSeek-V3's multi-token prediction (MTP) modules.

A tiny DeepSeek-V3 checkpoint with its extra layer (stored as layer
`num_hidden_layers`, as the released checkpoints do) is written with
transformers' layers; transformers itself ignores that layer, so the MTP
forward pass is checked against a torch reference written here from the
paper (arXiv:2412.19437, section 2.2), and the loss against a NumPy
cross-entropy of the reference logits. Also: `fit()` lowers the MTP loss,
generation and inference do not use it, configs and `.keras` files round
trip, and export writes the extra layer back.
"""

import json

import keras
import numpy as np
import pytest

from keras_moe import convert
from keras_moe import presets
from keras_moe.models import MoEBackbone
from keras_moe.models import MoECausalLM
from keras_moe.models.multi_token_prediction import multi_token_prediction_loss
from testing import to_numpy
from testing.hf_checkpoints import TOLERANCE
from testing.hf_checkpoints import VOCABULARY_SIZE
from testing.hf_checkpoints import randomize_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

NUM_LAYERS = 2
EPSILON = 1e-6


def deepseek_v3_config(num_hidden_layers):
    return transformers.DeepseekV3Config(
        vocab_size=VOCABULARY_SIZE,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=EPSILON,
        tie_word_embeddings=False,
        q_lora_rank=12,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=6,
        intermediate_size=32,
        moe_intermediate_size=8,
        first_k_dense_replace=1,
        num_hidden_layers=num_hidden_layers,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_nextn_predict_layers=1,
        max_position_embeddings=64,
    )


def rms_norm(x, scale):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPSILON) * scale


def reference_mtp_logits(model, mtp, token_ids):
    """Depth-1 MTP logits from the paper, with transformers' decoder layer.

    `model` is a DeepSeek-V3 with `NUM_LAYERS + 1` layers: its last layer is
    the MTP module's block. Position `i` predicts token `i + 2`, for the
    `length - 1` positions whose next token exists.
    """
    ids = torch.tensor(token_ids, dtype=torch.long)
    captured = []
    hook = model.model.layers[NUM_LAYERS - 1].register_forward_hook(
        lambda module, inputs, output: captured.append(output)
    )
    with torch.no_grad():
        model(input_ids=ids)
        hook.remove()
        hidden = captured[0]  # The main model's h_i, before its final norm.
        length = ids.shape[1] - 1
        embeddings = model.model.embed_tokens(ids[:, 1:])
        x = torch.cat(
            [rms_norm(embeddings, mtp["enorm"]), rms_norm(hidden[:, :length], mtp["hnorm"])],
            dim=-1,
        )
        x = x @ mtp["eh_proj"].T
        position_ids = torch.arange(length)[None]
        causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
        x = model.model.layers[NUM_LAYERS](
            x,
            attention_mask=causal[None, None],
            position_ids=position_ids,
            position_embeddings=model.model.rotary_emb(x, position_ids),
        )
        logits = model.lm_head(rms_norm(x, mtp["head_norm"]))
    return logits.numpy()


def cross_entropy(logits, targets):
    logits = logits.astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A DeepSeek-V3 checkpoint with one MTP layer, and its references.

    Written from a transformers model with one layer more (the MTP block,
    in the checkpoint's own layout), then given the MTP layer's other
    tensors and `num_hidden_layers=NUM_LAYERS`.
    """
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(
        deepseek_v3_config(NUM_LAYERS + 1)
    ).eval()
    randomize_weights(model, generator=generator)
    directory = tmp_path_factory.mktemp("deepseek_v3_mtp")
    model.save_pretrained(directory)
    mtp = {
        "enorm": 0.5 + torch.rand(16, generator=generator),
        "hnorm": 0.5 + torch.rand(16, generator=generator),
        "head_norm": 0.5 + torch.rand(16, generator=generator),
        "eh_proj": torch.randn(16, 32, generator=generator) / 32**0.5,
    }
    path = directory / "model.safetensors"
    tensors = safetensors_numpy.load_file(path)
    layer = f"model.layers.{NUM_LAYERS}"
    tensors.update(
        {
            f"{layer}.enorm.weight": mtp["enorm"].numpy(),
            f"{layer}.hnorm.weight": mtp["hnorm"].numpy(),
            f"{layer}.eh_proj.weight": mtp["eh_proj"].numpy(),
            f"{layer}.shared_head.norm.weight": mtp["head_norm"].numpy(),
            f"{layer}.embed_tokens.weight": tensors["model.embed_tokens.weight"],
            f"{layer}.shared_head.head.weight": tensors["lm_head.weight"],
        }
    )
    safetensors_numpy.save_file(tensors, path, {"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(num_hidden_layers=NUM_LAYERS, num_nextn_predict_layers=1)
    (directory / "config.json").write_text(json.dumps(config))

    token_ids = np.random.default_rng(3).integers(1, VOCABULARY_SIZE, size=(2, 10))
    token_ids = token_ids.astype("int32")
    return directory, token_ids, reference_mtp_logits(model, mtp, token_ids)


def inputs_of(token_ids):
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def test_checkpoint_mtp_layer_matches_the_reference(checkpoint):
    directory, token_ids, expected = checkpoint
    model = presets.load(directory, preprocessor=None)
    assert model.backbone.num_mtp_layers == 1
    (logits,) = model.backbone.multi_token_logits(inputs_of(token_ids))
    logits = to_numpy(logits)[:, : token_ids.shape[1] - 1]
    assert np.abs(expected).max() > 1.0  # Not a vanishing signal.
    assert np.abs(logits - expected).max() < TOLERANCE


def test_mtp_loss_matches_the_reference_in_training_only(checkpoint):
    directory, token_ids, expected = checkpoint
    model = presets.load(
        directory, preprocessor=None,
        moe_options={"sequence_aux_loss_weight": 0.0},
    )
    backbone = model.backbone
    # Position i predicts token i + 2: the last position has no target.
    reference = cross_entropy(expected[:, :-1], token_ids[:, 2:]).mean()
    assert backbone.mtp_loss_weight == 0.1
    assert presets.load(
        directory, preprocessor=None, mtp_loss_weight=0.3
    ).backbone.mtp_loss_weight == 0.3
    backbone(inputs_of(token_ids), training=True)
    mtp_losses = [float(to_numpy(loss)) for loss in backbone.multi_token_prediction.losses]
    np.testing.assert_allclose(sum(mtp_losses), 0.1 * reference, rtol=1e-4)
    backbone(inputs_of(token_ids), training=False)
    assert backbone.multi_token_prediction.losses == []


def test_checkpoint_mtp_layer_exports_back(checkpoint, tmp_path):
    directory, token_ids, expected = checkpoint
    convert.to_transformers(presets.load(directory, preprocessor=None), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    original = safetensors_numpy.load_file(directory / "model.safetensors")
    exported = safetensors_numpy.load_file(tmp_path / "model.safetensors")
    mtp_names = [name for name in original if name.startswith(f"model.layers.{NUM_LAYERS}.")]
    assert len(mtp_names) > 10 and f"model.layers.{NUM_LAYERS}.eh_proj.weight" in mtp_names
    assert sorted(exported) == sorted(original)
    for name in mtp_names:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    reloaded = presets.load(tmp_path, preprocessor=None)
    (logits,) = reloaded.backbone.multi_token_logits(inputs_of(token_ids))
    logits = to_numpy(logits)[:, : token_ids.shape[1] - 1]
    assert np.abs(logits - expected).max() < TOLERANCE


def test_checkpoint_without_its_mtp_layer_loads_without(checkpoint, tmp_path):
    # transformers saves DeepSeek-V3 without the layer its config counts.
    model = transformers.DeepseekV3ForCausalLM(deepseek_v3_config(NUM_LAYERS))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert presets.load(tmp_path, preprocessor=None).backbone.num_mtp_layers == 0


TINY = dict(
    vocabulary_size=VOCABULARY_SIZE, num_layers=1, hidden_dim=16,
    num_query_heads=2, num_experts=4, top_k=2, moe_intermediate_dim=16,
    moe_options={"capacity_factor": None, "aux_loss_weight": 0.0},
)


def tiny_model(**changes):
    keras.utils.set_random_seed(0)
    backbone = MoEBackbone(**{**TINY, "num_mtp_layers": 1, **changes})
    return MoECausalLM(backbone, preprocessor=None)


def tokens():
    rng = np.random.default_rng(4)
    return rng.integers(1, VOCABULARY_SIZE, size=(4, 13)).astype("int32")


def mtp_loss(model, token_ids):
    (logits,) = model.backbone.multi_token_logits(inputs_of(token_ids))
    return float(to_numpy(
        multi_token_prediction_loss(logits, token_ids, np.ones_like(token_ids), 1)
    ))


def test_fit_lowers_the_mtp_loss():
    model = tiny_model(mtp_loss_weight=1.0)
    ids = tokens()
    x, y = inputs_of(ids[:, :-1]), ids[:, 1:]
    before = mtp_loss(model, ids[:, :-1])
    eh_proj = model.backbone.multi_token_prediction.blocks[0].eh_proj.kernel
    eh_proj_before = to_numpy(eh_proj)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=4, epochs=8, verbose=0)
    after = mtp_loss(model, ids[:, :-1])
    assert after < 0.7 * before
    # Only the MTP loss reaches the module's own weights.
    assert np.abs(to_numpy(eh_proj) - eh_proj_before).max() > 1e-3


def without_mtp(model):
    """The same weights in a backbone without MTP modules."""
    config = {**model.backbone.get_config(), "num_mtp_layers": 0}
    plain = MoECausalLM(MoEBackbone.from_config(config), preprocessor=None)
    values = {v.path: v for v in model.weights}
    for variable in plain.weights:
        variable.assign(values[variable.path])
    return plain


def test_inference_and_generate_do_not_use_the_mtp_modules():
    model = tiny_model()
    plain = without_mtp(model)
    assert model.count_params() > plain.count_params()
    ids = tokens()
    logits = to_numpy(model(inputs_of(ids)))
    np.testing.assert_array_equal(logits, to_numpy(plain(inputs_of(ids))))
    # Prompts of 6 tokens, right-padded to the generation length 10.
    padding_mask = np.zeros((2, 10), "int32")
    padding_mask[:, :6] = 1
    prompts = {"token_ids": ids[:2, :10] * padding_mask, "padding_mask": padding_mask}
    for causal_lm in (model, plain):
        causal_lm.compile(sampler="greedy")
    generated = model.generate(prompts, stop_token_ids=None)
    expected = plain.generate(prompts, stop_token_ids=None)
    assert (np.asarray(generated["token_ids"])[:, 6:] != 0).any()
    np.testing.assert_array_equal(generated["token_ids"], expected["token_ids"])


def test_config_and_keras_file_round_trip(tmp_path):
    model = tiny_model(num_mtp_layers=2, mtp_loss_weight=0.3)
    config = model.backbone.get_config()
    assert (config["num_mtp_layers"], config["mtp_loss_weight"]) == (2, 0.3)
    assert MoEBackbone.from_config(config).get_config() == config
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.count_params() == model.count_params()
    ids = tokens()
    for ours, theirs in zip(
        model.backbone.multi_token_logits(inputs_of(ids)),
        restored.backbone.multi_token_logits(inputs_of(ids)),
    ):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    counts = presets.count_params(config)
    assert counts["total"] == model.count_params()
    # The modules only run in training: not in the active count.
    assert counts["active"] == presets.count_params({**config, "num_mtp_layers": 0})["active"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_mtp_layers=-1), "`num_mtp_layers` must be an integer >= 0. Received: num_mtp_layers=-1"),
        (dict(mtp_loss_weight=-0.5), "`mtp_loss_weight` must be a non-negative number. Received: mtp_loss_weight=-0.5"),
    ],
)
def test_bad_mtp_arguments_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        MoEBackbone(**{**TINY, **changes})


def test_deepseek_v2_export_refuses_mtp_modules(tmp_path):
    backbone = MoEBackbone(
        **{**TINY, "num_query_heads": 2}, attention_type="mla",
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
        num_mtp_layers=1,
    )
    with pytest.raises(convert.ConversionError, match="multi-token prediction"):
        convert.to_transformers(backbone, tmp_path, model_type="deepseek_v2")
