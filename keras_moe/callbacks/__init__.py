"""Callbacks and helpers that show what the MoE routers are doing."""

from keras_moe.callbacks.heatmap import render_load_heatmap
from keras_moe.callbacks.router_stats import RouterStats
from keras_moe.callbacks.router_stats import collect_router_stats
from keras_moe.callbacks.router_stats import router_stats
from keras_moe.callbacks.router_stats import router_stats_metrics
