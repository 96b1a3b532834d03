"""Mixture-of-Experts layers."""

from keras_moe.layers.clamped_swiglu import ClampedSwiGLU
from keras_moe.layers.experts import Experts
from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.hierarchical_moe import HierarchicalMoE
from keras_moe.layers.routers.expert_choice_router import ExpertChoiceRouter
from keras_moe.layers.routers.hierarchical_router import HierarchicalRouter
from keras_moe.layers.routers.router import Router
from keras_moe.layers.routers.router import RoutingDecision
from keras_moe.layers.routers.token_choice_router import RouterOutput
from keras_moe.layers.routers.token_choice_router import TokenChoiceRouter
from keras_moe.layers.routers.top_k_router import TopKRouter
from keras_moe.layers.shared_expert_moe import SharedExpertMoE
from keras_moe.layers.soft_moe import SoftMoE
from keras_moe.layers.sparse_moe import SparseMoE
