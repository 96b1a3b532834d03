"""Router statistics: what each MoE layer measures about its own routing.

Every MoE layer computes, in its `call` and from the routing it already did
(no second pass), a few numbers per step that show whether its router is
healthy: how evenly the routed choices spread over the experts, how many
were dropped by capacity, the balance losses, the router's entropy. They
are summed into a small accumulator that lives beside the layer's weights
(threaded through `jax.jit` like any other non-trainable state, but not a
weight: it is not saved, not counted by `count_params`, and not part of
`get_weights`), and a `RouterStatsMetric` tracked by the layer reads it, so
that `model.fit` logs the compact set and callbacks read the rest.

Per routed layer (`SparseMoE`, `SharedExpertMoE`, `HierarchicalMoE`):

| name | meaning |
|---|---|
| `aux_loss` | Switch load-balancing loss `E * sum_i f_i * P_i`, unweighted |
| `z_loss` | ST-MoE router z-loss `mean(logsumexp(logits) ** 2)` |
| `maxvio` | `(max_i f_i - mean f) / mean f` (Wang et al. 2024) |
| `load_cv` | coefficient of variation of `f`: `std(f) / mean(f)` |
| `router_entropy` | mean over tokens of `entropy(probs) / log E`, in [0, 1] |
| `dropped_fraction` | dropped choices / routed choices (expert choice: real tokens no expert took / real tokens) |
| `expert_load` | `f_i`, fraction of routed choices per expert (padding excluded) |
| `expert_importance` | `P_i`, mean router probability per expert over real tokens |

Per `SoftMoE` layer, which drops nothing and has no load to balance:
`dispatch_entropy` (per slot, entropy of its weights over the real tokens of
a sequence / log of their number), `combine_entropy` (per token, entropy of
its weights over slots / log of the number of slots), `dispatch_max_weight`,
`combine_max_weight` (the mean largest weight), and `expert_share` (per
expert, the mean share of a token's combine weight that goes to its slots).

Read as they stand, not accumulated: `expert_bias` (the balancing bias,
where `bias_update_rate > 0`) and SoftMoE's learned `scale`.

Steps are recorded in training calls only (`training=True`, as in
`model.fit`); `keras_moe.callbacks.router_stats` measures inference. Every
value is the mean over the steps recorded since the last reset of the
per-step value (MaxVio is a per-batch quantity, as in the paper). Keras
resets at the start of each epoch.

How the numbers flow: layer `call` -> accumulator (non-trainable state) ->
`RouterStatsMetric` (`layer.router_stats`, in `model.metrics`) -> the fit
logs (`moe_aux_loss`, `moe_maxvio`, `moe_dropped_fraction`: progress bar,
`History`, every callback) and `keras_moe.callbacks.collect_router_stats`
(every statistic of every layer) -> `keras_moe.callbacks.RouterStats`
(TensorBoard).
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops

# Keras keeps the scope helpers out of its public namespace; they are the
# only way to tell a symbolic trace, or a JAX step whose state lives outside
# the variables, from an eager call.
from keras.src.backend import get_stateless_scope
from keras.src.backend import in_stateless_scope
from keras.src.backend import in_symbolic_scope

ROUTED = "routed"
SOFT = "soft"

ROUTED_SCALARS = (
    "aux_loss",
    "z_loss",
    "maxvio",
    "load_cv",
    "router_entropy",
    "dropped_fraction",
)
ROUTED_VECTORS = ("expert_load", "expert_importance")
SOFT_SCALARS = (
    "dispatch_entropy",
    "combine_entropy",
    "dispatch_max_weight",
    "combine_max_weight",
)
SOFT_VECTORS = ("expert_share",)

# The compact set that `model.fit` logs: the mean over the model's routed
# MoE layers of these per-layer statistics.
COMPACT_STATS = {
    "moe_aux_loss": "aux_loss",
    "moe_maxvio": "maxvio",
    "moe_dropped_fraction": "dropped_fraction",
}

_LAYOUTS = {
    ROUTED: (ROUTED_SCALARS, ROUTED_VECTORS),
    SOFT: (SOFT_SCALARS, SOFT_VECTORS),
}

# `p * log(p)` is taken as 0 where a probability underflows to 0.
_TINY = 1e-30


class _KerasMath:
    """The few array operations the statistics use, through `keras.ops`.

    Compiled steps (XLA, `jax.jit`, `tf.function`) fuse them; what matters
    there is what is computed, not how it is dispatched.
    """

    @staticmethod
    def f32(x):
        x = ops.convert_to_tensor(x)
        if keras.backend.standardize_dtype(x.dtype) == "float32":
            return x
        return ops.cast(x, "float32")

    sum = staticmethod(ops.sum)
    mean = staticmethod(ops.mean)
    max = staticmethod(ops.max)
    log = staticmethod(ops.log)
    std = staticmethod(ops.std)
    logsumexp = staticmethod(ops.logsumexp)
    reshape = staticmethod(ops.reshape)
    expand_dims = staticmethod(ops.expand_dims)
    at_least = staticmethod(ops.maximum)
    stack = staticmethod(ops.stack)

    @staticmethod
    def concat(tensors):
        return ops.concatenate(tensors, axis=0)

    @staticmethod
    def one_like(x):
        return ops.ones((), "float32")

    @staticmethod
    def add_to(variable, value):
        variable.assign_add(value)


class _TorchMath:
    """The same operations as native PyTorch calls, for eager PyTorch.

    Every step runs them eagerly there, where a `keras.ops` call costs
    several times the small op it wraps; these keep the statistics' share
    of a training step small. Same arguments and results as `_KerasMath`.
    """

    @staticmethod
    def f32(x):
        import torch

        if not isinstance(x, torch.Tensor):
            x = ops.convert_to_tensor(x)
        return x if x.dtype == torch.float32 else x.float()

    @staticmethod
    def _reduce(function, x, axis=None, keepdims=False):
        if axis is None:
            return function(x)
        return function(x, dim=axis, keepdim=keepdims)

    @classmethod
    def sum(cls, x, axis=None, keepdims=False):
        import torch

        return cls._reduce(torch.sum, x, axis, keepdims)

    @classmethod
    def mean(cls, x, axis=None, keepdims=False):
        import torch

        return cls._reduce(torch.mean, x, axis, keepdims)

    @classmethod
    def max(cls, x, axis=None, keepdims=False):
        import torch

        return cls._reduce(torch.amax, x, axis, keepdims)

    @staticmethod
    def log(x):
        return x.log()

    @staticmethod
    def std(x):
        return x.std(correction=0)

    @staticmethod
    def logsumexp(x, axis, keepdims=False):
        import torch

        return torch.logsumexp(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)

    @staticmethod
    def expand_dims(x, axis):
        return x.unsqueeze(axis)

    @staticmethod
    def at_least(x, value):
        return x.clamp(min=value)

    @staticmethod
    def stack(tensors):
        import torch

        return torch.stack(tensors)

    @staticmethod
    def concat(tensors):
        import torch

        return torch.cat(tensors)

    @staticmethod
    def one_like(x):
        import torch

        return torch.ones((), dtype=torch.float32, device=x.device)

    @staticmethod
    def add_to(variable, value):
        import torch

        if in_stateless_scope():
            variable.assign_add(value)
            return
        # In place, as `Variable.assign` does on PyTorch, without the checks
        # and conversions around it.
        with torch.no_grad():
            variable.value.add_(value.detach())


def _math():
    if keras.backend.backend() == "torch":
        return _TorchMath
    return _KerasMath


def _token_mean(m, values, real, num_real):
    """Mean over real tokens (axis 0) of `values [T, ...]`; `real [T, 1]`."""
    if real is None:
        return m.mean(values, axis=0)
    return m.sum(values * real, axis=0) / num_real


def _entropy(m, probs, axis):
    return -m.sum(probs * m.log(m.at_least(probs, _TINY)), axis=axis)


def max_violation(expert_load):
    """MaxVio (Wang et al. 2024): `(max_i load_i - mean load) / mean load`.

    0 for perfectly balanced experts, `E - 1` when one expert gets
    everything. An all-zero load (nothing routed) gives 0.

    Args:
        expert_load: float `[E]`, counts or fractions per expert.

    Returns:
        A float32 scalar.

    Example:

    >>> float(max_violation([10.0, 10.0, 10.0, 10.0]))
    0.0
    >>> float(max_violation([25.0, 5.0, 5.0, 5.0]))
    1.5
    """
    load = ops.cast(ops.convert_to_tensor(expert_load), "float32")
    mean = ops.mean(load)
    return (ops.max(load) - mean) / ops.maximum(mean, _TINY)


def _load_statistics(m, expert_counts):
    """Load fractions, routed count, MaxVio and CV, counts summed over groups."""
    counts = m.f32(expert_counts)
    num_experts = counts.shape[-1]
    if len(counts.shape) > 1:
        counts = m.sum(m.reshape(counts, (-1, num_experts)), axis=0)
    routed = m.sum(counts)
    routed_at_least_1 = m.at_least(routed, 1.0)
    load = counts / routed_at_least_1
    # The mean load is 1/E whenever anything was routed; with nothing
    # routed the load is all zeros and so are MaxVio and the CV.
    maxvio = (num_experts * m.max(counts) - routed) / routed_at_least_1
    load_cv = num_experts * m.std(load)
    return load, routed, maxvio, load_cv


def _router_statistics(m, router_probs, router_logits, expert_counts, token_mask):
    num_experts = router_probs.shape[-1]
    probs = m.reshape(m.f32(router_probs), (-1, num_experts))
    logits = m.reshape(m.f32(router_logits), (-1, num_experts))
    if token_mask is None:
        real = num_real = None
    else:
        real = m.reshape(m.f32(token_mask), (-1, 1))
        num_real = m.at_least(m.sum(real), 1.0)
    load, routed, maxvio, load_cv = _load_statistics(m, expert_counts)
    importance = _token_mean(m, probs, real, num_real)
    log_z = m.logsumexp(logits, axis=-1, keepdims=True)
    log_z_squared = log_z * log_z
    p_log_p = probs * m.log(m.at_least(probs, _TINY))
    if real is None:
        z_loss = m.mean(log_z_squared)
        mean_entropy = -m.mean(p_log_p) * num_experts
    else:
        z_loss = m.sum(log_z_squared * real) / num_real
        mean_entropy = -m.sum(p_log_p * real) / num_real
    if num_experts > 1:
        router_entropy = mean_entropy / math.log(num_experts)
    else:
        router_entropy = mean_entropy * 0.0
    stats = {
        "aux_loss": num_experts * m.sum(load * importance),
        "z_loss": z_loss,
        "maxvio": maxvio,
        "load_cv": load_cv,
        "router_entropy": router_entropy,
        "expert_load": load,
        "expert_importance": importance,
    }
    return stats, routed, real, num_real


def token_choice_stats(
    router_probs, router_logits, expert_counts, num_kept, token_mask=None
):
    """Router statistics of one token-choice routing step.

    Args:
        router_probs: float `[..., T, E]`, each token's distribution over
            experts (`RouterOutput.router_probs`).
        router_logits: float `[..., T, E]`.
        expert_counts: int `[..., E]`, choices routed to each expert before
            capacity, padding excluded (`DispatchPlan.expert_counts`).
        num_kept: int scalar, the choices that got a slot
            (`DispatchPlan.num_kept`).
        token_mask: optional bool `[..., T]`, False for padding.

    Returns:
        A dict of float32 tensors: the scalars of `ROUTED_SCALARS` and the
        `[E]` vectors of `ROUTED_VECTORS`. (The layers record them without
        gradients.)

    Example:

    Four tokens, top-1 over two experts; expert 0 has room for one token.

    >>> import numpy as np
    >>> probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    >>> stats = token_choice_stats(
    ...     probs, np.log(probs), expert_counts=[3, 1], num_kept=2)
    >>> [round(float(stats[name]), 3)
    ...  for name in ("maxvio", "dropped_fraction", "aux_loss")]
    [0.5, 0.5, 1.15]
    """
    m = _math()
    stats, routed, _, _ = _router_statistics(
        m, router_probs, router_logits, expert_counts, token_mask
    )
    kept = m.f32(num_kept)
    stats["dropped_fraction"] = (routed - kept) / m.at_least(routed, 1.0)
    return stats


def expert_choice_stats(
    router_probs, router_logits, slot_tokens, slot_filled, token_mask=None
):
    """Router statistics of one expert-choice routing step.

    Each expert fills its slots with its favourite tokens, so the load is
    balanced by construction (MaxVio 0) unless padding leaves an expert
    short of real tokens. Nothing is dropped by capacity; instead
    `dropped_fraction` is the fraction of real tokens that no expert took,
    which get no expert output either.

    Args:
        router_probs: float `[G, T, E]`.
        router_logits: float `[G, T, E]`.
        slot_tokens: int `[G, E, C]`, the token in each slot.
        slot_filled: bool `[G, E, C]`, whether a slot holds a real token.
        token_mask: optional bool `[G, T]`, False for padding.

    Returns:
        A dict of float32 tensors, as `token_choice_stats`.

    Example:

    >>> import numpy as np
    >>> probs = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])
    >>> slot_tokens = np.array([[[0, 1], [2, 1]]])
    >>> stats = expert_choice_stats(
    ...     probs, np.log(probs), slot_tokens, np.ones((1, 2, 2), bool))
    >>> float(stats["maxvio"]), float(stats["dropped_fraction"])
    (0.0, 0.0)
    """
    m = _math()
    filled = ops.cast(slot_filled, "float32")
    stats, _, real, num_real = _router_statistics(
        m, router_probs, router_logits, m.sum(filled, axis=-1), token_mask
    )
    num_groups = ops.shape(slot_tokens)[0]
    num_tokens = ops.shape(router_probs)[1]
    offsets = ops.reshape(
        ops.arange(num_groups, dtype="int32") * num_tokens, (-1, 1, 1)
    )
    times_taken = ops.segment_sum(
        ops.reshape(filled, (-1,)),
        ops.reshape(ops.cast(slot_tokens, "int32") + offsets, (-1,)),
        num_segments=num_groups * num_tokens,
    )
    untaken = m.f32(times_taken == 0)
    if real is None:
        stats["dropped_fraction"] = m.mean(untaken)
    else:
        stats["dropped_fraction"] = m.sum(untaken * real[:, 0]) / num_real
    return stats


def soft_routing_stats(dispatch_weights, combine_weights, num_experts, token_mask=None):
    """Statistics of a `SoftMoE` layer's dispatch and combine weights.

    Args:
        dispatch_weights: float `[B, T, N]`, softmax over tokens per slot.
        combine_weights: float `[B, T, N]`, softmax over slots per token.
        num_experts: int, `E`; the `N` slots are `E` consecutive groups.
        token_mask: optional bool `[B, T]`, False for padding.

    Returns:
        A dict of float32 tensors: the scalars of `SOFT_SCALARS` and
        `expert_share` `[E]`.

    Example:

    Uniform weights: maximal entropy, every expert an equal share.

    >>> import numpy as np
    >>> dispatch = np.full((1, 4, 2), 0.25)
    >>> combine = np.full((1, 4, 2), 0.5)
    >>> stats = soft_routing_stats(dispatch, combine, num_experts=2)
    >>> [round(float(stats[name]), 3) for name in
    ...  ("dispatch_entropy", "combine_entropy", "dispatch_max_weight")]
    [1.0, 1.0, 0.25]
    >>> np.round(np.asarray(stats["expert_share"]), 3).tolist()
    [0.5, 0.5]
    """
    m = _math()
    dispatch = m.f32(dispatch_weights)
    combine = m.f32(combine_weights)
    num_slots = dispatch.shape[-1]
    if token_mask is None:
        real = m.f32(ops.ones(ops.shape(dispatch)[:2]))
    else:
        real = m.f32(token_mask)
    real_per_sequence = m.sum(real, axis=1)  # [B]
    num_real = m.at_least(m.sum(real), 1.0)

    # Per slot: how spread its mix of tokens is. A sequence with fewer than
    # two real tokens has nothing to spread over and is left out.
    spread = m.f32(real_per_sequence >= 2)
    dispatch_entropy = _entropy(m, dispatch, axis=1) / m.expand_dims(
        m.log(m.at_least(real_per_sequence, 2.0)), -1
    )
    num_spread_slots = m.at_least(m.sum(spread) * num_slots, 1.0)
    has_tokens = m.f32(real_per_sequence >= 1)
    num_slots_with_tokens = m.at_least(m.sum(has_tokens) * num_slots, 1.0)
    dispatch_max = m.max(dispatch, axis=1)  # [B, N]

    token_share = m.sum(
        m.reshape(combine, (-1, num_experts, num_slots // num_experts)), axis=-1
    )  # [B * T, E]
    flat_real = m.reshape(real, (-1, 1))
    if num_slots > 1:
        combine_entropy = _entropy(m, combine, axis=-1) / math.log(num_slots)
        combine_entropy = m.sum(combine_entropy * real) / num_real
    else:
        combine_entropy = m.sum(real) * 0.0
    return {
        "dispatch_entropy": m.sum(dispatch_entropy * m.expand_dims(spread, -1))
        / num_spread_slots,
        "combine_entropy": combine_entropy,
        "dispatch_max_weight": m.sum(dispatch_max * m.expand_dims(has_tokens, -1))
        / num_slots_with_tokens,
        "combine_max_weight": m.sum(m.max(combine, axis=-1) * real) / num_real,
        "expert_share": m.sum(token_share * flat_real, axis=0) / num_real,
    }


def _no_gradient():
    """A scope in which PyTorch records no autograd graph (the statistics need
    none); the compiled backends only differentiate what reaches the loss."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


