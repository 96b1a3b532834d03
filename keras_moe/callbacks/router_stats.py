"""Read the MoE layers' router statistics: as dicts, as a table, in TensorBoard."""

import numbers
import os
import tempfile
import warnings

import keras
import numpy as np

from keras_moe import backend
from keras_moe.callbacks.heatmap import render_load_heatmap
from keras_moe.metrics import RouterStatsMetric
from keras_moe.ops.router_stats import ROUTED
from keras_moe.ops.router_stats import SOFT

UPDATE_FREQS = ("epoch", "batch")

# The per-expert vector each kind of layer shows in the heatmap.
_HEATMAP_VECTOR = {ROUTED: "expert_load", SOFT: "expert_share"}


def _check_model(model, name="model"):
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"`{name}` must be a Keras model or layer. "
            f"Received: {name}={model!r}"
        )


def router_stats_metrics(model):
    """The `RouterStatsMetric` of every MoE layer in `model`, in layer order.

    Layers built with `track_router_stats=False` have none and are left out.

    Args:
        model: a Keras model or layer.

    Returns:
        A list of `RouterStatsMetric`.

    Example:

    >>> import keras
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8))
    >>> model = keras.Model(inputs, SparseMoE(4, 16, name="moe")(inputs))
    >>> [metric.path for metric in router_stats_metrics(model)]
    ['moe']
    """
    _check_model(model)
    metrics = []
    for layer in backend.all_layers(model):
        metric = getattr(layer, "router_stats", None)
        if isinstance(metric, RouterStatsMetric) and not any(
            metric is seen for seen in metrics
        ):
            metrics.append(metric)
    return metrics


def _sync_state(model, metrics=()):
    # A JAX `fit` keeps the training state outside the variables between
    # synchronisations; reading the statistics mid-epoch needs one. The
    # metrics' `result()` then refreshes the compact set the progress bar
    # shows until the next one.
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()
        for metric in metrics:
            metric.result()


def _keyed_by_path(metrics):
    keyed = {}
    for metric in metrics:
        key, suffix = metric.path, 2
        while key in keyed:
            key, suffix = f"{metric.path}#{suffix}", suffix + 1
        keyed[key] = metric
    return keyed


def collect_router_stats(model):
    """Every MoE layer's router statistics, keyed by layer path.

    Each value is the mean over the training steps recorded since the last
    reset (Keras resets at the start of each epoch; after a reset, the
    finished epoch's values are returned until the next step). Safe to call
    from a callback at any time, on every backend.

    Args:
        model: a Keras model or layer holding MoE layers.

    Returns:
        A dict `{layer_path: {statistic: value}}`: Python floats for the
        scalar statistics and `steps`, `[E]` numpy arrays for the per-expert
        ones (see `keras_moe.ops.router_stats` for the names). Layers not
        built yet are left out.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8))
    >>> model = keras.Model(inputs, SparseMoE(4, 16, name="moe")(inputs))
    >>> x = np.random.default_rng(0).normal(size=(3, 4, 8)).astype("float32")
    >>> _ = model(x, training=True)
    >>> stats = collect_router_stats(model)
    >>> list(stats), stats["moe"]["steps"], 0 <= stats["moe"]["maxvio"] <= 3
    (['moe'], 1, True)
    """
    metrics = [m for m in router_stats_metrics(model) if m.built_state]
    if metrics:
        _sync_state(model, metrics)
    return {path: metric.values() for path, metric in _keyed_by_path(metrics).items()}


