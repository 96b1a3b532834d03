from typing import NamedTuple

import keras
from keras import ops

from keras_moe.utils.argument_validation import check_bool
from keras_moe.utils.argument_validation import check_choice
from keras_moe.utils.argument_validation import check_rate

SCORE_FUNCTIONS = ("softmax", "sigmoid")
# Floor of the sums that scores and weights are divided by: sigmoid scores
# all underflow to 0 for logits near -1e4, and the gradient of x / s has
# s ** 2 below it, which must not flush to 0 in float32 (0 / 0 = NaN).
MIN_NORMALIZER = 1e-12


class RouterScores(NamedTuple):
    """A router's scores, before any expert is chosen.

    Attributes:
        router_logits: float `[..., E]`.
        scores: float `[..., E]`, softmax or sigmoid of the logits: what the
            combine weights are taken from.
        router_probs: float `[..., E]`, `scores` as a distribution.
    """

    router_logits: object
    scores: object
    router_probs: object


def router_scores_spec(inputs, num_experts, dtype):
    """The `RouterScores` of symbolic shapes for `inputs` `[..., d]`."""
    shape = tuple(inputs.shape[:-1]) + (num_experts,)
    return RouterScores(*(keras.KerasTensor(shape, dtype) for _ in range(3)))


class LinearScoring:
    """Scores of every expert from one `[d, E]` kernel: a router mixin.

    Logits are `x @ kernel` (plus a `bias [E]` when the router sets
    `router_bias`, as GPT-OSS's does); scores their softmax or sigmoid. In training,
    optional jitter multiplies the inputs by `U(1 - jitter, 1 + jitter)`
    noise (Switch) and optional noisy gating adds
    `N(0, 1) * softplus(x @ noise_kernel)` to the logits (Shazeer et al.
    2017). Shared by the routers that score experts this way, whatever they
    then choose (`TopKRouter`, `ExpertChoiceRouter`): a subclass calls
    `_init_scoring` in `__init__`, `_build_scoring` in `build`, and adds
    `_scoring_config()` to its config.
    """

    def _init_scoring(
        self, score_function, jitter, noisy_gating, kernel_initializer, seed
    ):
        self.score_function = check_choice(
            "score_function", score_function, SCORE_FUNCTIONS
        )
        self.jitter = check_rate("jitter", jitter)
        self.noisy_gating = check_bool("noisy_gating", noisy_gating)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        if self.jitter > 0 or self.noisy_gating:
            self.seed_generator = keras.random.SeedGenerator(seed)

    def _build_scoring(self, hidden_dim):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(hidden_dim, self.num_experts),
            initializer=self.kernel_initializer,
        )
        if getattr(self, "router_bias", False):
            self.bias = self.add_weight(
                name="bias", shape=(self.num_experts,), initializer="zeros"
            )
        if self.noisy_gating:
            # Zero init (Shazeer et al.): the noise starts at softplus(0).
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(hidden_dim, self.num_experts),
                initializer="zeros",
            )

    def score(self, inputs, training=None):
        """Logits and scores of every expert for every token.

        Args:
            inputs: `[..., d]` tokens.
            training: bool, turns on jitter and gating noise.

        Returns:
            A `RouterScores`.
        """
        if training and self.jitter > 0:
            inputs = inputs * keras.random.uniform(
                ops.shape(inputs),
                minval=1.0 - self.jitter,
                maxval=1.0 + self.jitter,
                dtype=inputs.dtype,
                seed=self.seed_generator,
            )
        router_logits = ops.matmul(inputs, self.kernel)
        if getattr(self, "router_bias", False):
            router_logits = router_logits + ops.cast(self.bias, router_logits.dtype)
        if training and self.noisy_gating:
            noise_std = ops.softplus(ops.matmul(inputs, self.noise_kernel))
            router_logits = router_logits + noise_std * keras.random.normal(
                ops.shape(router_logits),
                dtype=router_logits.dtype,
                seed=self.seed_generator,
            )
        if self.score_function == "softmax":
            scores = ops.softmax(router_logits, axis=-1)
            router_probs = scores
        else:
            scores = ops.sigmoid(router_logits)
            router_probs = scores / ops.maximum(
                ops.sum(scores, axis=-1, keepdims=True), MIN_NORMALIZER
            )
        return RouterScores(router_logits, scores, router_probs)

    def _scoring_config(self):
        return {
            "score_function": self.score_function,
            "jitter": self.jitter,
            "noisy_gating": self.noisy_gating,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "seed": self.seed,
        }
