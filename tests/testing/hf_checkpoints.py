"""Tiny random Hugging Face checkpoints, and logits to hold against theirs.

The conversion tests write tiny random `transformers` models, load them with
keras-moe and compare logits on one padded batch. These are their shared
pieces. `torch` is imported by the functions that need it, so importing
this module costs nothing where PyTorch is missing.
"""

import shutil

import keras
import numpy as np

# Logits of a converted checkpoint agree with transformers' within this.
TOLERANCE = 1e-4
VOCABULARY_SIZE = 64


def randomize_weights(model, seed=0, *, generator=None, bias_scale=0.2, fan_in_axis=None):
    """Give a transformers `model` weights far from its initialisation.

    Decisive routing and attention make every mechanism show in the
    logits: norm scales in `[0.5, 1.5)`, vectors and `*_bias` parameters
    `bias_scale * N(0, 1)`, matrices `N(0, 1) * 1.5 / sqrt(fan_in)`, and
    DeepSeek's `e_score_correction_bias` buffers `0.1 * N(0, 1)`.

    Args:
        model: a `torch.nn.Module`.
        seed: int, seeds a new generator (unless `generator` is given).
        generator: optional `torch.Generator` to draw from (to share one
            stream across several models).
        bias_scale: float, the scale of vectors and biases.
        fan_in_axis: optional `(name, shape) -> axis` of a matrix's inputs;
            defaults to the last axis (`nn.Linear`'s `[out, in]`).
    """
    import torch

    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            shape = parameter.shape
            if name.endswith("norm.weight") or "layernorm" in name:
                values = 0.5 + torch.rand(shape, generator=generator)
            elif parameter.ndim == 1 or name.endswith("_bias"):
                values = bias_scale * torch.randn(shape, generator=generator)
            else:
                axis = -1 if fan_in_axis is None else fan_in_axis(name, shape)
                values = torch.randn(shape, generator=generator)
                values = values * (1.5 / shape[axis] ** 0.5)
            parameter.copy_(values)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


def assert_same_tensors(model, reference):
    """Two torch models hold the same tensors, under the same names, bit for bit.

    Args:
        model: a `torch.nn.Module` (e.g. a checkpoint exported by keras-moe,
            loaded by transformers).
        reference: the `torch.nn.Module` it must equal.
    """
    import torch

    state, expected = model.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name


def padded_batch(short_length=3, vocabulary_size=VOCABULARY_SIZE):
    """Three rows of 9 token ids: one whole, two padded on the right.

    Returns:
        `(token_ids, padding_mask)`, int32 `[3, 9]`; padding ids are 0.
    """
    rng = np.random.default_rng(1)
    token_ids = rng.integers(1, vocabulary_size, size=(3, 9)).astype("int32")
    padding_mask = np.ones((3, 9), "int32")
    padding_mask[1, 6:] = 0
    padding_mask[2, short_length:] = 0
    token_ids[padding_mask == 0] = 0
    return token_ids, padding_mask


def transformers_logits(model, token_ids, padding_mask=None):
    """A transformers causal LM's float32 logits, as NumPy."""
    import torch

    arguments = {"input_ids": torch.tensor(token_ids, dtype=torch.long)}
    if padding_mask is not None:
        arguments["attention_mask"] = torch.tensor(padding_mask, dtype=torch.long)
    with torch.no_grad():
        return model(**arguments).logits.float().numpy()


def keras_logits(model, token_ids, padding_mask=None):
    """A `MoECausalLM`'s float32 logits, as NumPy (no padding by default)."""
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if keras.backend.backend() == "jax":
        # One compiled call is faster than JAX's op-by-op eager dispatch.
        logits = model.predict_on_batch(inputs)
    else:
        logits = model(inputs)
    return keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))


def max_difference(a, b, padding_mask=None):
    """The largest absolute difference over the real (unpadded) tokens."""
    difference = np.abs(a - b)
    if padding_mask is not None:
        difference = difference[padding_mask.astype(bool)]
    return float(difference.max())


def greedy_continuation(causal_lm, token_ids, padding_mask):
    """What greedy decoding must write, from one full forward pass a token.

    Each padded position (False in `padding_mask`) gets the argmax of the
    full pass's logits at the position before it: the reference for
    `generate()` with its caches.

    Returns:
        int32 `[batch, length]`.
    """
    expected = token_ids.copy()
    first = int(padding_mask.sum(axis=1).min())
    for position in range(first, token_ids.shape[1]):
        logits = keras_logits(causal_lm, expected)
        next_tokens = logits[:, position - 1].argmax(-1)
        fill = ~padding_mask[:, position]
        expected[fill, position] = next_tokens[fill]
    return expected


def copy_checkpoint(source, destination):
    """A copy of checkpoint directory `source` at `destination` (returned)."""
    shutil.copytree(source, destination)
    return destination


def rewrite_tensors(directory, change):
    """Apply `change(tensors)` to `directory`'s `model.safetensors`, in place."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, {"format": "pt"})
