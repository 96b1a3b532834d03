"""A slow, obviously-correct NumPy Mixture-of-Experts: one token at a time.

Independent of `keras_moe`: it shares no code with the layers, only the
published definitions (top-k softmax routing, GShard/Switch capacity priority,
the Switch load-balancing loss and the ST-MoE z-loss). Everything is float64.
"""

import math

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu(x):
    # Exact (erf) GELU, Keras' default.
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def relu(x):
    return np.maximum(x, 0.0)


ACTIVATIONS = {"silu": silu, "gelu": gelu, "relu": relu}


def capacity_for(num_tokens, num_experts, top_k, capacity_factor):
    if capacity_factor is None:
        return num_tokens
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-6)
    return max(1, min(capacity, num_tokens))


def expert_ffn(token, weights, expert, activation, gated):
    """One expert on one token, from plain per-expert matrices."""
    act = ACTIVATIONS[activation]
    up = token @ weights["up_kernel"][expert]
    if "up_bias" in weights:
        up = up + weights["up_bias"][expert]
    if gated:
        gate = token @ weights["gate_kernel"][expert]
        if "gate_bias" in weights:
            gate = gate + weights["gate_bias"][expert]
        hidden = act(gate) * up
    else:
        hidden = act(up)
    out = hidden @ weights["down_kernel"][expert]
    if "down_bias" in weights:
        out = out + weights["down_bias"][expert]
    return out


def route(tokens, router_kernel, top_k, normalize_top_k):
    """Per token: its top-k experts (best first) and their weights."""
    logits = tokens @ router_kernel
    expert_ids, expert_weights, probs = [], [], []
    for token_logits in logits:
        shifted = np.exp(token_logits - token_logits.max())
        token_probs = shifted / shifted.sum()
        chosen = sorted(range(len(token_probs)), key=lambda e: -token_probs[e])
        chosen = chosen[:top_k]
        weights = np.array([token_probs[e] for e in chosen])
        if normalize_top_k:
            weights = weights / weights.sum()
        expert_ids.append(chosen)
        expert_weights.append(weights)
        probs.append(token_probs)
    return np.array(expert_ids), np.array(expert_weights), logits, np.array(probs)


def assign_capacity(expert_ids, num_experts, capacity, token_mask):
    """GShard priority: all first choices (in token order), then all seconds."""
    num_tokens, top_k = expert_ids.shape
    used = [0] * num_experts
    kept = np.zeros((num_tokens, top_k), dtype=bool)
    for rank in range(top_k):
        for token in range(num_tokens):
            if not token_mask[token]:
                continue
            expert = expert_ids[token, rank]
            if used[expert] < capacity:
                used[expert] += 1
                kept[token, rank] = True
    return kept


def sparse_moe(
    tokens,
    weights,
    *,
    num_experts,
    top_k,
    capacity_factor,
    activation="silu",
    gated=True,
    normalize_top_k=True,
    token_mask=None,
):
    """Reference SparseMoE on flat tokens `[T, d]`.

    Returns a dict: `outputs [T, d]`, `kept [T, k]`, `expert_ids`,
    `aux_loss` (E * sum f_i P_i, before its weight) and `z_loss`.
    """
    tokens = np.asarray(tokens, np.float64)
    num_tokens = tokens.shape[0]
    if token_mask is None:
        token_mask = np.ones(num_tokens, dtype=bool)
    expert_ids, expert_weights, logits, probs = route(
        tokens, weights["router_kernel"], top_k, normalize_top_k
    )
    capacity = capacity_for(num_tokens, num_experts, top_k, capacity_factor)
    kept = assign_capacity(expert_ids, num_experts, capacity, token_mask)

    outputs = np.zeros_like(tokens)
    for token in range(num_tokens):
        for rank in range(top_k):
            if kept[token, rank]:
                expert = expert_ids[token, rank]
                outputs[token] += expert_weights[token, rank] * expert_ffn(
                    tokens[token], weights, expert, activation, gated
                )

    real = [t for t in range(num_tokens) if token_mask[t]]
    counts = np.zeros(num_experts)
    for token in real:
        for expert in expert_ids[token]:
            counts[expert] += 1
    load = counts / max(counts.sum(), 1.0)
    importance = (
        np.mean([probs[t] for t in real], axis=0) if real else np.zeros(num_experts)
    )
    aux_loss = num_experts * float(np.sum(load * importance))
    log_z = [
        logits[t].max() + math.log(np.exp(logits[t] - logits[t].max()).sum())
        for t in real
    ]
    z_loss = float(np.mean(np.square(log_z))) if real else 0.0
    return {
        "outputs": outputs,
        "kept": kept,
        "expert_ids": expert_ids,
        "aux_loss": aux_loss,
        "z_loss": z_loss,
    }
