"""Mixture-of-Experts transformer models (keras-hub `Backbone` / `CausalLM`)."""

from keras_moe.models.backbone_config import is_moe_layer
from keras_moe.models.grouped_query_attention import GroupedQueryAttention
from keras_moe.models.moe_backbone import MoEBackbone
from keras_moe.models.moe_causal_lm import MoECausalLM
from keras_moe.models.moe_causal_lm_preprocessor import MoECausalLMPreprocessor
from keras_moe.models.moe_decoder_block import MoEDecoderBlock
from keras_moe.models.moe_tokenizer import MoETokenizer
from keras_moe.models.multi_head_latent_attention import MultiHeadLatentAttention
from keras_moe.models.multi_token_prediction import MultiTokenPrediction
from keras_moe.models.multi_token_prediction import MultiTokenPredictionBlock
from keras_moe.models.multi_token_prediction import multi_token_prediction_loss
from keras_moe.models.rms_normalization import RMSNormalization
from keras_moe.models.switch_encoder_decoder_backbone import (
    SwitchEncoderDecoderBackbone,
)
from keras_moe.models.switch_seq2seq_lm import SwitchSeq2SeqLM
from keras_moe.models.switch_seq2seq_lm_preprocessor import (
    SwitchSeq2SeqLMPreprocessor,
)
from keras_moe.models.switch_transformer_block import SwitchTransformerBlock
from keras_moe.models.t5_relative_attention import T5RelativeAttention
from keras_moe.models.t5_relative_position_bias import T5RelativePositionBias