def router_stats(model, data, steps=None, batch_size=None):
    """Run `model` over `data` and return its router statistics as a table.

    For notebooks: the routing the model does at inference (evaluation
    capacity factor, no noise), measured over all of `data`, one row per MoE
    layer. The statistics recorded during training are left as they were.
    `pandas.DataFrame(rows)` makes a data frame of it, and
    `render_load_heatmap([row["expert_load"] for row in rows])` a picture.

    Args:
        model: a Keras model holding MoE layers.
        data: inputs as `model.predict` takes them (arrays, a `tf.data`
            dataset, a generator or `PyDataset`; targets are ignored).
        steps: optional int, the number of batches to run.
        batch_size: optional int, for array inputs (Keras' default is 32).

    Returns:
        A list of dicts, one per MoE layer in layer order: `layer` (its
        path), `kind` (`"routed"` or `"soft"`), `num_experts`, and its
        statistics as `collect_router_stats` returns them.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8))
    >>> model = keras.Model(
    ...     inputs, SparseMoE(4, 16, routing="expert_choice", name="moe")(inputs))
    >>> x = np.random.default_rng(0).normal(size=(16, 4, 8)).astype("float32")
    >>> rows = router_stats(model, x, batch_size=8)
    >>> rows[0]["layer"], rows[0]["steps"], rows[0]["maxvio"]
    ('moe', 2, 0.0)
    """
    _check_model(model)
    if not hasattr(model, "predict"):
        raise ValueError(
            "`model` must be a Keras model (with `predict`). "
            f"Received: model={model!r}"
        )
    metrics = router_stats_metrics(model)
    if not metrics:
        warnings.warn(
            f"`router_stats`: the model {model.name!r} has no MoE layer "
            "recording router statistics (layers built with "
            "`track_router_stats=False` record none).",
            stacklevel=2,
        )
        return []
    saved = {}
    for metric in metrics:
        if metric.built_state:
            saved[id(metric)] = [
                keras.ops.convert_to_numpy(v) for v in metric.state_variables
            ]
            for variable in metric.state_variables:
                variable.assign(np.zeros(variable.shape, "float32"))
        metric.record_inference = True
    try:
        # The flag is read when the step is traced: retrace with it on.
        model.make_predict_function(force=True)
        model.predict(data, steps=steps, batch_size=batch_size, verbose=0)
        _sync_state(model)
        rows = []
        for path, metric in _keyed_by_path(metrics).items():
            row = {"layer": path, "kind": metric.kind, "num_experts": metric.num_experts}
            row.update(metric.values())
            rows.append(row)
    finally:
        for metric in metrics:
            metric.record_inference = False
            for variable, value in zip(metric.state_variables, saved.get(id(metric), ())):
                variable.assign(value)
        model.make_predict_function(force=True)
    return rows


def _check_update_freq(update_freq):
    if isinstance(update_freq, str) and update_freq in UPDATE_FREQS:
        return update_freq
    is_int = isinstance(update_freq, numbers.Integral) and not isinstance(
        update_freq, bool
    )
    if is_int and update_freq >= 1:
        return int(update_freq)
    raise ValueError(
        "`update_freq` must be 'epoch', 'batch' or a positive integer (a "
        f"number of batches). Received: update_freq={update_freq!r}"
    )


def _check_writable(directory):
    """Create `directory` and check that a file can be written in it."""
    if "://" in directory:
        return  # A remote file system (gs://, s3://): TensorFlow writes it.
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ValueError(
            "`log_dir` must be a directory that can be created and written "
            f"to; {directory!r} cannot: {error}"
        ) from error


def _histogram_summary(tag, values, step, description):
    """A TensorBoard histogram with one bucket per expert (height = value)."""
    import tensorflow as tf
    from tensorboard.plugins.histogram import metadata as histogram_metadata

    values = np.asarray(values, np.float64).reshape(-1)
    experts = np.arange(values.size, dtype=np.float64)
    buckets = np.stack([experts - 0.5, experts + 0.5, values], axis=-1)
    tf.summary.write(
        tag=tag,
        tensor=tf.constant(buckets, tf.float64),
        step=step,
        metadata=histogram_metadata.create_summary_metadata(
            display_name=tag, description=description
        ),
    )


