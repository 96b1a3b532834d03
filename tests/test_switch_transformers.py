"""Switch Transformer encoder-decoder: the model, and its Hugging Face checkpoints.

Tiny random `SwitchTransformersForConditionalGeneration` checkpoints are
written by transformers (CPU torch) in each test's temporary directory;
the converted `SwitchSeq2SeqLM` must give transformers' logits and router
losses, write a checkpoint transformers reads back unchanged, and decode
with its caches as a full forward pass does.
"""

import json
import os
import re

import keras
import numpy as np
import pytest
from keras import ops

import keras_moe
from script_backends import runs_on
from keras_moe.convert import ConversionError
from keras_moe.models import MoETokenizer
from keras_moe.models import SwitchEncoderDecoderBackbone
from keras_moe.models import SwitchSeq2SeqLM
from keras_moe.models import SwitchSeq2SeqLMPreprocessor
from testing.hf_checkpoints import assert_same_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_EXPERTS = 4
# No token is dropped: an expert's capacity is every token of the call
# (transformers' `expert_capacity` is 64 tokens per sequence).
NO_DROPS = {
    "capacity_factor": float(NUM_EXPERTS),
    "eval_capacity_factor": float(NUM_EXPERTS),
}


def make_checkpoint(directory, seed=0, **overrides):
    """A tiny random transformers Switch checkpoint in `directory`."""
    settings = dict(
        vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_layers=2,
        num_decoder_layers=2, num_heads=3, num_experts=NUM_EXPERTS,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        expert_capacity=64, dropout_rate=0.0,
    )
    settings.update(overrides)
    config = transformers.SwitchTransformersConfig(**settings)
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "router" in name:
                # Confident, varied routing.
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            elif "layer_norm" in name:
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            elif "shared" not in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory)
    return model


def inputs_with_padding():
    return {
        "encoder_token_ids": np.array(
            [[5, 9, 13, 2, 7, 30, 1], [4, 8, 15, 1, 0, 0, 0]], "int32"
        ),
        "encoder_padding_mask": np.array(
            [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], "int32"
        ),
        "decoder_token_ids": np.array(
            [[0, 11, 3, 17, 21], [0, 6, 19, 0, 0]], "int32"
        ),
        "decoder_padding_mask": np.array(
            [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], "int32"
        ),
    }


def transformers_outputs(model, inputs, **kwargs):
    def tensor(name):
        return torch.tensor(inputs[name], dtype=torch.long)

    with torch.no_grad():
        return model(
            input_ids=tensor("encoder_token_ids"),
            attention_mask=tensor("encoder_padding_mask"),
            decoder_input_ids=tensor("decoder_token_ids"),
            decoder_attention_mask=tensor("decoder_padding_mask"),
            **kwargs,
        )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("switch_checkpoint")
    model = make_checkpoint(directory)
    return directory, model


@pytest.fixture(scope="module")
def converted(checkpoint):
    directory, _ = checkpoint
    # No jitter, so that training-mode routing (where the losses are added)
    # is transformers' evaluation routing.
    return keras_moe.presets.load(
        str(directory), preprocessor=None, moe_options={**NO_DROPS, "jitter": 0.0}
    )


def test_logits_match_transformers_with_padding(checkpoint, converted):
    _, reference = checkpoint
    model = converted
    assert isinstance(model, SwitchSeq2SeqLM)
    inputs = inputs_with_padding()
    expected = transformers_outputs(reference, inputs).logits.numpy()
    logits = ops.convert_to_numpy(model(inputs))
    real = inputs["decoder_padding_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)


def test_router_losses_match_transformers(checkpoint, converted):
    _, reference = checkpoint
    model = converted
    inputs = {name: value[:1] for name, value in inputs_with_padding().items()}
    expected = transformers_outputs(reference, inputs, output_router_logits=True)
    model(inputs, training=True)
    backbone = model.backbone
    for stack, blocks in (("encoder", backbone.encoder_layers),
                          ("decoder", backbone.decoder_layers)):
        (sparse,) = [block.feedforward for block in blocks if block.is_sparse]
        aux_loss, z_loss = (float(ops.convert_to_numpy(loss)) for loss in sparse.losses)
        np.testing.assert_allclose(
            aux_loss / sparse.aux_loss_weight,
            float(getattr(expected, f"{stack}_aux_loss")), rtol=0, atol=1e-5)
        np.testing.assert_allclose(
            z_loss / sparse.z_loss_weight,
            float(getattr(expected, f"{stack}_z_loss")), rtol=0, atol=1e-5)


def test_export_round_trip(checkpoint, converted, tmp_path):
    _, reference = checkpoint
    keras_moe.convert.to_transformers(converted, tmp_path)
    exported = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        tmp_path
    )
    assert_same_tensors(exported, reference)
    assert exported.config.encoder_sparse_step == 2
    assert exported.config.decoder_sparse_step == 2


