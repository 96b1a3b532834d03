"""The shared test harness.

- `run_layer_test`, `run_backbone_test`, `run_preset_test`: the checks every
  layer, backbone configuration and preset passes (config and `.keras`
  round trips, mixed precision, masking, gradients).
- `check_gradients`, `value_and_grads`, `numerical_gradient`: gradients on
  the active backend against finite differences of a float64 reference.
- `reload_keras_file`, `reload_preset`: save and load back (safe mode).
- Tiny builders (`tiny_preset`, `load_preset`, `tiny_backbone_config`,
  `token_batch`, `token_moe_model`, `ROUTED_LAYER_CASES`), `to_numpy` and
  `assert_same_weights`; the `backend_independent` mark.
- `moe_reference`, `routing_reference`: slow NumPy references, independent
  of `keras_moe`.
- `hf_checkpoints`: tiny random transformers checkpoints (weights far from
  init), a padded batch, logits of both sides, the greedy continuation a
  cached `generate()` must give, and checkpoint copies to damage.

pytest puts `tests/` on `sys.path`, so test files import `testing`.
"""

from .arrays import assert_same_weights
from .arrays import to_numpy
from .builders import PRESET_SHRINK
from .builders import ROUTED_LAYER_CASES
from .builders import TINY_PRESET_OVERRIDES
from .builders import load_preset
from .builders import tiny_backbone_config
from .builders import tiny_preset
from .builders import token_batch
from .builders import token_moe_model
from .gradients import assert_finite_outputs_and_gradients
from .gradients import check_gradients
from .gradients import numerical_gradient
from .gradients import training_outputs_and_grads
from .gradients import value_and_grads
from .layer_checks import run_layer_test
from .markers import backend_independent
from .model_checks import run_backbone_test
from .model_checks import run_preset_test
from .saving import reload_keras_file
from .saving import reload_preset
