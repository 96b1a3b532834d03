"""Hugging Face checkpoints: load them as keras-moe models, and export back.

- `from_transformers(path_or_hf_handle, preprocessor="default", **overrides)`:
  a `MoECausalLM` from a checkpoint directory (`config.json` +
  safetensors) or `hf://org/name`; `keras_moe.presets.load` calls it for
  such directories and handles. Supported `model_type`s:
  `SUPPORTED_MODEL_TYPES` (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2,
  DeepSeek-V3, OLMoE, GLM-4.5, DBRX, GPT-OSS, Llama 4, and Switch
  Transformer as a `SwitchSeq2SeqLM`).
- `to_transformers(model, directory)`: a checkpoint transformers loads
  back to the same logits.
- `backbone_config_from_transformers(config)` and
  `transformers_config(backbone)`: the two config translations.
- `HuggingFaceTokenizer`: a keras-hub tokenizer running a `tokenizer.json`.

Each family (`model_type`) is one module of `keras_moe.convert.families`,
found through `keras_moe.convert.registry`.
"""

from keras_moe.convert import registry
from keras_moe.convert.checkpoint import ConversionError
from keras_moe.convert.checkpoint import SafetensorsCheckpoint
from keras_moe.convert.export import infer_model_type
from keras_moe.convert.export import to_transformers
from keras_moe.convert.export import transformers_config
from keras_moe.convert.loading import backbone_config_from_transformers
from keras_moe.convert.loading import from_transformers
from keras_moe.convert.tokenizer import HuggingFaceTokenizer

SUPPORTED_MODEL_TYPES = registry.model_types()
