"""DeepSeek-V2's group-limited greedy routing (`group_score="max"`).

A group's score is its best expert's softmax score, each token keeps its
`top_groups` best groups and takes its `top_k` experts among them. Checked
against a slow NumPy loop, and end to end against transformers'
`DeepseekV2ForCausalLM` with `topk_method="group_limited_greedy"` (loading
and export), on every backend.
"""

import json

import numpy as np
import pytest

from keras_moe import convert
from keras_moe import presets
from keras_moe.convert import ConversionError
from keras_moe.layers import HierarchicalMoE
from keras_moe.layers import SparseMoE
from keras_moe.layers import TopKRouter
from testing import to_numpy
from testing.hf_checkpoints import TOLERANCE
from testing.hf_checkpoints import VOCABULARY_SIZE
from testing.hf_checkpoints import keras_logits
from testing.hf_checkpoints import randomize_weights
from testing.hf_checkpoints import transformers_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")



def group_limited_reference(logits, top_k, groups, top_groups, group_score):
    """Slow NumPy group-limited top-k over softmax scores, token by token.

    Ties go to the lower group, then the lower expert index.
    """
    num_tokens, num_experts = logits.shape
    size = num_experts // groups
    ids = np.zeros((num_tokens, top_k), "int64")
    weights = np.zeros((num_tokens, top_k))
    for t in range(num_tokens):
        scores = np.exp(logits[t] - logits[t].max())
        scores /= scores.sum()
        group_scores = []
        for g in range(groups):
            members = sorted(scores[g * size : (g + 1) * size], reverse=True)
            if group_score == "max":
                group_scores.append(members[0])
            else:
                group_scores.append(sum(members[:2]))
        kept = sorted(range(groups), key=lambda g: (-group_scores[g], g))[:top_groups]
        eligible = [e for e in range(num_experts) if e // size in kept]
        chosen = sorted(eligible, key=lambda e: (-scores[e], e))[:top_k]
        ids[t] = chosen
        weights[t] = scores[chosen]
    return ids, weights


def test_max_group_score_matches_numpy_reference():
    # DeepSeek-V2's shape of routing, scaled down: 32 experts in 8 groups of
    # 4, 3 groups per token, top-6 (more than 3, so the group limit bites),
    # weights scaled and not renormalised.
    rng = np.random.default_rng(0)
    router = TopKRouter(
        32, top_k=6, normalize_top_k=False, routed_scaling_factor=16.0,
        expert_groups=8, top_groups=3, group_score="max", dtype="float32",
    )
    router.build((None, 8))
    kernel = rng.normal(scale=1.5, size=(8, 32)).astype("float32")
    router.kernel.assign(kernel)
    tokens = rng.normal(size=(200, 8)).astype("float32")
    logits = tokens.astype("float64") @ kernel.astype("float64")
    expected_ids, expected_weights = group_limited_reference(logits, 6, 8, 3, "max")
    # The group limit changes the choice of some tokens, and so does the
    # group score (the sum of the two best would pick other groups).
    greedy_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :6]
    assert (np.sort(greedy_ids) != np.sort(expected_ids)).any(axis=-1).sum() > 5
    top2_ids, _ = group_limited_reference(logits, 6, 8, 3, "top2_sum")
    assert (np.sort(top2_ids) != np.sort(expected_ids)).any(axis=-1).sum() > 2

    routing = router(tokens)
    np.testing.assert_array_equal(to_numpy(routing.expert_ids), expected_ids)
    np.testing.assert_allclose(
        to_numpy(routing.expert_weights), 16.0 * expected_weights, rtol=1e-5
    )


def test_top2_sum_stays_the_default_and_matches_reference():
    rng = np.random.default_rng(1)
    router = TopKRouter(
        16, top_k=6, expert_groups=8, top_groups=3, normalize_top_k=False,
        dtype="float32",
    )
    assert router.group_score == "top2_sum"
    router.build((None, 8))
    kernel = rng.normal(scale=1.5, size=(8, 16)).astype("float32")
    router.kernel.assign(kernel)
    tokens = rng.normal(size=(40, 8)).astype("float32")
    logits = tokens.astype("float64") @ kernel.astype("float64")
    expected_ids, _ = group_limited_reference(logits, 6, 8, 3, "top2_sum")
    np.testing.assert_array_equal(to_numpy(router(tokens).expert_ids), expected_ids)