def test_generate_with_cache_equals_full_forward_argmax(converted):
    model = converted
    model.compile(sampler="greedy")
    inputs = inputs_with_padding()
    prompt = {
        **inputs,
        "decoder_token_ids": np.zeros((2, 6), "int32"),
        "decoder_padding_mask": np.array([[1, 0, 0, 0, 0, 0]] * 2, "int32"),
    }
    generated = model.generate(prompt, stop_token_ids=None)["decoder_token_ids"]
    full = {
        **inputs,
        "decoder_token_ids": np.asarray(generated, "int32"),
        "decoder_padding_mask": np.ones((2, 6), "int32"),
    }
    argmax = np.argmax(ops.convert_to_numpy(model(full)), axis=-1)
    np.testing.assert_array_equal(np.asarray(generated)[:, 1:], argmax[:, :-1])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dense_act_fn", "swish", "`dense_act_fn`='swish'"),
        ("feed_forward_proj", "gated-gelu", "`feed_forward_proj`='gated-gelu'"),
        ("router_bias", True, "`router_bias`"),
        ("is_gated_act", True, "`is_gated_act`=true"),
        (
            "relative_attention_num_buckets", 16,
            "`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`"
            " has shape [8, 3] but the config needs [16, 3]",
        ),
    ],
)
def test_bad_config_fields_are_named(checkpoint, tmp_path, field, value, message):
    directory, _ = checkpoint
    for name in os.listdir(directory):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=re.escape(message)):
        keras_moe.presets.load(str(tmp_path), preprocessor=None)


def test_missing_expert_tensor_is_named(checkpoint, tmp_path):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    directory, _ = checkpoint
    tensors = load_file(directory / "model.safetensors")
    missing = "decoder.block.1.layer.2.mlp.experts.expert_3.wi.weight"
    del tensors[missing]
    save_file(tensors, tmp_path / "model.safetensors", {"format": "pt"})
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    with pytest.raises(ConversionError, match=missing):
        keras_moe.presets.load(str(tmp_path), preprocessor=None)


def test_export_refuses_what_transformers_cannot_run(tmp_path):
    gated = tiny_backbone(gated_feedforward=True, activation="gelu")
    with pytest.raises(ConversionError, match="gated_feedforward=True"):
        keras_moe.convert.to_transformers(gated, tmp_path)
    no_sparse_layer = tiny_backbone(encoder_sparse_step=0)
    with pytest.raises(ConversionError, match="sparse step 0"):
        keras_moe.convert.to_transformers(no_sparse_layer, tmp_path)


def test_pickled_checkpoint_is_refused(checkpoint, tmp_path):
    directory, _ = checkpoint
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConversionError, match="AutoModelForSeq2SeqLM.*safetensors"):
        keras_moe.presets.load(str(tmp_path), preprocessor=None)


def tiny_backbone(**overrides):
    settings = dict(
        vocabulary_size=MoETokenizer().vocabulary_size(), num_layers=2,
        hidden_dim=16, num_heads=2, intermediate_dim=32, num_experts=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )
    settings.update(overrides)
    return SwitchEncoderDecoderBackbone(**settings)


