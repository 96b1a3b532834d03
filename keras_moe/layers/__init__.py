"""Mixture-of-Experts layers."""

from keras_moe.layers.experts import Experts
from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.hierarchical_moe import HierarchicalMoE
from keras_moe.layers.hierarchical_router import HierarchicalRouter
from keras_moe.layers.shared_expert_moe import SharedExpertMoE
from keras_moe.layers.soft_moe import SoftMoE
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.layers.top_k_router import RouterOutput
from keras_moe.layers.top_k_router import TopKRouter
