"""`SavedCompileConfig`: a keras-hub task that `load_model` compiles as saved.

`keras.Model.compile_from_config` skips models with their own `compile()`
(keras-hub tasks, with a warning), which leaves a loaded model with
keras-hub's default optimizer and sampler. Tasks that mix this class in
save their `sampler` with the compile arguments and restore the saved
optimizer (its state included), loss, metrics and sampler.
"""

import weakref
from collections.abc import Mapping

import keras
import keras_hub


def _build_optimizer_before_loading_its_state(model):
    """Create the optimizer's variables just before `load_model` loads them.

    Keras builds a loaded model's optimizer in `compile_from_config`, before
    the weights load; but some layers only reach their saved state while
    loading (a quantized `Experts` layer comes back float and quantizes
    from the file), so the trainable variables would not yet be those of
    the saved model. Keras loads the optimizer after every layer: building
    it then, on the model's trainable variables, gives the saved number of
    variables in the saved order. Outside `load_model`, `fit()` builds it
    as usual.
    """
    optimizer = model.optimizer
    if optimizer is None or optimizer.built:
        return
    model_ref = weakref.ref(model)
    load_state = type(optimizer).load_own_variables

    def load_own_variables(store):
        del optimizer.load_own_variables  # back to the class's method
        restored = model_ref()
        # An optimizer saved before it was built (compiled, never trained)
        # holds only its iteration count and learning rate.
        if (
            restored is not None
            and not optimizer.built
            and len(store.keys()) != len(optimizer.variables)
        ):
            optimizer.build(restored.trainable_variables)
        load_state(optimizer, store)

    optimizer.load_own_variables = load_own_variables


class SavedCompileConfig:
    """Mixin for keras-hub tasks: `load_model` restores `compile()` as saved.

    Put it before the keras-hub task class:
    `class MyLM(SavedCompileConfig, keras_hub.models.CausalLM)`.

    Example:

    >>> import keras
    >>> from keras_moe.models import MoEBackbone, MoECausalLM
    >>> backbone = MoEBackbone(
    ...     vocabulary_size=16, num_layers=1, hidden_dim=8,
    ...     num_query_heads=2, num_experts=2, top_k=1,
    ...     moe_intermediate_dim=8)
    >>> causal_lm = MoECausalLM(backbone)
    >>> causal_lm.compile(optimizer=keras.optimizers.SGD(0.5),
    ...                   sampler="greedy")
    >>> restored = MoECausalLM(backbone)
    >>> restored.compile_from_config(causal_lm.get_compile_config())
    >>> type(restored.optimizer).__name__, type(restored.sampler).__name__
    ('SGD', 'GreedySampler')
    """

    def get_compile_config(self):
        """The arguments of `compile()`, saved with the model: Keras' own
        (optimizer, loss, metrics, ...) and the `sampler`.

        Returns:
            A dict, empty if the model was not compiled.
        """
        config = super().get_compile_config()
        sampler = getattr(self, "sampler", None)
        if config and sampler is not None:
            config = dict(config)
            config["sampler"] = keras_hub.samplers.serialize(sampler)
        return config

    def compile_from_config(self, config):
        """Compile with a saved `get_compile_config()`: `load_model` calls it.

        `keras.Model.compile_from_config` skips models with their own
        `compile()` (with a warning), which left a loaded model with
        keras-hub's default optimizer and sampler. Here the saved
        optimizer, loss, metrics and sampler are used, and the optimizer's
        variables are created once the saved weights are in place (the
        trainable variables are final then: LoRA factors and quantized
        kernels included), so that `load_model` restores its state and
        `fit()` resumes where the saved model stopped.

        Args:
            config: a dict from `get_compile_config()`.
        """
        if not isinstance(config, Mapping):
            raise ValueError(
                "`config` must be a dict from `get_compile_config()`. "
                f"Received: config={config!r}"
            )
        config = dict(config)
        sampler = config.pop("sampler", None)
        config = keras.saving.deserialize_keras_object(config)
        if sampler is not None:
            config["sampler"] = keras_hub.samplers.deserialize(sampler)
        self.compile(**config)
        _build_optimizer_before_loading_its_state(self)
