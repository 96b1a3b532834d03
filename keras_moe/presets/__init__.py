"""Model presets: named `MoEBackbone` configs, loaded ready to train.

The presets are JSON files (the repository's `presets/` folder, shipped in
the wheel): an architecture config, training defaults, the paper or model
card reproduced and, for full-size models, the published parameter counts.

- `names()`: all preset names.
- `config(name)`: the `MoEBackbone` config; `info(name)`: the whole record.
- `count_params(name_or_config)`: `{"total", "active"}` by formula, without
  building.
- `load(name_or_dir, preprocessor="default", **overrides)`: a `MoECausalLM`.
"""

from keras_moe.models.memory import PresetTooLargeError
from keras_moe.models.memory import available_memory
from keras_moe.models.memory import check_fits_in_memory
from keras_moe.models.memory import weight_dtype
from keras_moe.presets.loading import load
from keras_moe.presets.parameter_count import count_params
from keras_moe.presets.preset_registry import config
from keras_moe.presets.preset_registry import info
from keras_moe.presets.preset_registry import names
from keras_moe.presets.preset_registry import presets_directory
