"""Slow NumPy routers, one token (or one expert) at a time, from the papers.

Independent of `keras_moe`: each function follows the published algorithm
(REFERENCES.md) with Python loops and sorts. Ties go to the lower index (a
stable sort on the negated score), which is what the layers promise on every
backend. Everything is float64.
"""

import math

import numpy as np

from testing import moe_reference


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    shifted = np.exp(x - x.max())
    return shifted / shifted.sum()


def best_first(scores, k):
    """Indices of the `k` largest scores, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def token_choice(
    tokens,
    router_kernel,
    *,
    top_k,
    score_function="softmax",
    normalize_top_k=True,
    routed_scaling_factor=1.0,
    expert_groups=1,
    top_groups=1,
    expert_bias=None,
):
    """Top-k token-choice routing with DeepSeek-V3's options.

    Selection uses `scores + expert_bias`, restricted to the `top_groups`
    groups whose two best (biased) scores sum highest; weights are the
    unbiased scores of the chosen experts, renormalised when asked, times
    `routed_scaling_factor`.

    Returns `(expert_ids [T, k], expert_weights [T, k], logits [T, E],
    probs [T, E])`, `probs` being each token's distribution over experts.
    """
    logits = tokens @ router_kernel
    num_experts = logits.shape[1]
    per_group = num_experts // expert_groups
    bias = np.zeros(num_experts) if expert_bias is None else expert_bias
    all_ids, all_weights, all_probs = [], [], []
    for token_logits in logits:
        if score_function == "softmax":
            scores = softmax(token_logits)
            probs = scores
        else:
            scores = sigmoid(token_logits)
            probs = scores / scores.sum()
        biased = scores + bias
        eligible = list(range(num_experts))
        if top_groups < expert_groups:
            group_scores = []
            for group in range(expert_groups):
                members = biased[group * per_group : (group + 1) * per_group]
                best = sorted(members, reverse=True)[: min(2, per_group)]
                group_scores.append(sum(best))
            kept_groups = best_first(group_scores, top_groups)
            eligible = [e for e in eligible if e // per_group in kept_groups]
        ranked = sorted(eligible, key=lambda e: (-biased[e], e))[:top_k]
        weights = np.array([scores[e] for e in ranked])
        if normalize_top_k:
            weights = weights / weights.sum()
        all_ids.append(ranked)
        all_weights.append(weights * routed_scaling_factor)
        all_probs.append(probs)
    return (
        np.array(all_ids),
        np.array(all_weights),
        logits,
        np.array(all_probs),
    )


def hierarchical(
    tokens, group_kernel, expert_kernel, *, top_groups, top_k, normalize_top_k
):
    """Two-level gating tree: groups by softmax, then experts inside a group."""
    num_groups, _, per_group = expert_kernel.shape
    all_ids, all_weights, all_logits, all_probs = [], [], [], []
    for token in tokens:
        group_logits = token @ group_kernel
        group_probs = softmax(group_logits)
        groups = best_first(group_probs, top_groups)
        group_weights = np.array([group_probs[g] for g in groups])
        if normalize_top_k:
            group_weights = group_weights / group_weights.sum()
        ids, weights = [], []
        joint_logits, joint_probs = [], []
        for group in range(num_groups):
            inner_logits = token @ expert_kernel[group]
            joint_logits.extend(group_logits[group] + inner_logits)
            joint_probs.extend(group_probs[group] * softmax(inner_logits))
        for group, group_weight in zip(groups, group_weights):
            inner_probs = softmax(token @ expert_kernel[group])
            experts = best_first(inner_probs, top_k)
            inner_weights = np.array([inner_probs[e] for e in experts])
            if normalize_top_k:
                inner_weights = inner_weights / inner_weights.sum()
            ids.extend(group * per_group + e for e in experts)
            weights.extend(group_weight * inner_weights)
        all_ids.append(ids)
        all_weights.append(weights)
        all_logits.append(joint_logits)
        all_probs.append(joint_probs)
    return (
        np.array(all_ids),
        np.array(all_weights),
        np.array(all_logits),
        np.array(all_probs),
    )


def apply_experts(tokens, weights, expert_ids, expert_weights, kept, activation, gated):
    """`sum_k weight * expert(token)` over each token's kept choices."""
    outputs = np.zeros_like(tokens)
    for token in range(tokens.shape[0]):
        for rank in range(expert_ids.shape[1]):
            if kept[token, rank]:
                outputs[token] += expert_weights[token, rank] * moe_reference.expert_ffn(
                    tokens[token], weights, expert_ids[token, rank], activation, gated
                )
    return outputs


def expert_choice(tokens, weights, *, capacity_factor, activation, gated, token_mask=None):
    """Zhou et al. 2022: each expert takes its `C = cf * T / E` best tokens.

    Returns `(outputs [T, d], chosen [E][C] token lists, logits)`.
    """
    num_tokens = tokens.shape[0]
    if token_mask is None:
        token_mask = np.ones(num_tokens, dtype=bool)
    logits = tokens @ weights["router_kernel"]
    probs = np.array([softmax(row) for row in logits])
    num_experts = probs.shape[1]
    capacity = max(1, min(math.ceil(capacity_factor * num_tokens / num_experts - 1e-6), num_tokens))
    outputs = np.zeros_like(tokens)
    chosen = []
    for expert in range(num_experts):
        real = [t for t in range(num_tokens) if token_mask[t]]
        picked = sorted(real, key=lambda t: (-probs[t, expert], t))[:capacity]
        chosen.append(picked)
        for token in picked:
            outputs[token] += probs[token, expert] * moe_reference.expert_ffn(
                tokens[token], weights, expert, activation, gated
            )
    return outputs, chosen, logits


def sequence_balance_loss(probs, expert_ids, token_mask):
    """DeepSeek-V3: mean over sequences of `E * sum_i f_i P_i` within each.

    `probs [S, T, E]`, `expert_ids [S, T, k]`, `token_mask [S, T]`.
    """
    num_experts = probs.shape[-1]
    losses = []
    for sequence in range(probs.shape[0]):
        real = [t for t in range(probs.shape[1]) if token_mask[sequence, t]]
        if not real:
            continue
        counts = np.zeros(num_experts)
        for t in real:
            for expert in expert_ids[sequence, t]:
                counts[expert] += 1
        load = counts / counts.sum()
        importance = np.mean([probs[sequence, t] for t in real], axis=0)
        losses.append(num_experts * np.sum(load * importance))
    return float(np.mean(losses))


def max_violation(counts):
    """MaxVio (Wang et al. 2024): `(max load - mean load) / mean load`."""
    counts = np.asarray(counts, np.float64)
    return float((counts.max() - counts.mean()) / counts.mean())