def test_fit_on_text_pairs_save_and_reload(tmp_path):
    preprocessor = SwitchSeq2SeqLMPreprocessor(
        MoETokenizer(), encoder_sequence_length=12, decoder_sequence_length=8
    )
    model = SwitchSeq2SeqLM(tiny_backbone(), preprocessor=preprocessor)
    model.compile(optimizer=keras.optimizers.Adam(0.01), sampler="greedy")
    sources = ["translate: abc", "translate: de", "translate: fgh", "translate: i"]
    targets = ["ABC", "DE", "FGH", "I"]
    history = model.fit(sources, targets, batch_size=4, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    x, _, _ = preprocessor(sources, targets)
    before = ops.convert_to_numpy(model(x))
    path = str(tmp_path / "switch.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.backbone.get_config() == model.backbone.get_config()
    # The optimizer state comes back: `fit()` resumes.
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) == 3
    after = ops.convert_to_numpy(restored(x))
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert isinstance(restored.generate("translate: abc", max_length=6), str)


# Presets.

SWITCH_PRESETS = [
    name for name in keras_moe.presets.names()
    if "encoder_sparse_step" in keras_moe.presets.config(name)
]


def test_switch_presets_are_the_encoder_decoders():
    assert SWITCH_PRESETS == [
        "switch_base_128", "switch_base_16", "switch_base_256", "switch_base_32",
        "switch_base_64", "switch_base_8", "switch_c_2048", "switch_large_128",
        "switch_t5_small", "switch_xxl_128",
    ]


@pytest.mark.parametrize(
    "name", [n for n in SWITCH_PRESETS if "published" in keras_moe.presets.info(n)]
)
def test_switch_preset_counts_match_the_published_totals(name):
    published = keras_moe.presets.info(name)["published"]
    total = keras_moe.presets.count_params(name)["total"]
    # Within the precision the total is published to (Table 9 rounds to
    # the billion), and within 1% where that is finer.
    assert abs(total - published["total_params"]) <= published["precision"]
    if published["precision"] / published["total_params"] < 0.01:
        assert abs(total / published["total_params"] - 1) < 0.01


@pytest.mark.parametrize("num_experts", [8, 128])
def test_switch_base_counts_equal_the_transformers_model(num_experts):
    # The published checkpoints' config.json (google/switch-base-*).
    config = transformers.SwitchTransformersConfig(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
        num_decoder_layers=12, num_heads=12, num_experts=num_experts,
        num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
    )
    with torch.device("meta"):
        model = transformers.SwitchTransformersForConditionalGeneration(config)
    counts = keras_moe.presets.count_params(f"switch_base_{num_experts}")
    assert counts["total"] == model.num_parameters()
    converted = keras_moe.convert.backbone_config_from_transformers(config.to_dict())
    assert keras_moe.presets.count_params(converted)["total"] == model.num_parameters()


def test_count_params_equals_the_built_switch_t5_small():
    model = keras_moe.presets.load("switch_t5_small")
    assert isinstance(model, SwitchSeq2SeqLM)
    assert isinstance(model.preprocessor, SwitchSeq2SeqLMPreprocessor)
    counts = keras_moe.presets.count_params("switch_t5_small")
    assert counts["total"] == model.count_params()
    # Active: every weight but the experts a token does not use.
    experts = model.backbone.num_experts
    unused = sum(
        int(np.prod(w.shape)) for w in model.weights if "/experts/" in w.path
    ) * (experts - 1) // experts
    assert counts["active"] == counts["total"] - unused
    gated = {**keras_moe.presets.config("switch_t5_small"), "gated_feedforward": True,
             "tie_word_embeddings": False}
    backbone = SwitchEncoderDecoderBackbone(**gated)
    assert keras_moe.presets.count_params(gated)["total"] == backbone.count_params()


def test_renamed_decoder_presets():
    with pytest.raises(ValueError, match="'switch_decoder_small'"):
        keras_moe.presets.load("switch_small")
    decoder = keras_moe.presets.load(
        "switch_decoder_small", preprocessor=None, num_layers=1
    )
    assert type(decoder).__name__ == "MoECausalLM"


def test_switch_preset_round_trips_through_save_to_preset(tmp_path):
    model = keras_moe.presets.load(
        "switch_t5_small", num_layers=2, num_decoder_layers=2, hidden_dim=16,
        num_heads=2, key_value_dim=8, intermediate_dim=16,
    )
    inputs = {name: value[:, :4] for name, value in inputs_with_padding().items()}
    logits = ops.convert_to_numpy(model(inputs))
    model.save_to_preset(str(tmp_path))
    reloaded = keras_moe.presets.load(str(tmp_path))
    assert isinstance(reloaded, SwitchSeq2SeqLM)
    np.testing.assert_array_equal(ops.convert_to_numpy(reloaded(inputs)), logits)


def write_sentencepiece_model(path):
    """A tiny T5-style SentencePiece model (pad 0, end 1, unk 2) at `path`."""
    import io

    import sentencepiece

    words = "the quick brown fox jumps over a lazy dog and cat sat on mat".split()
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 5
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=24,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="word",
        hard_vocab_limit=False, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def test_checkpoint_sentencepiece_tokenizer_is_attached(checkpoint, tmp_path):
    import sentencepiece

    directory, _ = checkpoint
    for name in os.listdir(directory):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    write_sentencepiece_model(tmp_path / "spiece.model")
    model = keras_moe.presets.load(str(tmp_path))
    preprocessor = model.preprocessor
    assert isinstance(preprocessor, SwitchSeq2SeqLMPreprocessor)
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(tmp_path / "spiece.model")
    )
    expected = processor.encode("the lazy fox")
    x, y, _ = preprocessor(["the lazy fox"], ["a cat"])
    encoder_ids = np.asarray(x["encoder_token_ids"])[0].tolist()
    assert encoder_ids[: len(expected) + 1] == expected + [1]  # then </s>
    assert np.asarray(x["decoder_token_ids"])[0, 0] == 0  # T5 starts with <pad>
    model.compile(sampler="greedy")
    assert isinstance(model.generate("the fox", max_length=4), str)

    # Exported, the SentencePiece model goes back beside the weights, and
    # transformers' T5 tokenizer reads it to the same ids.
    exported = tmp_path / "exported"
    keras_moe.convert.to_transformers(model, exported)
    assert (exported / "spiece.model").read_bytes() == (
        tmp_path / "spiece.model"
    ).read_bytes()
    reference = transformers.AutoTokenizer.from_pretrained(exported)
    assert reference("the lazy fox")["input_ids"] == expected + [1]
    assert reference.pad_token_id == 0 and reference.eos_token_id == 1


