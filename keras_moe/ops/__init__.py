"""Backend-agnostic MoE building blocks (`keras.ops` only)."""

from keras_moe.ops.dispatch import DispatchPlan
from keras_moe.ops.dispatch import combine
from keras_moe.ops.dispatch import compute_dispatch_plan
from keras_moe.ops.dispatch import dispatch
from keras_moe.ops.dispatch import expert_capacity
from keras_moe.ops.router_losses import expert_load
from keras_moe.ops.router_losses import load_balancing_loss
from keras_moe.ops.router_losses import router_z_loss