class _Accumulators:
    """Plain holder of a layer's statistics variables.

    Not a Keras object on purpose: the layer tracker would make the
    variables weights, a metric's tracker would make them metric variables.
    The layer lists them in its `variables` instead (see
    `RouterStatsMetric.state_variables`).
    """

    current = None  # float32 [1 + scalars + vectors * E]: count, then sums.
    last = None  # The same for the last completed period (before a reset).
    readouts = None  # Layer variables read as they are (bias, scale).
    path = None


class _StatsGroup:
    """The statistics of the MoE layers called in one forward pass."""

    def __init__(self):
        self.members = []

    def add(self, metric):
        if not any(member is metric for member in self.members):
            self.members.append(metric)

    @property
    def routed_members(self):
        return [member for member in self.members if member.kind == ROUTED]


@keras.saving.register_keras_serializable(package="keras_moe")
class RouterStatsMetric(keras.metrics.Metric):
    """A MoE layer's router statistics, as a Keras metric.

    The MoE layers create one (`layer.router_stats`) when built with
    `track_router_stats=True`, the default. Keras collects it into
    `model.metrics`, so `model.fit` logs, in the progress bar and in
    `History`, the compact set `moe_aux_loss`, `moe_maxvio` and
    `moe_dropped_fraction`: the means over the model's routed MoE layers (one
    metric of the model reports them for all). `values()` returns every
    statistic of the layer (see the module docstring for their meaning).

    Statistics are recorded in training calls only, so `evaluate()` logs
    and returns what it did before. Keras resets metrics at the start of
    every epoch and of every `evaluate()`; a reset keeps the statistics of
    the finished period, which `values()` returns until the next step is
    recorded, so a callback's `on_epoch_end` sees the training epoch even
    after validation.

    Under JAX, `model.fit` keeps the training state outside the variables
    between synchronisations (at the end of each epoch, or when
    `keras_moe.callbacks.collect_router_stats` or the `RouterStats` callback
    reads the statistics), and a compiled step cannot read them: the epoch's
    logs and `History` hold the exact values, while during an epoch the
    progress bar shows the values of the last synchronisation (zeros before
    the first). On TensorFlow and PyTorch every step's logs are exact.

    Args:
        kind: `"routed"` (token or expert choice) or `"soft"` (`SoftMoE`).
        name: the metric's name.

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> moe = SparseMoE(num_experts=4, intermediate_dim=16, top_k=1)
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8)).astype("float32")
    >>> _ = moe(x, training=True)
    >>> stats = moe.router_stats.values()
    >>> stats["steps"], round(float(np.sum(stats["expert_load"])), 6)
    (1, 1.0)
    >>> sorted(moe.router_stats.result())
    ['moe_aux_loss', 'moe_dropped_fraction', 'moe_maxvio']
    """

    def __init__(self, kind, name="router_stats", **kwargs):
        super().__init__(name=name, dtype="float32", **kwargs)
        if kind not in _LAYOUTS:
            raise ValueError(
                f"`kind` must be one of {', '.join(map(repr, _LAYOUTS))}. "
                f"Received: kind={kind!r}"
            )
        self.kind = kind
        self.scalar_names, self.vector_names = _LAYOUTS[kind]
        self.num_experts = None
        self._state = _Accumulators()
        self._group = None
        # Whether the latest call was a training call: the compact set is
        # reported by training steps only, so that `evaluate()` keeps its
        # return value. Traced steps read it when traced.
        self._training_call = True
        # Set by `keras_moe.callbacks.router_stats` to measure inference.
        self.record_inference = False
        # The compact set as of the last time the statistics could be read
        # (a JAX step cannot read them: they travel in its state).
        self._compact_snapshot = self.add_variable(
            shape=(len(COMPACT_STATS),),
            initializer="zeros",
            name="compact_snapshot",
        )

    def get_config(self):
        return {"kind": self.kind, "name": self.name}

    # State -----------------------------------------------------------------

    @property
    def built_state(self):
        return self._state.current is not None

    @property
    def state_variables(self):
        """The accumulators, for the owning layer's `variables`."""
        if self._state.current is None:
            return []
        return [self._state.current, self._state.last]

    @property
    def path(self):
        """The owning layer's path (`block_0/moe`): the key of its stats."""
        return self._state.path

    def build_state(self, layer, num_experts, readouts=None):
        """Create the accumulators; the owning layer calls it in `build`.

        Args:
            layer: the owning MoE layer (their paths start with its name).
            num_experts: int, `E`.
            readouts: optional dict of name -> variable of the layer reported
                as they stand (the balancing bias, SoftMoE's scale).
        """
        self.num_experts = int(num_experts)
        size = 1 + len(self.scalar_names) + len(self.vector_names) * num_experts
        with keras.name_scope(layer.name, caller=layer):
            self._state.current = keras.Variable(
                initializer="zeros",
                shape=(size,),
                dtype="float32",
                trainable=False,
                autocast=False,
                aggregation="sum",
                name="router_stats",
            )
            self._state.last = keras.Variable(
                initializer="zeros",
                shape=(size,),
                dtype="float32",
                trainable=False,
                autocast=False,
                aggregation="sum",
                name="router_stats_last",
            )
        self._state.path = self._state.current.path.rsplit("/", 1)[0]
        self._state.readouts = dict(readouts or {})

    # Recording -------------------------------------------------------------

    def observe(self, layer, training, compute_stats):
        """Record one call's statistics; the owning layer calls it.

        Args:
            layer: the owning layer (for the forward pass it belongs to).
            training: the call's `training` argument.
            compute_stats: a function returning the dict of this step's
                statistics; only called when they are recorded.
        """
        if not self.built_state or in_symbolic_scope():
            return
        self._training_call = bool(training)
        self._join_forward_pass(layer)
        if training or self.record_inference:
            with _no_gradient():
                self.update_state(compute_stats())

    def _join_forward_pass(self, layer):
        # The layers called in one forward pass form the group whose compact
        # set one metric reports. What they share: the stateless scope of a
        # JAX step (`stateless_call` runs `call`, not `__call__`), or else
        # the call context Keras opens for the outermost `__call__` (the
        # model's).
        if in_stateless_scope():
            forward_pass = get_stateless_scope()
        else:
            try:
                forward_pass = layer._get_call_context()
            except AttributeError:
                forward_pass = None
        group = getattr(forward_pass, "_keras_moe_router_stats", None)
        if group is None:
            group = _StatsGroup()
            if forward_pass is not None:
                forward_pass._keras_moe_router_stats = group
        group.add(self)
        self._group = group

    def update_state(self, stats):
        """Add one step's statistics (a dict as `token_choice_stats` returns)."""
        m = _math()
        first = stats[self.scalar_names[0]]
        scalars = [m.one_like(first)]
        scalars.extend(m.f32(stats[name]) for name in self.scalar_names)
        values = [m.stack(scalars)]
        values.extend(
            m.reshape(m.f32(stats[name]), (-1,)) for name in self.vector_names
        )
        m.add_to(self._state.current, m.concat(values))

    def reset_state(self):
        # Keep the finished period for `values()`; a second reset in a row
        # (Keras may list a nested layer's metric twice) changes nothing.
        if not self.built_state:
            return
        # Keras resets eagerly, between steps: NumPy keeps it to two copies.
        current = ops.convert_to_numpy(self._state.current)
        if current[0] > 0:
            self._state.last.assign(current)
            self._state.current.assign(np.zeros_like(current))
        self._training_call = True

    # Reading ---------------------------------------------------------------

    def _readable(self):
        """Whether the accumulators hold their values here (not in a JAX step)."""
        variable = self._state.current
        if in_stateless_scope():
            if get_stateless_scope().get_current_value(variable) is not None:
                return True
        return keras.backend.backend() != "jax" or variable._value is not None

    def _compact_values(self, members):
        """The compact set `[len(COMPACT_STATS)]`: means over `members`."""
        m = _math()
        indices = [1 + ROUTED_SCALARS.index(s) for s in COMPACT_STATS.values()]
        means = []
        for member in members:
            current = member._state.current.value
            count = m.at_least(current[0], 1.0)
            means.append(m.stack([current[i] for i in indices]) / count)
        return m.mean(m.stack(means), axis=0)

    def result(self):
        group = self._group
        if (
            group is None
            or not self._training_call
            or not group.routed_members
            or group.routed_members[0] is not self
        ):
            return {}
        members = group.routed_members
        if keras.backend.backend() != "jax":
            compact = self._compact_values(members)
        elif all(member._readable() for member in members) and not (
            in_stateless_scope()
        ):
            # An eager read between JAX steps (the end of an epoch): NumPy,
            # and a snapshot for the steps to report until the next one.
            indices = [1 + ROUTED_SCALARS.index(s) for s in COMPACT_STATS.values()]
            compact = np.mean(
                [
                    raw[indices] / max(raw[0], 1.0)
                    for raw in (m.raw_values(current_only=True) for m in members)
                ],
                axis=0,
            ).astype("float32")
            self._compact_snapshot.assign(compact)
            return {name: float(compact[i]) for i, name in enumerate(COMPACT_STATS)}
        elif all(member._readable() for member in members):
            compact = self._compact_values(members)
        else:
            compact = self._compact_snapshot.value
        return {name: compact[i] for i, name in enumerate(COMPACT_STATS)}

    def raw_values(self, current_only=False):
        """The accumulator as numpy: `[count, scalar sums..., vector sums...]`.

        The current period's, or (unless `current_only`) the last completed
        one's when nothing was recorded since the last reset.
        """
        current = ops.convert_to_numpy(self._state.current)
        if current[0] > 0 or current_only:
            return current
        return ops.convert_to_numpy(self._state.last)

    def values(self):
        """Every statistic of the layer, as Python floats and numpy arrays.

        Reads the variables: while a JAX `fit` runs, use
        `keras_moe.callbacks.collect_router_stats(model)`, which first
        brings the training state back into them.

        Returns:
            A dict: `steps` (the number of recorded steps), the scalar
            statistics, the per-expert vectors (`[E]` numpy arrays) and the
            read-outs (`expert_bias` `[E]` where bias balancing is on,
            `scale` for SoftMoE). Empty before the layer is built.
        """
        if not self.built_state:
            return {}
        return self.values_from(self.raw_values())

    def values_from(self, raw):
        """`values()` of an accumulator given as numpy (see `raw_values`)."""
        raw = np.asarray(raw, np.float64)
        count = max(raw[0], 1.0)
        num_scalars = len(self.scalar_names)
        values = {"steps": int(raw[0])}
        for i, name in enumerate(self.scalar_names):
            values[name] = float(raw[1 + i] / count)
        vectors = raw[1 + num_scalars :].reshape(len(self.vector_names), -1)
        for i, name in enumerate(self.vector_names):
            values[name] = vectors[i] / count
        for name, variable in self._state.readouts.items():
            value = ops.convert_to_numpy(variable)
            values[name] = float(value) if value.ndim == 0 else value
        return values