def test_group_score_config_round_trip_and_errors():
    layer = SparseMoE(
        8, 4, top_k=3, expert_groups=4, top_groups=2, group_score="max"
    )
    config = layer.get_config()
    assert config["group_score"] == "max"
    again = SparseMoE.from_config(config)
    assert again.router.group_score == "max"
    assert again.router.get_config() == layer.router.get_config()
    with pytest.raises(ValueError, match="`group_score` must be one of 'top2_sum', 'max'. Received: group_score='sum'"):
        SparseMoE(8, 4, expert_groups=4, top_groups=2, group_score="sum")
    with pytest.raises(ValueError, match="`group_score`"):
        HierarchicalMoE(2, 4, 4, group_score="max")


def deepseek_v2_config(**changes):
    options = dict(
        vocab_size=VOCABULARY_SIZE,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=6,
        intermediate_size=32,
        moe_intermediate_size=8,
        first_k_dense_replace=1,
        num_hidden_layers=2,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        routed_scaling_factor=16.0,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
    )
    options.update(changes)
    return transformers.DeepseekV2Config(**options)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny group-limited DeepSeek-V2 checkpoint and its logits."""
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(deepseek_v2_config()).eval()
    randomize_weights(model)
    directory = tmp_path_factory.mktemp("deepseek_v2_groups")
    model.save_pretrained(directory)
    token_ids = np.random.default_rng(2).integers(1, VOCABULARY_SIZE, size=(2, 12))
    token_ids = token_ids.astype("int32")
    greedy = transformers.DeepseekV2ForCausalLM(
        deepseek_v2_config(topk_method="greedy")
    ).eval()
    greedy.load_state_dict(model.state_dict())
    return directory, token_ids, transformers_logits(model, token_ids), transformers_logits(
        greedy, token_ids
    )


def test_group_limited_greedy_checkpoint_gives_transformers_logits(checkpoint):
    directory, token_ids, expected, greedy = checkpoint
    # The group limit changes the logits: the test is decisive.
    assert np.abs(expected - greedy).max() > 0.05
    model = presets.load(directory, preprocessor=None)
    options = model.backbone.moe_options
    assert (options["expert_groups"], options["top_groups"]) == (4, 2)
    assert options["group_score"] == "max"
    assert np.abs(keras_logits(model, token_ids) - expected).max() < TOLERANCE


def test_group_limited_greedy_exports_back(checkpoint, tmp_path):
    directory, token_ids, expected, _ = checkpoint
    convert.to_transformers(presets.load(directory, preprocessor=None), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["topk_method"] == "group_limited_greedy"
    assert (config["n_group"], config["topk_group"]) == (4, 2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert np.abs(transformers_logits(reloaded, token_ids) - expected).max() < TOLERANCE


def test_export_refuses_the_other_deepseek_group_score(checkpoint, tmp_path):
    directory = checkpoint[0]
    options = convert.backbone_config_from_transformers(
        json.loads((directory / "config.json").read_text())
    )["moe_options"]
    model = presets.load(
        directory, preprocessor=None,
        moe_options={**options, "group_score": "top2_sum"},
    )
    with pytest.raises(ConversionError, match="group_score='max'"):
        convert.to_transformers(model, tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(topk_method="noaux_tc"), "`topk_method`='noaux_tc'"),
        (dict(n_group=3), "`n_group`=3, which does not divide"),
        (dict(topk_group=1), "`topk_group`=1"),
    ],
)
def test_bad_group_fields_are_named(changes, message):
    config = deepseek_v2_config().to_dict()
    config.update(model_type="deepseek_v2", **changes)
    with pytest.raises(ConversionError, match=message):
        convert.backbone_config_from_transformers(config)