def test_export_writes_the_tokenizer_special_token_ids(tmp_path):
    # The byte-level tokenizer of `switch_t5_small` pads with 258 and ends
    # with 257: transformers must start decoding, stop and pad with those.
    model = keras_moe.presets.load(
        "switch_t5_small", num_layers=2, num_decoder_layers=2, hidden_dim=8,
        num_heads=2, key_value_dim=4, intermediate_dim=8,
    )
    tokenizer = model.preprocessor.tokenizer
    keras_moe.convert.to_transformers(model, tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.pad_token_id == tokenizer.pad_token_id != 0
    assert config.decoder_start_token_id == tokenizer.pad_token_id
    assert config.eos_token_id == tokenizer.end_token_id != 1
    assert not (tmp_path / "spiece.model").exists()  # no file format of its own


def test_expert_dropout_is_a_loading_option(checkpoint):
    directory, _ = checkpoint
    model = keras_moe.presets.load(
        str(directory), preprocessor=None, dropout=0.1,
        moe_options={"expert_dropout": 0.4},
    )
    blocks = model.backbone.encoder_layers + model.backbone.decoder_layers
    assert {b.feedforward.experts.dropout for b in blocks if b.is_sparse} == {0.4}
    assert {b.feedforward.dropout for b in blocks if not b.is_sparse} == {0.1}


# The benchmark script keeps running (tiny sizes; timings are not checked).


@runs_on("torch")
def test_switch_benchmark_smoke_run_prints_every_model():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "switch_benchmark.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True,
        timeout=600, env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "keras_moe", "keras_moe dense", "keras_hub T5", "transformers", "transformers T5"
    ):
        assert f"{name} / keras_moe tokens/s" in result.stdout, name


def test_cross_attention_without_encoder_states_is_refused():
    from keras_moe.models.t5_relative_attention import T5RelativeAttention

    attention = T5RelativeAttention(2, 4, cross_attention=True)
    with pytest.raises(ValueError, match="key_value_states"):
        attention(np.zeros((1, 3, 8), "float32"))
