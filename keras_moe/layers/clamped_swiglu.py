"""`ClampedSwiGLU`: GPT-OSS's gated activation, as a feed-forward activation."""

import keras
from keras import ops

from keras_moe.utils.argument_validation import check_float


@keras.saving.register_keras_serializable(package="keras_moe")
class ClampedSwiGLU:
    """The clamped SwiGLU of GPT-OSS, for gated feed-forward blocks.

    Given a gated block's two projections, `gate` and `up`, it computes
    `g * sigmoid(alpha * g) * (u + 1)` with `g = min(gate, limit)` and
    `u = clip(up, -limit, limit)`: transformers' `GptOssExperts._apply_gate`
    (GPT-OSS uses `alpha=1.702`, `limit=7.0`). Passed as the `activation`
    of `Experts`, `SparseMoE` or `FeedForward` (with `gated=True`), it
    replaces their `activation(gate) * up`; called on one tensor it is the
    gate's activation alone, `g * sigmoid(alpha * g)`.

    Args:
        alpha: positive float, the slope inside the sigmoid.
        limit: positive float, where the gate and up projections are
            clamped.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> swiglu = ClampedSwiGLU(alpha=1.702, limit=7.0)
    >>> gate = np.array([1.0, 9.0], "float32")
    >>> up = np.array([0.5, -8.0], "float32")
    >>> hidden = ops.convert_to_numpy(swiglu.gated_product(gate, up))
    >>> [round(float(h), 3) for h in hidden]
    [1.269, -42.0]
    """

    def __init__(self, alpha=1.702, limit=7.0):
        self.alpha = check_float("alpha", alpha, positive=True)
        self.limit = check_float("limit", limit, positive=True)

    def __call__(self, gate):
        gate = ops.minimum(gate, ops.cast(self.limit, gate.dtype))
        return gate * ops.sigmoid(gate * ops.cast(self.alpha, gate.dtype))

    def gated_product(self, gate, up):
        """The block's hidden activations from its gate and up projections.

        Args:
            gate: the gate projection's outputs.
            up: the up projection's outputs, of the same shape.

        Returns:
            A tensor of that shape.
        """
        up = ops.clip(up, -self.limit, self.limit)
        return self(gate) * (up + ops.cast(1.0, up.dtype))

    def get_config(self):
        return {"alpha": self.alpha, "limit": self.limit}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, ClampedSwiGLU) and self.get_config() == other.get_config()

    def __repr__(self):
        return f"ClampedSwiGLU(alpha={self.alpha}, limit={self.limit})"