class RouterStats(keras.callbacks.Callback):
    """Write every MoE layer's router statistics to TensorBoard.

    Beside Keras' own `keras.callbacks.TensorBoard` (which writes the
    `train` and `validation` runs of `log_dir`), this callback writes the
    `router` run, `log_dir/router`, with, for each MoE layer:
    - scalars `router/<layer>/<statistic>`: `aux_loss`, `z_loss`, `maxvio`,
      `load_cv`, `router_entropy`, `dropped_fraction` (SoftMoE:
      `dispatch_entropy`, `combine_entropy`, `dispatch_max_weight`,
      `combine_max_weight` and `scale`);
    - histograms over the expert index `router/<layer>/expert_load` and
      `router/<layer>/expert_importance` (SoftMoE: `expert_share`), and
      `router/<layer>/expert_bias` where bias balancing is on;
    and one image, `router/expert_load_heatmap`: layers x experts, each
    expert's load relative to an even split, with a colour scale, so that a
    router collapsing onto a few experts shows at a glance.

    Values are means over the training steps since the last write or the
    start of the epoch, whichever is later (with an integer `update_freq`
    that does not divide the steps per epoch, a write early in an epoch
    covers the steps of that epoch only), or over the epoch (`"epoch"`); the
    step axis counts epochs, or batches from the start of training. Works on every
    backend (the summaries are written by TensorFlow's writer).

    Args:
        log_dir: the TensorBoard log directory (the one given to
            `keras.callbacks.TensorBoard`, if any).
        update_freq: `"epoch"` (the default), `"batch"`, or a positive int:
            write every that many batches.
        run_name: the run (subdirectory of `log_dir`) written. Defaults to
            `"router"`.

    Example:

    >>> import tempfile
    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8))
    >>> model = keras.Model(inputs, SparseMoE(4, 16, name="moe")(inputs))
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x = np.random.default_rng(0).normal(size=(16, 4, 8)).astype("float32")
    >>> log_dir = tempfile.mkdtemp()
    >>> history = model.fit(
    ...     x, x, epochs=1, verbose=0, callbacks=[RouterStats(log_dir)])
    >>> sorted(name for name in history.history if name.startswith("moe_"))
    ['moe_aux_loss', 'moe_dropped_fraction', 'moe_maxvio']
    >>> import os; os.listdir(log_dir)
    ['router']
    """

    def __init__(self, log_dir, update_freq="epoch", run_name="router"):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
            raise ValueError(
                "`log_dir` must be a non-empty path. "
                f"Received: log_dir={log_dir!r}"
            )
        if not isinstance(run_name, str) or not run_name:
            raise ValueError(
                "`run_name` must be a non-empty string. "
                f"Received: run_name={run_name!r}"
            )
        self.log_dir = os.fspath(log_dir)
        self.update_freq = _check_update_freq(update_freq)
        self.run_name = run_name
        self.run_dir = os.path.join(self.log_dir, run_name)
        _check_writable(self.run_dir)
        self._writer = None
        self._metrics = []
        self._batches_seen = 0
        self._previous = {}

    def set_model(self, model):
        super().set_model(model)
        self._metrics = router_stats_metrics(model)
        if not self._metrics:
            warnings.warn(
                f"`RouterStats`: the model {model.name!r} has no MoE layer "
                "recording router statistics, so nothing will be written to "
                f"{self.run_dir!r}. (MoE layers built with "
                "`track_router_stats=False` record none.)",
                stacklevel=2,
            )

    def _get_writer(self):
        if self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.run_dir)
        return self._writer

    def on_train_begin(self, logs=None):
        self._batches_seen = 0
        self._previous = {}

    def on_train_batch_end(self, batch, logs=None):
        self._batches_seen += 1
        if self.update_freq == "epoch" or not self._metrics:
            return
        every = 1 if self.update_freq == "batch" else self.update_freq
        if self._batches_seen % every == 0:
            self._write(self._batches_seen, since_last_write=True)

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch" and self._metrics:
            self._write(epoch, since_last_write=False)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def _layer_values(self, metric, since_last_write):
        raw = metric.raw_values()
        previous_period, previous = self._previous.get(id(metric), (None, None))
        self._previous[id(metric)] = (metric.period, raw)
        if (
            since_last_write
            and previous is not None
            and previous_period == metric.period
            and previous.shape == raw.shape
            and raw[0] > previous[0]
        ):
            # The accumulators hold sums since the last reset (the start of
            # the epoch): within one period, the steps since the last write
            # are the difference. After a reset the sums restart, and the
            # previous write's sums belong to a finished period.
            raw = raw - previous
        return metric.values_from(raw)

    def _write(self, step, since_last_write):
        import tensorflow as tf

        metrics = [metric for metric in self._metrics if metric.built_state]
        if not metrics:
            return
        _sync_state(self.model, metrics)
        rows, labels = [], []
        with self._get_writer().as_default(step=step):
            for path, metric in _keyed_by_path(metrics).items():
                values = self._layer_values(metric, since_last_write)
                for name, value in values.items():
                    tag = f"router/{path}/{name}"
                    if name == "steps":
                        continue
                    if np.ndim(value) == 0:
                        tf.summary.scalar(tag, float(value))
                    else:
                        _histogram_summary(
                            tag, value, step, f"`{name}` of each expert of {path}."
                        )
                rows.append(values[_HEATMAP_VECTOR[metric.kind]])
                labels.append(path)
            legend = "  \n".join(
                f"row {i}: `{label}`" for i, label in enumerate(labels)
            )
            tf.summary.image(
                "router/expert_load_heatmap",
                render_load_heatmap(rows)[None],
                description=(
                    "Expert load relative to an even split (1 = balanced), "
                    "one row per MoE layer (SoftMoE: each expert's share of "
                    "the combine weights).  \n" + legend
                ),
            )
        self._writer.flush()
