"""`RouterStatsMetric`: a MoE layer's router statistics as a Keras metric.

The layer computes its statistics in `call` (`keras_moe.ops.router_stats`)
and hands them to its metric, which sums them into a small accumulator that
lives beside the layer's weights (threaded through `jax.jit` like any other
non-trainable state, but not a weight: it is not saved, not counted by
`count_params`, and not part of `get_weights`). `model.fit` logs the
compact set the metric reports; `keras_moe.callbacks` reads the rest.
"""

import keras
import numpy as np
from keras import ops

from keras_moe import backend
from keras_moe.ops.router_stats import COMPACT_STATS
from keras_moe.ops.router_stats import ROUTED
from keras_moe.ops.router_stats import ROUTED_SCALARS
from keras_moe.ops.router_stats import ROUTED_VECTORS
from keras_moe.ops.router_stats import SOFT
from keras_moe.ops.router_stats import SOFT_SCALARS
from keras_moe.ops.router_stats import SOFT_VECTORS

_LAYOUTS = {
    ROUTED: (ROUTED_SCALARS, ROUTED_VECTORS),
    SOFT: (SOFT_SCALARS, SOFT_VECTORS),
}

# Where each statistic of the compact set sits in a routed accumulator
# (after the step count).
_COMPACT_INDICES = [1 + ROUTED_SCALARS.index(s) for s in COMPACT_STATS.values()]


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
    statistic of the layer (see `keras_moe.ops.router_stats` for their
    meaning).

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
        # Counts the resets that closed a period, so that a reader holding
        # an earlier copy of the sums can tell they no longer apply.
        self._period = 0
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
        if not self.built_state or backend.in_symbolic_scope():
            return
        self._training_call = bool(training)
        self._join_forward_pass(layer)
        if training or self.record_inference:
            with backend.no_gradient():
                self.update_state(compute_stats())

    def _join_forward_pass(self, layer):
        # The layers called in one forward pass form the group whose compact
        # set one metric reports.
        group = backend.forward_pass_value(layer, "router_stats", _StatsGroup)
        group.add(self)
        self._group = group

    def update_state(self, stats):
        """Add one step's statistics (a dict as `token_choice_stats` returns)."""
        m = backend.array_math()
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
            self._period += 1
        self._training_call = True

    @property
    def period(self):
        """The number of recording periods closed by a reset so far.

        The sums of `raw_values(current_only=True)` only grow within one
        period; a reader that compares two reads (to get the steps between
        them) must check that the period did not change in between: the
        step count alone cannot tell (3 steps then a reset and 4 more steps
        look like 7 steps of one period).
        """
        return self._period

    # Reading ---------------------------------------------------------------

    def _readable(self):
        """Whether the accumulators hold their values here (not in a JAX step)."""
        return backend.holds_value(self._state.current)

    def _compact_values(self, members):
        """The compact set `[len(COMPACT_STATS)]`: means over `members`."""
        m = backend.array_math()
        means = []
        for member in members:
            current = member._state.current.value
            count = m.at_least(current[0], 1.0)
            means.append(m.stack([current[i] for i in _COMPACT_INDICES]) / count)
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
            backend.in_stateless_scope()
        ):
            # An eager read between JAX steps (the end of an epoch): NumPy,
            # and a snapshot for the steps to report until the next one.
            compact = np.mean(
                [
                    raw[_COMPACT_INDICES] / max(raw[0], 1.0)
                    for raw in (
                        member.raw_values(current_only=True) for member in members
                    )
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
