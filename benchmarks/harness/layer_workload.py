"""The layer workload the layer benchmarks share: sizes, seed, inputs.

`T` tokens shaped `[T / seq_len, seq_len, d]` in float32, experts of width
`f`, top-k routing; every layer is built from the same seed.
"""

import dataclasses

SEED = 1337


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes: `tokens = batch_size * seq_len` tokens of width `d`."""

    tokens: int
    seq_len: int
    hidden_dim: int
    intermediate_dim: int
    top_k: int

    @property
    def input_shape(self):
        return (self.tokens // self.seq_len, self.seq_len, self.hidden_dim)


FULL_SIZES = Sizes(
    tokens=4096, seq_len=512, hidden_dim=512, intermediate_dim=1024, top_k=2
)
QUICK_SIZES = Sizes(
    tokens=256, seq_len=64, hidden_dim=64, intermediate_dim=128, top_k=2
)


def sizes_for(quick, tokens=None):
    """`FULL_SIZES` or `QUICK_SIZES`, with `tokens` tokens if given."""
    base = QUICK_SIZES if quick else FULL_SIZES
    tokens = tokens or base.tokens
    seq_len = min(base.seq_len, tokens)
    if tokens % seq_len:
        raise SystemExit(f"--tokens must be a multiple of {seq_len}")
    return dataclasses.replace(base, tokens=tokens, seq_len=seq_len)


def make_inputs(sizes):
    """Standard-normal float32 inputs of `sizes.input_shape`, from `SEED`."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    return rng.standard_normal(sizes.input_shape).astype("float32")
